"""The node backend seam (kh.hw.backend): the service, the pool, the control channel's access and
the meter reach nodes only through the Backend interface, never through a backend's insides (QMP,
the memfd under /proc, QEMU's PIDs and logs), so a second backend (libvirt) can stand in."""

from __future__ import annotations

import ast
from pathlib import Path

import kh
from kh.hw.backend import Backend
from kh.service.nodes import NodeManager

ROOT = Path(kh.__file__).parent
# Modules that use nodes and must do so through the seam only.
# (Not kh.service.control: `kh clean` sweeps every backend's leftovers by kh's tags.)
USERS = ["service/core.py", "service/pool.py", "service/access.py", "service/membership.py",
         "service/recovery.py", "cc/channel.py", "cc/sshd.py", "metering/sampler.py"]
# What only a backend may touch: QMP, the memfd found through /proc, QEMU's log and tag.
INSIDES = {"qmp", "ram_file", "qemu_log", "kill_recorded", "node_spec", "load_files", "recorded",
           "NodeManager", "RunningNode", "popen"}


def names_used(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    used: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            used.add(node.attr)
        elif isinstance(node, ast.Name):
            used.add(node.id)
        elif isinstance(node, ast.ImportFrom):
            used.update(a.name for a in node.names)
    return used


def test_service_modules_use_no_backend_insides() -> None:
    found = {m: sorted(names_used(ROOT / m) & INSIDES) for m in USERS if (ROOT / m).exists()}
    # the pool and recovery ask the backend to stop what a start or a khget left running
    for m in ("service/pool.py", "service/recovery.py"):  # Backend.kill_recorded: allowed
        found[m] = [n for n in found[m] if n != "kill_recorded"]
    assert {m: f for m, f in found.items() if f} == {}


def test_qemu_backend_has_every_method_of_the_interface() -> None:
    wanted = {n for n in dir(Backend) if not n.startswith("_")}
    assert wanted - set(dir(NodeManager)) <= {"fabric", "running"}  # instance attributes
    assert NodeManager.name == "qemu"
