"""khd's configuration: one frozen value built from options and the environment.

`kh service start` hands khd every setting as a command-line option (``to_argv``; khd reads them
back with ``add_options``/``from_options``), so the value khd runs with is exactly the caller's,
and khd's command line carries its state directory and name prefix for `kh clean` to find.

``SETTINGS`` describes every setting once: its environment variable, `kh service start`'s option,
what it is, what it may be and its default in words (ServiceConfig holds only the default
values). ``from_env`` parses and checks them all there (a bad value is a one-line UsageError
naming the variable or option and what is allowed); `kh service start`'s options and the CLI's
help (kh.cli.service), docs/service.md's table (tests/unit/test_settings_doc.py makes it and
checks the docs have it) and `khd already running with ...` (control.mismatch) are made from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kh.allocation import MAX_NETID
from kh.errors import UsageError
from kh.hw.tags import FabricConfig
from kh.model import FIRST_PRIVATE
from kh.settings import paths

# kh's QEMU for its nodes is published with the images under the name of Debian's program.
QEMU_PROGRAM = "qemu-system-ppc"

# Node numbers go into each node's MACs (16 bits) and addresses (10.d.(n>>8).(n&255), at most
# allocation.MAX_NODE), and a node that dies allocated is replaced under a number past the
# size; 1024 leaves room for that, and 1024 nodes of 256 MiB already ask for 256 GiB.
MAX_NODES = 1024
MIN_MEM_MIB, MAX_MEM_MIB = 256, 2048  # the board's least; a 32-bit e500v2 node maps 2 GiB
MAX_PREFIX = 8  # the longest tap name, <prefix><node>s<slot>, must fit IFNAMSIZ (15 chars)
BACKENDS = ("qemu", "libvirt")  # kh.hw.backend's two
PLACEMENTS = ("fill", "spread")  # kh.service.placement's policies
PREFIX_RE = re.compile(rf"[a-z][a-z0-9]{{0,{MAX_PREFIX - 1}}}")


DEFAULT_STATE_DIR = "/var/lib/kh"


@dataclass(frozen=True)
class Setting:
    """One setting of ServiceConfig, described once: where it comes from, what it means, what it
    may be and its default in words (the default's value is ServiceConfig's). `kh service
    start`'s options and --help (``help_text``, ``env_help``), docs/service.md's table
    (tests/unit/test_settings_doc.py) and `khd already running with ...` (``describe``) are
    made from it."""

    field: str
    env: str | None  # KH_* variable it is read from
    option: str | None  # `kh service start`'s option for it (khd's own is --<field>)
    help: str  # what it is, lowercase, no period
    low: int | None = None  # integers: the allowed range, inclusive
    high: int | None = None
    what: str = ""  # the value in words, "{} nodes", for `khd already running with ...`
    choices: tuple[str, ...] = ()  # strings: the values allowed, if not any
    allowed: str = ""  # the allowed values in words, when not low to high or the choices
    default: str = ""  # the default in words, when not ServiceConfig's value as it prints

    def label(self, from_env: bool) -> str:
        if from_env and self.env:
            return self.env
        return self.option or "--" + self.field.replace("_", "-")

    def describe(self, value: object) -> str:
        if isinstance(value, bool):
            value = "on" if value else "off"
        return (self.what or self.field.replace("_", " ") + " {}").format(value)

    @property
    def kind(self) -> str:
        """ServiceConfig's annotation of it: ``int``, ``str``, ``str | None``, ``bool``..."""
        return str(next(f.type for f in dataclasses.fields(ServiceConfig)
                        if f.name == self.field))

    def allowed_text(self) -> str:
        if self.choices:
            return " or ".join(self.choices)
        if self.allowed or self.low is None:
            return self.allowed
        return f"{self.low} to {self.high}"

    @property
    def value(self) -> object:
        """ServiceConfig's default (dataclasses.MISSING: none)."""
        return next(f.default for f in dataclasses.fields(ServiceConfig) if f.name == self.field)

    def default_text(self) -> str:
        if self.default:
            return self.default
        value = self.value
        return "on" if value is True else "off" if value is False else str(value)

    def help_text(self) -> str:
        """What it is, what it may be and its default, in one line (for --help)."""
        allowed = self.allowed_text()
        return f"{self.help} ({allowed + '; ' if allowed else ''}default {self.default_text()})"


