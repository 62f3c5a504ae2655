"""Issue 16, hosts and placement: the pure parts (placement, pool numbers, what `kh host add`
is given, the runner derived from a qemu+ssh URI), the registry in the state, the text object's
host, the API's operator-only endpoints and bad input, and the fabric across hosts (which
domains are stretched over which hosts) with stand-in sides. No root, no libvirt."""

from __future__ import annotations

import sqlite3
import time

import pytest

from kh import textobj
from kh.admission import AuthError
from kh.allocation import AllocationError, Request
from kh.errors import KhError, UsageError
from kh.hw import span
from kh.hw.fabric import Fabric
from kh.hw.stretch import Made, StretchError, Underlay
from kh.hw.tags import FabricConfig
from kh.model import AllocationInfo, Domain, DomainKind, NodeInfo, NodeState
from kh.service import api, hostspec, placement
from kh.service.core import NotFound
from kh.service.hostfabric import Far, HostFabric
from kh.service.hosts import HostRefused
from kh.service.hostspec import HostSpec
from kh.service.multibackend import MultiBackend
from kh.service.request import Caller
from kh.store import NodeRow, Store
from kh.store_hosts import HostRow
from kh.store_schema import MIGRATIONS, SCHEMA
from tests.unit.fake_khd import make_service

OPERATOR = Caller("unix:uid=0", True)
ALICE = Caller("loopback", False)


# -- placement ------------------------------------------------------------------------------
FREE = {"local": [1, 2], "b": [5, 6, 7], "c": [9]}
ORDER = ["local", "b", "c"]


def test_fill_takes_this_host_first_then_the_hosts_in_order():
    assert placement.place(FREE, ORDER, 1) == [1]
    assert placement.place(FREE, ORDER, 3) == [1, 2, 5]
    assert placement.place(FREE, ORDER, 6) == [1, 2, 5, 6, 7, 9]


def test_spread_goes_round_the_hosts():
    assert placement.place(FREE, ORDER, 3, "spread") == [1, 5, 9]
    assert placement.place(FREE, ORDER, 5, "spread") == [1, 2, 5, 6, 9]


def test_a_pin_takes_only_that_hosts_nodes():
    assert placement.place(FREE, ORDER, 2, pin="b") == [5, 6]
    assert placement.place(FREE, ORDER, 1, "spread", pin="local") == [1]


def test_a_pin_to_an_unknown_host_or_one_too_small_is_one_line():
    with pytest.raises(placement.UnknownHost, match=r"^no host d \(kh host list"):
        placement.place(FREE, ORDER, 1, pin="d")
    with pytest.raises(AllocationError, match=r"^host c has 1 free node, 2 asked for "):
        placement.place(FREE, ORDER, 2, pin="c")
    with pytest.raises(AllocationError, match="6 free nodes on all hosts, 7 asked for"):
        placement.place(FREE, ORDER, 7)


def test_the_policy_is_the_service_settings_one():
    from kh.service.config import ServiceConfig
    assert placement.POLICIES == ("fill", "spread")
    with pytest.raises(UsageError, match="must be fill or spread"):
        ServiceConfig(state_dir=__import__("pathlib").Path("/x"),
                      images=__import__("pathlib").Path("/x"), placement="random")


def test_the_pool_numbers_nodes_globally_per_host():
    # nothing yet: local's 2, then b's 3, each the lowest number free
    assert placement.pool_starts([], {"local": 2, "b": 3}) == [
        (1, "local"), (2, "local"), (3, "b"), (4, "b"), (5, "b")]
    rows = [(1, "local", True), (2, "b", True), (4, "local", False)]  # 4 died allocated
    assert placement.pool_starts(rows, {"local": 2, "b": 2}) == [(3, "local"), (5, "b")]
    # a host no longer in the sizes (removed) holds numbers but no place
    assert placement.pool_starts([(1, "gone", True)], {"local": 1}) == [(2, "local")]


# -- what kh host add is given -----------------------------------------------------------------
URI = ("qemu+ssh://root@hostb:2200/system?command=/tmp/t/ssh&keyfile=/tmp/t/key&no_verify=1"
       "&no_tty=1")


