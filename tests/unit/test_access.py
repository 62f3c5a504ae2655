"""kh.service.access.ServiceAccess: the control channel's questions, answered from khd's state
(a real Store) at the moment they are asked."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kh import admission
from kh.hw import memload
from kh.metering.sampler import Meter
from kh.model import NodeState
from kh.service.access import UBOOT_RESERVE, Grant, Revoked, ServiceAccess
from kh.store import NodeRow, Store
from tests.unit.test_metering import FakeSource


class Writer:
    def put(self, data: bytes) -> bool:
        return True


@dataclass
class Running:
    pid: int
    console: object = field(default_factory=object)
    writer: Writer = field(default_factory=Writer)


@dataclass
class Nodes:
    """The backend (kh.hw.backend.Backend) as far as ServiceAccess uses it; RAM opened as the
    qemu backend opens it (the memfd of the node's process, found through /proc)."""

    running: dict[int, Running] = field(default_factory=dict)

    def open_ram(self, number: int) -> memload.RamFile:
        node = self.running.get(number)
        if node is None:
            raise memload.LoadError("the node is not running")
        return memload.RamFile(memload.ram_file(node.pid))


@dataclass
class Cfg:
    mem_mib: int = 256


class Svc:
    """What ServiceAccess uses of khd's Service: its store, lock, running nodes, settings and
    credential check."""

    def __init__(self, db: Path) -> None:
        self.store = Store(db)
        self.lock = threading.RLock()
        self.nodes = Nodes()
        self.cfg = Cfg()
        self.asked: list[tuple[str, str | None]] = []
        self.meter = Meter(self.store, FakeSource(), mem_mib=256, tap_name=lambda n, s: "")

    def authenticate(self, user: str, credential: str | None, *, register: bool = False,
                     source: str | None = None) -> None:
        self.asked.append((user, source))
        admission.verify(credential, self.store.principal(user), user)


def node(number: int, alloc: int | None, state: NodeState = NodeState.ALLOCATED) -> NodeRow:
    return NodeRow(number, 100 + number, state, None, alloc, "/nowhere", time.time(), None)


@pytest.fixture
def svc(tmp_path: Path) -> Svc:
    s = Svc(tmp_path / "kh.db")
    s.store.add_principal("alice", *admission.hash_credential("apw"))
    s.store.add_principal("bob", *admission.hash_credential("bpw"))
    a = s.store.add_allocation("alice", ())
    b = s.store.add_allocation("bob", ())
    assert (a, b) == (1, 2)
    for n, alloc in ((1, 1), (2, 1), (3, 2)):
        s.store.put_node(node(n, alloc))
        s.nodes.running[n] = Running(pid=10_000 + n)
    return s


def test_logins(svc):
    acc = ServiceAccess(svc)  # type: ignore[arg-type]
    assert acc.login_password(1, None, "apw", "127.0.0.1") == Grant("alice", 1, None, None)
    assert acc.login_password(1, 2, "apw", "127.0.0.1") == Grant("alice", 1, 2, None)
    assert acc.login_password(1, None, "bpw", "10.1.0.5") is None  # another's credential
    assert svc.asked[-1] == ("alice", "10.1.0.5")  # the service's check, rate limits and all
    assert acc.login_password(1, None, "bpw", "127.0.0.2") is None
    assert svc.asked[-1] == ("alice", "loopback")  # all of loopback is one source, as for HTTP
    assert acc.login_password(1, 3, "apw", "127.0.0.1") is None  # not a node of allocation 1
    assert acc.login_password(7, None, "apw", "127.0.0.1") is None  # no such allocation
    assert acc.login_password(1, None, "x" * 5000, "127.0.0.1") is None  # malformed
    everywhere = svc.store.add_key("alice", "ssh-ed25519 AAAA1", "", None)
    svc.store.add_key("alice", "ssh-ed25519 AAAA2", "", 2)
    mine_1 = svc.store.add_key("alice", "ssh-ed25519 AAAA3 comment", "", 1)
    assert acc.login_key(1, None, "ssh-ed25519 AAAA1") == Grant("alice", 1, None, everywhere)
    assert acc.login_key(1, None, "ssh-ed25519 AAAA2") is None  # alice's, for allocation 2
    assert acc.login_key(1, 1, "ssh-ed25519 AAAA3") == Grant("alice", 1, 1, mine_1)
    assert acc.login_key(2, None, "ssh-ed25519 AAAA1") is None  # bob's allocation


def test_standing_follows_the_state(svc):
    acc = ServiceAccess(svc)  # type: ignore[arg-type]
    kid = svc.store.add_key("alice", "ssh-ed25519 AAAA1", "", 1)
    whole, one, by_key = Grant("alice", 1, None, None), Grant("alice", 1, 2, None), \
        Grant("alice", 1, None, kid)
    st = acc.standing([whole, one, by_key])
    assert st[whole].reason is None and st[whole].nodes == {1, 2}
    assert st[one].nodes == {2} and st[by_key].reason is None
    svc.store.put_node(node(2, 1, NodeState.FAILED))  # a failed node stays a member
    assert acc.standing([one])[one].reason is None
    svc.store.delete_node(2)  # it left (released alone)
    st = acc.standing([whole, one])
    assert st[one].reason == "node 2 left allocation 1" and st[whole].nodes == {1}
    svc.store.remove_key("alice", kid)
    assert acc.standing([by_key])[by_key].reason == f"key {kid} was revoked"
    svc.store.release_allocation(1)
    assert acc.standing([whole])[whole].reason == "allocation 1 was released"
    with pytest.raises(Revoked, match="allocation 1 was released"):
        acc.reach(whole)
    with pytest.raises(Revoked):
        acc.open_ram(whole, 1)
    assert acc.login_password(1, None, "apw", "127.0.0.1") is None


def test_a_node_given_to_another_allocation_is_not_reached(svc):
    acc = ServiceAccess(svc)  # type: ignore[arg-type]
    g = Grant("alice", 1, 2, None)
    svc.store.put_node(node(2, 2))  # node 2's number now belongs to bob's allocation
    assert acc.standing([g])[g].reason == "node 2 left allocation 1"
    with pytest.raises(Revoked):
        acc.open_ram(g, 2)
    reach = acc.reach(Grant("bob", 2, None, None))
    assert reach.members == (2, 3) and set(reach.consoles) == {2, 3}


def test_reach_and_hub(svc):
    acc = ServiceAccess(svc)  # type: ignore[arg-type]
    svc.store.put_node(node(2, 1, NodeState.FAILED))
    del svc.nodes.running[2]
    r = acc.reach(Grant("alice", 1, None, None))
    assert r.members == (1, 2) and r.live == (1,) and set(r.consoles) == {1}
    assert list(r.hub.writers) == [1]
    assert acc.reach(Grant("alice", 1, 1, None)).hub is r.hub  # one hub per allocation
    assert acc.mem_limit() == 256 * 1024 * 1024 - UBOOT_RESERVE


def test_open_ram_finds_the_nodes_memfd(svc):
    fd = os.memfd_create("memory-backend-memfd")
    try:
        os.ftruncate(fd, 1 << 20)
        svc.nodes.running[1] = Running(pid=os.getpid())  # this process holds the memfd
        acc = ServiceAccess(svc)  # type: ignore[arg-type]
        ram = acc.open_ram(Grant("alice", 1, None, None), 1)
        ram.write(0x100, b"kittyhawk")
        ram.close()
        assert os.pread(fd, 9, 0x100) == b"kittyhawk"
        assert svc.meter._loads == {1: 9}  # the meter counts what a load wrote (load_bytes)
        del svc.nodes.running[2]
        with pytest.raises(memload.LoadError, match="not running"):
            acc.open_ram(Grant("alice", 1, None, None), 2)
        with pytest.raises(Revoked, match="not in allocation 1"):
            acc.open_ram(Grant("alice", 1, None, None), 3)
    finally:
        os.close(fd)