SETTINGS: tuple[Setting, ...] = (
    Setting("state_dir", "KH_STATE_DIR", None, "khd's state directory, also kh's --state-dir",
            default=DEFAULT_STATE_DIR),
    Setting("images", None, None, "the published images: u-boot.elf, uImage, "
            "<appliance>.cpio.gz.uimg", default="the checkout's images/out (KH_IMAGES_OUT)"),
    Setting("nodes", "KH_NODES", "--nodes", "nodes the machine has, kept warm at the U-Boot "
            "prompt", 1, MAX_NODES, "{} nodes"),
    Setting("mem_mib", None, None, "MiB of memory per node", MIN_MEM_MIB, MAX_MEM_MIB,
            "{} MiB per node"),
    Setting("appliance", None, None, "the ramdisk preloaded at ${ramfsaddr}"),
    Setting("api_port", "KH_API_PORT", "--port", "API port (HTTP) on 127.0.0.1 and in the "
            "fabric", 1, 65535, "API port {}"),
    Setting("ssh_port", "KH_SSH_PORT", None, "control-channel ssh port (ssh con<ID>@...), on "
            "127.0.0.1 and in the fabric", 1, 65535, "ssh port {}"),
    Setting("server", None, None, "host name khget prints in con<ID>@<server>"),
    Setting("prefix", "KH_PREFIX", None, "tag of kh's host objects, one per kh instance",
            what="prefix {}", allowed=f"[a-z][a-z0-9]{{0,{MAX_PREFIX - 1}}}"),
    Setting("uplink_netns", "KH_UPLINK_NETNS", "--uplink-netns", "the operator's network "
            "namespace the external domain reaches, which kh never removes",
            what="uplink namespace {}", allowed="an existing one, not <prefix>-outside",
            default="kh makes its own, <prefix>-outside"),
    Setting("outside", None, "--no-outside", "no outside world at all: nothing on the host "
            "reaches the external domain", what="an outside world {}",
            allowed="not with --uplink-netns",
            default="off: kh makes and owns <prefix>-outside unless --uplink-netns names one"),
    Setting("qemu", "KH_QEMU", None, "the nodes' QEMU program", what="QEMU {}",
            allowed="a program on PATH or a path; qemu-system-ppc is Debian's",
            default="kh's own build among the images, <images>/qemu-system-ppc: half the "
            "memory per node"),
    Setting("domain_quota", "KH_DOMAIN_QUOTA", "--domain-quota", "private domains one "
            "principal may hold", 1, MAX_NETID - FIRST_PRIVATE + 1, "domain quota {}"),
    Setting("node_quota", "KH_NODE_QUOTA", "--node-quota", "nodes one principal may hold at "
            "once", 1, MAX_NODES, "node quota {}"),
    Setting("page_port", "KH_PAGE_PORT", "--page-port", "the live page's port on 127.0.0.1, "
            "e.g. 7481", 0, 65535, "page port {}", default="0: no page"),
    Setting("backend", "KH_BACKEND", "--backend", "how khd runs its nodes: qemu runs each "
            "QEMU as its own child, libvirt as a domain of kh's own libvirtd in the fabric "
            "namespace, see docs/libvirt.md", what="backend {}", choices=BACKENDS),
    Setting("placement", "KH_PLACEMENT", "--placement", "where khget's nodes go when khd has "
            "several hosts (kh host add): fill puts them on this host first, then on the "
            "hosts in the order added; spread goes round robin over the hosts with free nodes",
            what="placement {}", choices=PLACEMENTS),
    Setting("meter_interval", "KH_METER_INTERVAL", None, "seconds between two metering "
            "samples of every allocated node, kh.metering", 1, 3600, "metering every {} s"),
)
BY_FIELD = {s.field: s for s in SETTINGS}


def env_help() -> str:
    """The environment variables the service honours, for --help (one per line)."""
    named = [s for s in SETTINGS if s.env]
    width = max(len(s.env or "") for s in named)
    return "\n".join(f"  {s.env:<{width}} {s.help_text()}" for s in named)


def check(field: str, value: object, label: str | None = None) -> None:
    """Refuse a value outside its setting's range, naming ``label`` (variable or option)."""
    s = BY_FIELD[field]
    name = label or s.label(False)
    if isinstance(value, int) and s.low is not None and s.high is not None \
            and not s.low <= value <= s.high:
        raise UsageError(f"{name} must be {s.low} to {s.high}, not {value}")
    if field == "prefix" and not (isinstance(value, str) and PREFIX_RE.fullmatch(value)):
        raise UsageError(f"{name} must be a lowercase letter then up to {MAX_PREFIX - 1} "
                         f"lowercase letters or digits, not {value!r}",
                         "it starts every interface name kh makes")
    if s.choices and value not in s.choices:
        raise UsageError(f"{name} must be {' or '.join(s.choices)}, not {value!r}")