def test_the_runner_is_derived_from_a_qemu_ssh_uri():
    assert hostspec.runner_from_uri(URI) == (
        "/tmp/t/ssh", "-T", "-o", "BatchMode=yes", "-p", "2200", "-l", "root", "-i",
        "/tmp/t/key", "-o", "StrictHostKeyChecking=no", "hostb", "--")
    assert hostspec.runner_from_uri("qemu+ssh://h/system") == (
        "ssh", "-T", "-o", "BatchMode=yes", "h", "--")
    assert hostspec.runner_from_uri("qemu:///system") == ()
    assert hostspec.runner_from_uri("qemu+unix:///system?socket=/x/sock") == ()


@pytest.mark.parametrize("uri, says", [
    ("", "is malformed"), ("http://h/system", "scheme 'http'"),
    ("qemu+ssh://root:pw@h/system", "holds a password"), ("qemu+ssh://h/session", "/system"),
    ("qemu+ssh:///system", "names no host"), ("qemu+ssh://h:99999999/system", "port"),
    ("qemu+ssh://h/system?x=1 2", "is malformed"), ("qemu:///system" + "x" * 1100, "malformed"),
])
def test_a_malformed_uri_is_one_line(uri, says):
    with pytest.raises(UsageError, match=says):
        hostspec.parse_uri(uri)


def test_names_and_runner_words_are_checked():
    for bad in ("local", "B", "1a", "a" * 17, "a b", "a/b", ""):
        with pytest.raises(UsageError):
            hostspec.check_name(bad)
    assert hostspec.check_name("host-b2") == "host-b2"
    assert hostspec.runner_words("ssh -i '/k ey' h --") == ("ssh", "-i", "/k ey", "h", "--")
    with pytest.raises(UsageError, match="key material"):
        hostspec.runner_words(["ssh", "-----BEGIN OPENSSH PRIVATE KEY-----"])
    with pytest.raises(UsageError, match="at most 32 words"):
        hostspec.runner_words(["x"] * 33)
    with pytest.raises(UsageError, match="not a word"):
        hostspec.runner_words(["ssh", "a\nb"])


def test_check_fills_the_defaults_and_refuses_bad_values():
    s = hostspec.check(HostSpec("b", URI), "kh")
    assert (s.prefix, s.kh, s.runner[0]) == ("kh", "kh", "/tmp/t/ssh")
    assert hostspec.check(HostSpec("b", URI, runner=("env",)), "kh").runner == ("env",)
    for bad, says in ((HostSpec("b", URI, capacity=0), "capacity 0"),
                      (HostSpec("b", URI, underlay="127.0.0.1"), "cannot be a host's underlay"),
                      (HostSpec("b", URI, underlay="x"), "not an IPv4 address"),
                      (HostSpec("b", URI, prefix="K"), "prefix 'K' is malformed")):
        with pytest.raises(UsageError, match=says):
            hostspec.check(bad, "kh")


def test_capacity_probed_from_free_memory():
    gib = 1 << 30
    assert hostspec.probed_capacity(1 * gib, 256) == 0  # all of it kept for the host
    assert hostspec.probed_capacity(2 * gib, 256) == 3  # 1024 MiB left / 320
    assert hostspec.probed_capacity(1000 * gib, 256) == hostspec.PROBED_MAX


# -- the registry in the state -----------------------------------------------------------------
def row(name: str = "b") -> HostRow:
    return HostRow(name, "qemu+ssh://h/system", 2, "192.0.2.2", "khul0", 1500, "kb", "kh",
                   ("ssh", "h", "--"))


def test_hosts_are_kept_in_the_order_added_and_nodes_name_theirs(tmp_path):
    st = Store(tmp_path / "kh.db")
    a = st.add_host(row("b"))
    st.add_host(row("a"))
    assert [h.name for h in st.hosts()] == ["b", "a"] and a.seq == 1
    assert st.host("b") == a and st.host("b").runner == ("ssh", "h", "--")
    with pytest.raises(KhError, match="host b is already added"):
        st.add_host(row("b"))
    st.put_node(NodeRow(7, st.new_uid(), NodeState.FREE, 1, None, "/w", 0.0, None, host="b"))
    st.put_node(NodeRow(8, st.new_uid(), NodeState.FREE, 1, None, "/w", 0.0, None))
    assert st.node(7).host == "b" and st.node(8).host == "local"
    assert st.node_hosts() == {7: "b", 8: "local"}
    assert st.remove_host("b") == [7]
    assert st.host("b") is None and st.node(7) is None and st.node(8) is not None


