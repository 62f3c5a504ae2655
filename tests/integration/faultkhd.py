"""A khd of a fault test's own (test_service_faults, test_service_stops): its settings in a
directory of its own (``setup``), snapshots of what kh could leave on the host, placeholder
images, stand-in QEMU scripts, and polling with a guard against hanging."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from kh.service.config import ServiceConfig
from tests.integration.conftest import free_port

ROM = ('qemu-system-ppc: -device virtio-net-pci,netdev=d0,mac=52:54:00:00:01:00: '
       'failed to find romfile "efi-virtio.rom"')
NODES = 3


def prefix_pids(prefix: str) -> list[str]:
    """``PID COMMAND-LINE`` of every process but this one whose command line carries ``prefix``
    anywhere (more than a node tag: helpers too)."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != me:
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if prefix.encode() in cmd:
                words = cmd.replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{entry} {words}")
    return found


def snapshot(prefix: str, parent: Path) -> dict[str, list[str]]:
    """What kh could leave behind on the host: network namespaces, links of the host's own
    namespace, processes whose command line carries the prefix, files under the state dir's
    parent."""
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    return {
        # kh names all it makes after the prefix; others' namespaces and links (tests running
        # beside this one) are not this test's business
        "netns": sorted(line.split()[0] for line in netns.stdout.splitlines()
                        if line.strip() and prefix in line.split()[0]),
        "links": sorted(name for name in (line.split(":")[1].strip()
                                          for line in links.stdout.splitlines())
                        if prefix in name),
        "pids": sorted(prefix_pids(prefix)),
        "files": sorted(str(p.relative_to(parent)) for p in parent.rglob("*")),
    }


@dataclass
class Setup:
    cfg: ServiceConfig
    parent: Path

    def snapshot(self) -> dict[str, list[str]]:
        return snapshot(self.cfg.prefix, self.parent)


def fake_images(d: Path) -> Path:
    d.mkdir()
    for name in ("u-boot.elf", "uImage", "shell.cpio.gz.uimg"):
        (d / name).write_bytes(b"placeholder: the fake QEMU never reads it\n")
    return d


def script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def setup(tmp_path: Path, tag: str, images: Path, qemu: str | None, nodes: int = NODES
          ) -> Setup:
    parent = tmp_path / "host"
    parent.mkdir()
    prefix = f"k{tag}{os.getpid() % 10000}"
    cfg = ServiceConfig(state_dir=parent / "state", images=images, nodes=nodes,
                        api_port=free_port(), ssh_port=free_port(), prefix=prefix,
                        qemu=qemu)
    return Setup(cfg, parent)


def wait_for(what: str, check, timeout: float = 180.0):  # type: ignore[no-untyped-def]
    """Poll ``check`` until it returns something true (a guard against hanging, not a time
    the test asserts)."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.2)
    return result


def hanging_qemu(path: Path, prefix: str) -> Path:
    """A QEMU that never brings its console up, with a helper process of its own that does
    not carry the node tag (its command line carries the prefix, so snapshots see it)."""
    return script(path, f"python3 -c 'import time; time.sleep(600)' helper-of-{prefix} &\n"
                        "wait\n")
