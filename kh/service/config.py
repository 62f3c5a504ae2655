"""khd's configuration: one frozen value built from options and the environment.

`kh service start` hands khd every setting as a command-line option (``to_argv``; khd reads them
back with ``add_options``/``from_options``), so the value khd runs with is exactly the caller's,
and khd's command line carries its state directory and name prefix for `kh clean` to find.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from kh.hw.tags import FabricConfig
from kh.settings import paths


@dataclass(frozen=True)
class ServiceConfig:
    state_dir: Path
    images: Path  # images/out: u-boot.elf, uImage, <appliance>.cpio.gz.uimg
    nodes: int = 8  # size of the machine: nodes kept started (warm) at the U-Boot prompt
    mem_mib: int = 256
    appliance: str = "shell"  # the preloaded ramdisk at ${ramfsaddr}
    api_port: int = 7480  # HTTP on 127.0.0.1 and, inside the fabric, on the public domain
    ssh_port: int = 7422  # the control channel (ssh con<ID>@...), same two places
    server: str = "127.0.0.1"  # host name khget prints in con<ID>@<server>
    prefix: str = "kh"
    uplink_netns: str | None = None
    qemu: str | None = None  # the nodes' QEMU program (KH_QEMU); None: the board's
    domain_quota: int = 16  # private domains one principal may hold (KH_DOMAIN_QUOTA)

    @property
    def fabric(self) -> FabricConfig:
        return FabricConfig(prefix=self.prefix, uplink_netns=self.uplink_netns)

    @property
    def db(self) -> Path:
        return self.state_dir / "kh.db"

    @property
    def host_key(self) -> Path:
        return self.state_dir / "ssh_host_rsa_key"  # the control channel's ssh host key

    @property
    def run(self) -> Path:
        return self.state_dir / "run"

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    @property
    def socket(self) -> Path:
        return self.run / "khd.sock"

    @property
    def pidfile(self) -> Path:
        return self.run / "khd.pid"

    @property
    def khd_log(self) -> Path:
        return self.logs / "khd.log"

    def node_dir(self, number: int) -> Path:
        return self.run / f"node{number}"

    def console_log(self, number: int) -> Path:
        return self.logs / f"node{number}.log"

    def qemu_log(self, number: int) -> Path:
        """QEMU's own output (stderr) for the node's latest start: where a failure's reason is."""
        return self.logs / f"node{number}.qemu.log"

    @property
    def state_paths(self) -> tuple[Path, ...]:
        """Everything khd keeps in its state directory; `kh clean` removes exactly these."""
        db = self.db
        sqlite_files = tuple(db.with_name(db.name + s) for s in ("-wal", "-shm", "-journal"))
        return (db, *sqlite_files, self.host_key, self.run, self.logs)

    @property
    def images_needed(self) -> tuple[Path, ...]:
        """The published images every node is started from."""
        return (self.images / "u-boot.elf", self.images / "uImage",
                self.images / f"{self.appliance}.cpio.gz.uimg")


def default_state_dir() -> Path:
    return Path(os.environ.get("KH_STATE_DIR", "/var/lib/kh"))


def from_env(**overrides: object) -> ServiceConfig:
    """Defaults, then KH_* environment variables, then explicit overrides (CLI options)."""
    env = os.environ
    values: dict[str, object] = {
        "state_dir": default_state_dir(),
        "images": paths().out,
        "nodes": int(env.get("KH_NODES", "8")),
        "api_port": int(env.get("KH_API_PORT", "7480")),
        "ssh_port": int(env.get("KH_SSH_PORT", "7422")),
        "prefix": env.get("KH_PREFIX", "kh"),
        "uplink_netns": env.get("KH_UPLINK_NETNS") or None,
        "qemu": env.get("KH_QEMU") or None,
        "domain_quota": int(env.get("KH_DOMAIN_QUOTA", "16")),
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    return ServiceConfig(**values)  # type: ignore[arg-type]


# How each setting's annotation reads back from a command-line option.
_OPTION_TYPES = {"Path": Path, "int": int, "str": str, "str | None": str}


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def to_argv(cfg: ServiceConfig) -> list[str]:
    """Every setting of ``cfg`` as khd's command-line options (paths made absolute)."""
    argv: list[str] = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is not None:
            argv += [_option(f.name),
                     os.path.abspath(value) if isinstance(value, Path) else str(value)]
    return argv


def add_options(ap: argparse.ArgumentParser) -> None:
    """One option per setting, named as ``to_argv`` writes them."""
    for f in dataclasses.fields(ServiceConfig):
        ap.add_argument(_option(f.name), dest=f.name, type=_OPTION_TYPES[str(f.type)])


def from_options(args: argparse.Namespace) -> ServiceConfig:
    """The config khd was given; settings not on its command line come from the environment."""
    return from_env(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServiceConfig)})