def test_a_host_with_an_allocated_node_is_not_forgotten(tmp_path):
    st = Store(tmp_path / "kh.db")
    st.add_host(row())
    st.put_node(NodeRow(7, st.new_uid(), NodeState.FREE, 1, None, "/w", 0.0, None, host="b"))
    st.nodes_configuring([7])
    with pytest.raises(KhError, match=r"host b has 1 allocated node \(7\)"):
        st.remove_host("b")
    assert st.host("b") is not None and st.node(7) is not None


def test_a_state_of_schema_7_gets_hosts_and_its_nodes_are_local(tmp_path):
    db = sqlite3.connect(tmp_path / "kh.db")
    for statement in SCHEMA.split(";"):
        if statement.strip():
            db.execute(statement)
    for v in range(2, 8):
        for statement in MIGRATIONS[v].split(";"):
            if statement.strip():
                db.execute(statement)
    db.execute("INSERT INTO meta VALUES ('schema', '7')")
    db.execute("INSERT INTO meta VALUES ('next_uid', '2')")
    db.execute("INSERT INTO nodes (number, uid, state, workdir, started) "
               "VALUES (1, 1, 'free', '/w', 0)")
    db.commit()
    db.close()
    st = Store(tmp_path / "kh.db")
    assert st.node(1).host == "local" and st.hosts() == []


# -- the text object ---------------------------------------------------------------------------
def alloc(*nodes: NodeInfo) -> AllocationInfo:
    return AllocationInfo(4, "127.0.0.1", (Domain(3, DomainKind.PRIVATE, "alice"),), nodes)


def test_the_text_object_names_a_nodes_other_host_and_reads_as_before_on_one():
    one = alloc(NodeInfo(1, 1, "10.3.0.1"))
    assert textobj.format(one).splitlines()[3] == "nodeinfo: 1 1 10.3.0.1"  # as before
    two = alloc(NodeInfo(1, 1, "10.3.0.1"), NodeInfo(7, 9, "10.3.0.7", "hostb"),
                NodeInfo(8, 10, "", "hostb"))
    text = textobj.format(two)
    assert "nodeinfo: 7 9 10.3.0.7 hostb\n" in text and "nodeinfo: 8 10 - hostb\n" in text
    back = textobj.parse(text)
    assert back.nodes == two.nodes
    assert [n["host"] for n in textobj.to_json(two)["nodes"]] == ["local", "hostb", "hostb"]
    old = "con4@127.0.0.1\nprotocol: uboot\nnetwork 3 : eth0\nnodeinfo: 2 2 10.3.0.2\nnodes: 2\n"
    assert textobj.parse(old).nodes == (NodeInfo(2, 2, "10.3.0.2", "local"),)
    with pytest.raises(UsageError, match="not understood"):
        textobj.parse(old.replace("10.3.0.2", "10.3.0.2 Host!"))


# -- the service and its API -------------------------------------------------------------------
@pytest.fixture
def svc(tmp_path, monkeypatch):
    s = make_service(tmp_path, monkeypatch, nodes=3)
    yield s
    s.store.close()


def test_hosts_are_the_operators_alone(svc):
    for fn, args in ((api.hosts.route_list, ()), (api.hosts.route_add, ()),
                     (api.hosts.route_remove, ("b",))):
        with pytest.raises(AuthError, match="is the operator's"):
            fn(svc, ALICE, {"name": "b", "uri": URI}, *args)


def served(svc, method: str, path: str, caller: Caller, body: dict | None = None):
    """One request through the API app (status, its JSON)."""
    import io
    import json
    raw = json.dumps(body or {}).encode()
    env = {"REQUEST_METHOD": method, "REQUEST_URI": path, "QUERY_STRING": "format=json",
           "kh.caller": caller, "CONTENT_LENGTH": str(len(raw)) if method == "POST" else "",
           "CONTENT_TYPE": "application/json", "wsgi.input": io.BytesIO(raw)}
    got = {}
    out = api.App(svc)(env, lambda status, headers: got.setdefault("status", status))
    return int(got["status"].split()[0]), json.loads(b"".join(out))


