"""khd's configuration: one frozen value built from options and the environment."""

from __future__ import annotations

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

    @property
    def fabric(self) -> FabricConfig:
        return FabricConfig(prefix=self.prefix, uplink_netns=self.uplink_netns)

    @property
    def db(self) -> Path:
        return self.state_dir / "kh.db"

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

    def node_dir(self, number: int) -> Path:
        return self.run / f"node{number}"


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
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    return ServiceConfig(**values)  # type: ignore[arg-type]