@dataclass(frozen=True)
class ServiceConfig:
    """khd's settings: each field's meaning, allowed values, variable and option are its
    SETTINGS entry's (docs/service.md#settings is made from them)."""

    state_dir: Path
    images: Path
    nodes: int = 8
    mem_mib: int = 256
    appliance: str = "shell"
    api_port: int = 7480
    ssh_port: int = 7422
    server: str = "127.0.0.1"
    prefix: str = "kh"
    uplink_netns: str | None = None
    outside: bool = True
    qemu: str | None = None  # None: kh's own (khs_qemu)
    backend: str = "qemu"
    placement: str = "fill"
    domain_quota: int = 16
    node_quota: int = 16
    page_port: int = 0
    meter_interval: int = 10

    def __post_init__(self) -> None:
        for s in SETTINGS:
            check(s.field, getattr(self, s.field))
        if self.uplink_netns and not self.outside:
            raise UsageError("--uplink-netns names an outside world and --no-outside asks "
                             "for none", "give one of them")

    @property
    def fabric(self) -> FabricConfig:
        """The fabric's names; the external domain's uplink goes to the operator's namespace,
        else to kh's own outside world (unless ``outside`` is off: then nowhere)."""
        if self.uplink_netns:
            return FabricConfig(prefix=self.prefix, uplink_netns=self.uplink_netns)
        own = FabricConfig(prefix=self.prefix).outside_netns
        return FabricConfig(prefix=self.prefix, uplink_netns=own if self.outside else None,
                            own_outside=self.outside)

    @property
    def outside_netns(self) -> str | None:
        """Where the external domain's outside world is: the namespace `kh outside` enters."""
        return self.fabric.uplink_netns

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
    def page_token(self) -> Path:
        """The live page's operator token (mode 600, new at each khd start with a page)."""
        return self.state_dir / "page-operator-token"

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
        return (db, *sqlite_files, self.host_key, self.page_token, self.run, self.logs,
                self.libvirt_dir)

    @property
    def libvirt_dir(self) -> Path:
        """kh's own libvirtd's directories (the libvirt backend: kh.hw.libvirtd)."""
        return self.state_dir / "libvirt"

    @property
    def node_qemu(self) -> str:
        """The QEMU program the direct backend's nodes run: ``qemu`` (KH_QEMU) when set, else
        kh's own build among the images (``khs_qemu``: half the memory per idle node, the same
        boot CPU; docs/density.md#khs-own-qemu). KH_QEMU=qemu-system-ppc is Debian's, on
        PATH."""
        return self.qemu or str(self.khs_qemu)

    @property
    def khs_qemu(self) -> Path:
        """kh's own QEMU, published with the images (images/recipes/qemu.toml)."""
        return self.images / QEMU_PROGRAM

    @property
    def runs_khs_qemu(self) -> bool:
        """The nodes run kh's own QEMU: the direct backend (the libvirt backend runs Debian's)
        with KH_QEMU unset or naming the build among the images."""
        return (self.backend == "qemu"
                and os.path.realpath(self.node_qemu) == os.path.realpath(self.khs_qemu))

    @property
    def images_needed(self) -> tuple[Path, ...]:
        """The published images every node is started from, and kh's own QEMU when the nodes
        run it."""
        own = (self.khs_qemu,) if self.runs_khs_qemu else ()
        return (self.images / "u-boot.elf", self.images / "uImage",
                self.images / f"{self.appliance}.cpio.gz.uimg", *own)


def default_state_dir() -> Path:
    return Path(os.environ.get("KH_STATE_DIR", DEFAULT_STATE_DIR))


def _from_env(s: Setting, text: str) -> object:
    kind = s.kind
    if kind == "int":
        if not re.fullmatch(r"[+-]?[0-9]+", text.strip()):
            raise UsageError(f"{s.env} must be a whole number from {s.low} to {s.high}, "
                             f"not {text!r}")
        value: object = int(text)
    elif kind == "Path":
        value = Path(text)
    else:
        value = text or None if kind == "str | None" else text
    check(s.field, value, s.env)
    return value


def given(**overrides: object) -> set[str]:
    """The settings the caller asked for: options given, or their variable set."""
    return ({k for k, v in overrides.items() if v is not None}
            | {s.field for s in SETTINGS if s.env and os.environ.get(s.env)})


def from_env(**overrides: object) -> ServiceConfig:
    """Defaults, then KH_* environment variables, then explicit overrides (CLI options), each
    checked against its setting (UsageError naming the variable or option)."""
    values: dict[str, object] = {"state_dir": default_state_dir(), "images": paths().out}
    for s in SETTINGS:
        text = os.environ.get(s.env) if s.env and overrides.get(s.field) is None else None
        if text:  # an empty variable counts as unset; an option wins over it
            values[s.field] = _from_env(s, text)
    for k, v in overrides.items():
        if v is not None:
            check(k, v)
            values[k] = v
    return ServiceConfig(**values)  # type: ignore[arg-type]


# How each setting's annotation reads back from a command-line option.
def _bool(text: str) -> bool:
    if text not in ("True", "False"):
        raise argparse.ArgumentTypeError(f"True or False, not {text!r}")
    return text == "True"


_OPTION_TYPES: dict[str, Callable[[str], object]] = {
    "Path": Path, "int": int, "str": str, "str | None": str, "bool": _bool}


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


def parse_argv(argv: list[str]) -> ServiceConfig:
    """The config a khd command line (its options after the module) names, without looking
    at this process's environment: what a running khd runs with."""
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--foreground", action="store_true")
    ap.add_argument("--debug", action="store_true")
    add_options(ap)
    args, _ = ap.parse_known_args(argv)
    return ServiceConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(
        ServiceConfig) if getattr(args, f.name) is not None})


def from_options(args: argparse.Namespace) -> ServiceConfig:
    """The config khd was given; settings not on its command line come from the environment."""
    return from_env(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServiceConfig)})