def test_bad_host_input_is_a_4xx_line_never_500(svc):
    for body, code in (({"name": "local", "uri": URI}, 400), ({"name": "b", "uri": "x"}, 400),
                       ({"name": "b", "uri": URI, "capacity": 0}, 400),
                       ({"name": "b", "uri": URI, "capacity": "2"}, 400),
                       ({"name": "b", "uri": URI, "runner": "ssh"}, 400),
                       ({"name": "b", "uri": URI, "runner": [1]}, 400),
                       ({"name": ["b"], "uri": URI}, 400),
                       ({"name": "b", "uri": URI, "color": "red"}, 400),
                       ({"name": "b", "uri": URI, "underlay": 5}, 400)):
        status, data = served(svc, "POST", "/v1/hosts", OPERATOR, body)
        assert status == code, (body, data)
        assert "\n" not in data["error"]
    assert served(svc, "POST", "/v1/hosts/nohost/remove", OPERATOR)[0] == 404
    assert served(svc, "POST", "/v1/hosts/No!/remove", OPERATOR)[0] == 400
    status, data = served(svc, "GET", "/v1/hosts", OPERATOR)
    assert status == 200 and [h["name"] for h in data] == ["local"]
    assert (data[0]["capacity"], data[0]["free"], data[0]["state"]) == (3, 3, "up")


def test_a_host_that_fails_a_check_is_one_line_and_nothing_is_recorded(svc, tmp_path):
    # the runner answers nothing a kh would: refused, naming the host; nothing recorded
    fake = tmp_path / "farkh"
    fake.write_text("#!/bin/sh\necho 'kh: host b: kh fabric says no' >&2\nexit 1\n")
    fake.chmod(0o755)
    status, data = served(svc, "POST", "/v1/hosts", OPERATOR,
                          {"name": "b", "uri": "qemu:///system", "kh": str(fake)})
    assert (status, data["error"]) == (409, "host b: kh fabric says no")
    fake.write_text("#!/bin/sh\necho '[]'\n")
    status, data = served(svc, "POST", "/v1/hosts", OPERATOR,
                          {"name": "b", "uri": "qemu:///system", "kh": str(fake)})
    assert (status, data["error"]) == (409, "host b: kh's fabric there has no underlay")
    fake.write_text("#!/bin/sh\necho '[{\"ifname\": \"kbul0\", \"address\": \"192.0.2.2\", "
                    "\"mtu\": 1500}]'\n")
    status, data = served(svc, "POST", "/v1/hosts", OPERATOR,
                          {"name": "b", "uri": "qemu:///system", "kh": str(fake),
                           "underlay": "192.0.2.9"})
    assert status == 409 and data["error"] == "host b: no underlay there holds 192.0.2.9"
    assert svc.store.hosts() == []


def test_khget_pinned_to_an_unknown_host_is_404_and_to_a_full_one_409(svc):
    base = {"user": "alice", "credential": "alice-secret", "count": 1}
    assert served(svc, "POST", "/v1/allocations", ALICE, {**base, "host": "b"})[0] == 404
    assert served(svc, "POST", "/v1/allocations", ALICE, {**base, "host": "B!"})[0] == 400
    status, data = served(svc, "POST", "/v1/allocations", ALICE,
                          {**base, "count": 4, "host": "local"})
    assert status == 409 and data["error"] == "host local has 3 free nodes, 4 asked for"
    a = svc.khget(Request(user="alice", count=2, host="local"), "alice-secret")
    assert [n.host for n in a.nodes] == ["local", "local"]


def test_removing_a_host_with_an_allocated_node_is_refused(svc):
    svc.store.add_host(row("b"))
    svc.store.put_node(NodeRow(9, svc.store.new_uid(), NodeState.FREE, 1, None, "/w",
                               time.time(), None, host="b"))
    svc.store.nodes_configuring([9])
    with pytest.raises(HostRefused, match=r"^host b has 1 allocated node \(9\) \(release"):
        svc.hosts.remove("b")
    with pytest.raises(NotFound):
        svc.hosts.remove("c")
    assert svc.store.host("b") is not None


# -- one backend per host ----------------------------------------------------------------------
class FakeBackend:
    name = "qemu"

    def __init__(self, fabric: object = None) -> None:
        self.running: dict[int, object] = {}
        self.fabric = fabric
        self.calls: list[tuple[str, int]] = []

    def stop(self, number: int) -> None:
        self.calls.append(("stop", number))
        self.running.pop(number, None)

    def uboot(self, number: int, line: str, timeout: float = 10.0) -> str:
        self.calls.append(("uboot", number))
        return ""


