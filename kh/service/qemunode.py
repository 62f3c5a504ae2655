"""One node's QEMU as khd describes it: its command line (a board.NodeSpec: tag, MACs, sockets,
sandbox and user, code cache), what khd loads into its RAM for U-Boot, its recorded identity
(procid: PID, start time, tag) and, in one line, why a start failed or a running node died.
kh.service.nodes (the ``qemu`` backend) runs nodes from these; kh.service.libvirt_nodes
describes its domains with the same tags, MACs and loads.
"""

from __future__ import annotations

import pwd
import signal
from pathlib import Path

from kh.allocation import NIC_SLOTS
from kh.errors import KhError
from kh.hw import board
from kh.hw.qemu import died_reason, last_words
from kh.service import procid
from kh.service.config import ServiceConfig
from kh.service.procid import ProcId

NODE_USER = "kh-node"  # node QEMUs run as this user; tools/setup-apt creates it
# Each node's TCG code cache (board.accel_args), in its memory limit. QEMU never gives the
# cache's pages back, so a node holds all of it once full: an apache node's boot fills 64 MiB
# (most of it translations its kernel has since invalidated); 24 MiB boots it with the same
# CPU time (2.7 s from `run kboot` to ready), 16 MiB takes 9 % more, 8 MiB 33 % more
# (docs/density.md).
CODE_CACHE_MIB = 24
IDENT_FILE = "qemu.id"  # in the node's run directory: its QEMU's PID and start time


def node_user() -> str | None:
    """NODE_USER when the host has it; None: QEMU stays root (khd says so once)."""
    try:
        pwd.getpwnam(NODE_USER)
    except KeyError:
        return None
    return NODE_USER


def node_tag(cfg: ServiceConfig, number: int) -> str:
    return f"{cfg.prefix}-node{number}"


def mac(number: int, slot: int) -> str:
    return f"52:54:00:{number >> 8 & 0xff:02x}:{number & 0xff:02x}:{slot:02x}"


def node_spec(cfg: ServiceConfig, number: int) -> board.NodeSpec:
    d = cfg.node_dir(number)
    b = board.BOARDS["ppce500"]
    nics = tuple(board.Nic(f"d{s}", mac(number, s), tap=cfg.fabric.tap(number, s))
                 for s in range(NIC_SLOTS))
    return board.NodeSpec(
        name=node_tag(cfg, number), bios=cfg.images / "u-boot.elf", console=d / "qemu-con.sock",
        qmp=d / "qmp.sock", shared_ram=True, board=b, mem_mib=cfg.mem_mib,
        wait_for_console=False, nics=nics, qemu=cfg.node_qemu, sandbox=True, run_as=node_user(),
        code_cache_mib=CODE_CACHE_MIB, free_page_reporting=True)


def default_loads(cfg: ServiceConfig) -> tuple[board.Load, ...]:
    """What a node has in RAM at its U-Boot prompt: the service's kernel and appliance at
    U-Boot's ${loadaddr} and ${ramfsaddr}, so `run kboot` boots them. khd writes them itself
    (memload.load_files), not QEMU's ``-device loader``, which keeps a copy of each file for
    resets for as long as QEMU runs (6.2 MiB per node, measured)."""
    b = board.BOARDS["ppce500"]
    return (board.Load(cfg.images / "uImage", b.loadaddr),
            board.Load(cfg.images / f"{cfg.appliance}.cpio.gz.uimg", b.ramfsaddr))


def recorded(cfg: ServiceConfig, number: int, pid: int | None) -> ProcId | None:
    """Node ``number``'s QEMU as the state recorded it, if ``pid`` still is that process
    (procid.recorded: PID, start time, tag); else None."""
    return procid.recorded(cfg.node_dir(number) / IDENT_FILE, node_tag(cfg, number), pid,
                           f"node {number}")


def cmdline(pid: int) -> list[str] | None:
    """Process ``pid``'s argv (/proc/PID/cmdline), None when it cannot be read."""
    try:
        return [a.decode(errors="replace")
                for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]]
    except OSError:
        return None


def started_otherwise(cfg: ServiceConfig, number: int, pid: int) -> str | None:
    """Why node ``number``'s running QEMU ``pid`` is not the one this khd would start (another
    QEMU program, or other settings in its command line: a khd stopped, then started with
    another KH_QEMU), in words; None when its command line is this khd's, or is unreadable
    (it exited: the caller finds that out)."""
    argv = cmdline(pid)
    if argv is None:
        return None
    want = [*board.qemu_argv(node_spec(cfg, number)), "-S"]
    if argv == want:
        return None
    if argv[:1] != want[:1]:
        return f"it runs QEMU {argv[0] if argv else '?'}, this khd's is {want[0]}"
    return "its QEMU was started with other settings than this khd's"


def kill_recorded(cfg: ServiceConfig, number: int, pid: int | None) -> bool:
    """Stop node ``number``'s QEMU, only if ``pid`` is still it (``recorded``); True if so."""
    ident = recorded(cfg, number, pid)
    return bool(ident and procid.stop([ident]))


def start_reason(error: KhError, exit_code: int | None, qemu_output: str, *names: str) -> str:
    """Why a start failed, in one line: what QEMU said when it exited on its own, or else the
    stage that did not come (the error's own message, without the node's ``names``: its tag,
    its console's name)."""
    if exit_code is not None:
        said = last_words(qemu_output)
        if said:
            return said
        return f"QEMU exited at start with status {exit_code} and said nothing"
    message = error.message
    for name in names:
        message = message.removeprefix(f"{name}: ")
    return message


def death_reason(exit_code: int | None, qemu_output: str) -> str:
    """Why a node that had been running is gone, naming the signal that killed its QEMU
    (``QEMU was killed by SIGKILL``) rather than a negative status."""
    if exit_code is None or exit_code >= 0:
        return died_reason(exit_code, qemu_output)
    try:
        name = signal.Signals(-exit_code).name
    except ValueError:
        name = f"signal {-exit_code}"
    return f"QEMU was killed by {name}" + died_reason(None, qemu_output).removeprefix(
        "QEMU exited")


def read_log(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
