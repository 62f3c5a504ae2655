"""Real nodes on the simulated hosts of tests/unit/twohost.py: a ppce500 node booted into an
appliance with its NIC on a tap of one host's fabric, its QEMU in that host's namespace. For
guest tests and benchmarks of domains across hosts. Needs root and built images."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from kh import boot
from kh.allocation import node_address
from kh.hw import board, qemu, uboot
from kh.hw import netns as nsutil
from kh.hw.antispoof import nic_mac
from kh.settings import paths
from tests.unit.twohost import Host


@contextlib.contextmanager
def node_in(h: Host, number: int, netid: int, logdir: Path, mtu: int = 1450,
            address_of: int | None = None) -> Iterator[boot.BootedNode]:
    """Node ``number`` booted into the shell appliance with its NIC on ``h``'s tap in domain
    ``netid``, MTU ``mtu`` (boot key kh.mtu0), the address of node ``number`` in domain
    ``address_of`` (default: ``netid``'s).
    Its QEMU is started from a thread inside ``h``'s namespace (a child is in the namespace of
    the thread that forks it), which lives until the node is torn down (QEMU dies with it)."""
    h.fabric.ensure_domain(netid)
    h.fabric.ensure_tap(number, 0)
    h.fabric.attach(number, 0, netid)
    p = paths()
    cfg = boot.default_config(
        p, khargs=f"kh.node={number} kh.eth0={node_address(address_of or netid, number)} "
                  f"kh.mtu0={mtu}",
        console_log=logdir / f"node{number}.console.log")
    cfg = dataclasses.replace(cfg, name=f"vxn{number}")
    box: dict[str, object] = {}
    ready, done = threading.Event(), threading.Event()

    def run() -> None:
        workdir = Path(tempfile.mkdtemp(prefix="kh-vxn-"))
        try:
            nsutil.enter(h.cfg.netns)
            spec = dataclasses.replace(boot.node_spec(cfg, workdir), nics=(
                board.Nic("n0", nic_mac(number, 0), tap=h.cfg.tap(number, 0)),))
            with qemu.running(spec, console_log=cfg.console_log, workdir=workdir,
                              die_with_parent=True) as node:
                node.console.expect(uboot.UBOOT_PROMPT, cfg.prompt_timeout, stage="U-Boot")
                box["node"] = boot.kboot(node, cfg)
                ready.set()
                done.wait()
        except BaseException as e:
            box["error"] = e
        finally:
            ready.set()
            shutil.rmtree(workdir, ignore_errors=True)

    t = threading.Thread(target=run, name=f"node{number}")
    t.start()
    try:
        ready.wait()
        if "error" in box:
            raise box["error"]  # type: ignore[misc]
        yield box["node"]  # type: ignore[misc]
    finally:
        done.set()
        t.join()