def test_each_node_goes_to_its_hosts_backend():
    hosts = {1: "local", 7: "b", 8: "c"}
    local, b = FakeBackend(), FakeBackend()
    m = MultiBackend(local, lambda n: hosts.get(n, "local"))  # type: ignore[arg-type]
    m.add("b", b)  # type: ignore[arg-type]
    local.running[1] = "n1"
    b.running[7] = "n7"
    assert dict(m.running) == {1: "n1", 7: "n7"} and 7 in m.running
    m.uboot(7, "x")
    m.uboot(1, "x")
    assert b.calls == [("uboot", 7)] and local.calls == [("uboot", 1)]
    with pytest.raises(KhError, match="node 8: its host c is not connected"):
        m.uboot(8, "x")
    stopped: list[int] = []
    m.stopped.append(stopped.append)
    m.stop(7)
    assert b.calls[-1] == ("stop", 7) and stopped == [7] and 7 not in m.running
    m.remove("b")
    b.running[7] = "n7"
    assert 7 not in m.running


# -- the fabric across hosts -------------------------------------------------------------------
class FakeSide:
    """A host's side of stretched domains: what is stretched there, with which peers."""

    def __init__(self, host: str, address: str, refuse: bool = False) -> None:
        self.host, self.refuse = host, refuse
        self.domains: dict[int, list[str]] = {}
        self.side = span.Side(host, Underlay("ul0", address), self.ensure, self.remove)

    def ensure(self, netid: int, peers):  # type: ignore[no-untyped-def]
        if self.refuse:
            raise StretchError(f"host {self.host}: VXLAN port 4789 is taken")
        new = netid not in self.domains
        self.domains[netid] = sorted(p.host for p in peers)
        return Made(new, False)

    def remove(self, netid: int, bridge: bool) -> None:
        self.domains.pop(netid, None)


class FarFabric:
    def __init__(self) -> None:
        self.wired: dict[int, list[int | None]] = {}

    def wire(self, node: int, netids):  # type: ignore[no-untyped-def]
        self.wired[node] = list(netids)
        return []


@pytest.fixture
def fabrics(monkeypatch):
    hosts = {1: "local", 2: "local", 7: "b", 8: "b"}
    f = HostFabric(FabricConfig(prefix="kt"), host_of=lambda n: hosts[n])
    plugged: dict[tuple[int, int], int | None] = {}
    monkeypatch.setattr(Fabric, "attach", lambda self, n, s, x: plugged.__setitem__((n, s), x))
    here, far = FakeSide("local", "192.0.2.1"), FakeSide("b", "192.0.2.2")
    monkeypatch.setattr(f, "local_underlay", lambda: (here.side.underlay, 1500))
    monkeypatch.setattr(span, "local", lambda fabric, underlay, host: here.side)
    farfab = FarFabric()
    f.add_host("b", Far(farfab, far.side, 1550))  # type: ignore[arg-type]
    return f, here, far, farfab, plugged


def test_a_domain_is_stretched_exactly_while_it_spans_hosts(fabrics):
    f, here, far, farfab, plugged = fabrics
    f.wire(1, [3])
    assert plugged[(1, 0)] == 3 and here.domains == {} and f.mtu([3]) is None
    f.wire(7, [3, None, 4])
    assert farfab.wired[7] == [3, None, 4, None]
    assert here.domains == {3: ["b"]} and far.domains == {3: ["local"]}
    assert f.stretched == {3: ("local", "b")}
    assert f.mtu([3]) == 1450 and f.mtu([4]) is None  # the smaller underlay's less 50
    f.attach(7, 0, None)  # node 7 leaves domain 3: back on one host
    assert here.domains == {} and far.domains == {} and f.stretched == {}
    f.attach(7, 1, 3)
    assert f.stretched == {3: ("local", "b")}
    f.forget(7)  # released: its domains forget it
    assert f.stretched == {} and far.domains == {}


def test_a_host_that_refuses_leaves_no_stretch_and_no_record(fabrics):
    f, here, far, _, _ = fabrics
    far.refuse = True
    f.wire(1, [3])
    with pytest.raises(StretchError, match="host b: VXLAN port 4789 is taken"):
        f.plan({7: [3]})
    assert here.domains == {} and f.stretched == {} and 7 not in f.where
    far.refuse = False
    f.plan({7: [3], 8: [3]})
    assert f.stretched == {3: ("local", "b")} and f.mtu([3]) == 1450


def test_khds_start_stretches_what_the_state_says(fabrics):
    f, here, far, _, _ = fabrics
    faults = f.load({1: {0: 3, 1: 5}, 7: {0: 3}, 8: {0: 5, 1: 6}})
    assert faults == [] and f.stretched == {3: ("local", "b"), 5: ("local", "b")}
    assert sorted(far.domains) == [3, 5] and 6 not in here.domains


def test_a_host_down_at_khds_start_is_listed_down_and_fails_only_its_nodes(svc):
    pytest.importorskip("libvirt")
    dead = HostRow("b", "qemu+unix:///system?socket=/nonexistent/kh-test-sock", 2, "192.0.2.2",
                   "kbul0", 1500, "kb", "kh", ())
    svc.store.add_host(dead)
    svc.store.put_node(NodeRow(9, svc.store.new_uid(), NodeState.FREE, 1, None, "/w",
                               time.time(), None, host="b"))
    svc.hosts.connect_all()  # before: no check, so the pool's adopt raised at khd's start
    listed = {h["name"]: h for h in svc.hosts.list()}
    assert listed["b"]["state"].startswith("down: ") and "b" in listed["b"]["state"]
    assert "b" not in svc.nodes.remote and "b" not in svc.hosts.sizes()
    assert svc.nodes.reattach(9, 1) is None and svc.nodes.kill_recorded(9, 1) is False
    svc.nodes.stop(9)  # nothing of it runs here: nothing local is touched


def test_a_host_that_stops_answering_fails_only_a_cleanup_not_khd():
    class Dead(FakeBackend):
        def kill_recorded(self, number: int, pid: int | None) -> bool:
            raise KhError("lost libvirt host b")

    m = MultiBackend(FakeBackend(), lambda n: "b")  # type: ignore[arg-type]
    m.add("b", Dead())  # type: ignore[arg-type]
    assert m.kill_recorded(9, 1) is False


def test_removing_an_idle_host_stops_its_nodes_and_leaves_nothing_of_kh_there(svc):
    calls: list[tuple] = []

    class Remote(FakeBackend):
        def abort_starts(self, wait: float | None = None) -> None:
            calls.append(("abort", wait))

        def stop(self, number: int) -> None:
            calls.append(("stop", number))
            self.running.pop(number, None)

        def stop_orphans(self) -> list[str]:  # a domain a start cut short left there
            calls.append(("orphans",))
            return ["destroyed libvirt domain kb-node11 on b: the state did not know it"]

        def detach_all(self) -> None:
            calls.append(("detach",))

    class Taps(FarFabric):
        def unwire(self, node: int, slots: int) -> None:
            calls.append(("unwire", node, slots))

    svc.store.add_host(row("b"))
    for n in (9, 10):
        svc.store.put_node(NodeRow(n, svc.store.new_uid(), NodeState.FREE, 1, None, "/w",
                                   time.time(), None, host="b"))
    remote = Remote()
    remote.running[9] = "n9"
    svc.nodes.add("b", remote)  # type: ignore[arg-type]
    far = Far(Taps(), FakeSide("b", "192.0.2.2").side, 1500)  # type: ignore[arg-type]
    svc.fabric.add_host("b", far)
    assert svc.hosts.sizes() == {"local": 3, "b": 2}
    assert svc.hosts.remove("b") == {"removed": "b", "nodes": [9, 10]}
    assert calls == [("abort", 60.0), ("stop", 9), ("unwire", 9, 4), ("stop", 10),
                     ("unwire", 10, 4), ("orphans",), ("detach",)]
    assert svc.store.host("b") is None and svc.store.node(9) is None
    assert "b" not in svc.nodes.remote and "b" not in svc.fabric.far
    assert [h["name"] for h in svc.hosts.list()] == ["local"]


def test_ps_names_a_nodes_other_host_and_counts_every_hosts_pool(svc):
    svc.store.add_host(row("b"))
    svc.store.put_node(NodeRow(9, svc.store.new_uid(), NodeState.FREE, 1, None, "/w",
                               time.time(), None, host="b"))
    svc.nodes.add("b", FakeBackend())  # type: ignore[arg-type]
    data = svc.ps()
    assert {n["node"]: n["host"] for n in data["nodes"]} == {1: "local", 2: "local",
                                                              3: "local", 9: "b"}
    assert data["pool"]["size"] == 5  # local's 3 and b's capacity of 2
    table = api.ps_table(data).splitlines()
    assert table[4].split()[0] == "9" and table[4].endswith("on host b")
    assert not table[1].endswith("on host local")


def test_khd_takes_a_bounded_number_of_hosts(svc, monkeypatch):
    from kh.service import hosts as hosts_mod
    monkeypatch.setattr(hosts_mod, "MAX_HOSTS", 2)
    svc.store.add_host(row("b"))
    svc.store.add_host(row("c"))
    status, data = served(svc, "POST", "/v1/hosts", OPERATOR, {"name": "d", "uri": URI})
    assert (status, data["error"]) == (409, "host d: khd has 2 hosts already, the most it takes")


def test_kh_clean_takes_kh_libvirtds_log_too(tmp_path):
    from kh.service import statedir
    from kh.service.config import ServiceConfig
    cfg = ServiceConfig(state_dir=tmp_path, images=tmp_path)
    assert statedir.is_kh_file(cfg, cfg.logs / "libvirtd.log")  # before: kept for good
    assert not statedir.is_kh_file(cfg, cfg.logs / "libvirtd.log.x")


def test_the_live_page_counts_every_hosts_pool(svc):
    from kh.page.content import ServiceSource
    svc.store.add_host(row("b"))
    svc.nodes.add("b", FakeBackend())  # type: ignore[arg-type]
    assert ServiceSource(svc).view(None)["pool"]["size"] == 5  # before: 3, local's alone


def test_a_hosts_kh_fabric_commands_run_a_few_at_a_time(monkeypatch):
    """khget of 16 nodes on one host wires them side by side; an sshd drops unauthenticated
    connections past a few per source (dropbear: 5), so khd runs at most MAX_REMOTE there."""
    import threading
    import types
    from concurrent.futures import ThreadPoolExecutor
    now, most = [0], [0]
    lock = threading.Lock()

    def run(argv, timeout, what, limit=None):  # type: ignore[no-untyped-def]
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        time.sleep(0.05)
        with lock:
            now[0] -= 1
        return types.SimpleNamespace(
            stdout='{"taps": ["kb1s0"], "made": {"device": 1, "bridge": 0}}')

    monkeypatch.setattr(span.proc, "run", run)
    gate = span.host_gate()
    rf = span.RemoteFabric(["ssh", "h", "--"], "kb", "b", gate=gate)
    side = span.remote(["ssh", "h", "--"], "kb", Underlay("kbul0", "192.0.2.2"), "b", gate=gate)
    peer = [span.Peer("local", "192.0.2.1")]
    with ThreadPoolExecutor(12) as ex:
        list(ex.map(lambda n: rf.wire(n, [3]) if n % 2 else side.ensure(3, peer), range(24)))
    assert most[0] == span.MAX_REMOTE == 4


def test_a_host_is_added_once_not_twice_under_two_names(svc, tmp_path, monkeypatch):
    from kh.hw import underlay
    fake = tmp_path / "farkh"
    fake.write_text("#!/bin/sh\necho '[{\"ifname\": \"kbul0\", \"address\": \"192.0.2.2\", "
                    "\"mtu\": 1500}]'\n")
    fake.chmod(0o755)
    monkeypatch.setattr(svc.fabric, "local_underlay",
                        lambda: (Underlay("kuul0", "192.0.2.1"), 1500))
    monkeypatch.setattr(underlay, "check_reaches", lambda *a: 1500)
    monkeypatch.setattr(svc.hosts, "_probe", lambda spec: spec.capacity or 2)
    connected: list[str] = []
    monkeypatch.setattr(svc.hosts, "_connect", lambda row, check=False: connected.append(row.name))
    status, data = served(svc, "POST", "/v1/hosts", OPERATOR,
                          {"name": "b", "uri": "qemu:///system", "kh": str(fake), "prefix": "kb"})
    assert status == 201, data
    assert (data["name"], data["capacity"], data["underlay"], data["underlay_interface"],
            data["runner"]) == ("b", 2, "192.0.2.2", "kbul0", [])
    for body in ({"uri": "qemu:///system", "prefix": "kb"},  # same URI and prefix
                 {"uri": "qemu+unix:///system?socket=/x", "prefix": "kc"}):  # same underlay
        status, data = served(svc, "POST", "/v1/hosts", OPERATOR,
                              {"name": "c", "kh": str(fake), **body})
        assert status == 409 and data["error"].startswith("host c is host b again"), data
    assert [h.name for h in svc.store.hosts()] == ["b"] and connected == ["b"]
