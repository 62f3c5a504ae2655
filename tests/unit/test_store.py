"""The store's transactions for changes that cross the state and the host: each is all or
nothing (issue 10, item 5)."""

from __future__ import annotations

import sqlite3
import time

import pytest

from kh.errors import KhError
from kh.model import Domain, DomainKind, NodeState
from kh.store import MIGRATIONS, SCHEMA, NodeRow, Store


@pytest.fixture
def st(tmp_path):
    s = Store(tmp_path / "kh.db")
    for n in (1, 2, 3):
        s.put_node(NodeRow(n, s.new_uid(), NodeState.FREE, 100 + n, None, "/w", time.time(),
                           None))
    yield s
    s.close()


def states(st: Store) -> dict[int, tuple[str, int | None]]:
    return {r.number: (r.state.value, r.alloc) for r in st.nodes()}


def test_configuring_is_all_or_none(st):
    st.node_failed(3, "QEMU exited")
    with pytest.raises(KhError):
        st.nodes_configuring([1, 3])
    assert states(st)[1] == ("free", None)
    st.nodes_configuring([1, 2])
    assert states(st) == {1: ("configuring", None), 2: ("configuring", None),
                          3: ("failed", None)}


def test_a_commit_that_fails_changes_nothing(st):
    st.add_principal("bob", b"s", b"h")
    st.add_domain(Domain(3, DomainKind.PRIVATE, "bob"))
    st.nodes_configuring([1])
    with pytest.raises(sqlite3.IntegrityError):  # domain 3 is taken: the last step fails
        st.commit_allocation("alice", (b"salt", b"hash"),
                             (Domain(4, DomainKind.PRIVATE, "alice"),
                              Domain(3, DomainKind.PRIVATE, "alice")), (4, 3), [1])
    assert st.principal("alice") is None and [d.netid for d in st.domains()] == [0, 1, 3]
    assert st.allocations() == [] and states(st)[1] == ("configuring", None)
    with pytest.raises(KhError):  # a node not being configured: nothing is committed either
        st.commit_allocation("alice", (b"salt", b"hash"), (), (1,), [1, 2])
    assert st.principal("alice") is None and st.allocations() == []
    a = st.commit_allocation("alice", (b"salt", b"hash"),
                             (Domain(4, DomainKind.PRIVATE, "alice"),), (1, 4), [1])
    assert st.principal("alice") == (b"salt", b"hash")
    assert st.allocation(a).netids == (1, 4)  # type: ignore[union-attr]
    assert states(st)[1] == ("allocated", a)


def test_dropping_nodes_releases_only_emptied_allocations(st):
    st.add_principal("alice", b"s", b"h")
    st.nodes_configuring([1, 2])
    a = st.commit_allocation("alice", None, (), (1,), [1, 2])
    st.nodes_releasing([1])
    assert st.drop_nodes([1]) == []
    assert st.allocation(a).released is None  # type: ignore[union-attr]
    assert st.nodes_of(a)[0].number == 2
    st.nodes_releasing([2])
    assert st.drop_nodes([2]) == [a]
    assert st.allocation(a).released is not None  # type: ignore[union-attr]
    assert [r.number for r in st.nodes()] == [3]


def test_forgetting_a_principal_leaves_the_others(st):
    for user, netid, node in (("alice", 3, 1), ("bob", 4, 2)):
        st.nodes_configuring([node])
        a = st.commit_allocation(user, (b"s", b"h"), (Domain(netid, DomainKind.PRIVATE, user),),
                                 (netid,), [node])
        st.add_key(user, "ssh-ed25519 AAAA", user, a)
    st.principal_removing("alice", [1])
    assert st.removing_principals() == ["alice"] and states(st)[1][0] == "releasing"
    gone = st.forget_principal("alice")
    assert gone == {"allocations": [1], "nodes": [1], "domains": [3], "keys": [1]}
    assert st.principal("alice") is None and st.removing_principals() == []
    assert [d.netid for d in st.domains()] == [0, 1, 4]
    assert [k[1] for k in st.keys(None)] == ["bob"]
    assert states(st) == {2: ("allocated", 2), 3: ("free", None)}
    assert [r["name"] for r in st.principals()] == ["bob"]


def test_a_version_3_state_gains_the_marks(tmp_path):
    db = tmp_path / "kh.db"
    con = sqlite3.connect(db)
    for statement in (SCHEMA + MIGRATIONS[2] + MIGRATIONS[3]).split(";"):
        if statement.strip():
            con.execute(statement)
    con.execute("INSERT INTO meta VALUES ('schema', '3')")
    con.execute("INSERT INTO meta VALUES ('next_uid', '5')")
    con.execute("INSERT INTO principals VALUES ('alice', x'00', x'00', 1.0)")
    con.execute("INSERT INTO nodes VALUES (4, 4, 'allocated', 9, NULL, '/w', 1.0, NULL, 0, "
                "NULL)")
    con.commit()
    con.close()
    st = Store(db)
    assert st.node(4).resetting is False  # type: ignore[union-attr]
    st.node_resetting(4, True)
    assert st.node(4).resetting is True  # type: ignore[union-attr]
    assert st.removing_principals() == []
    assert st.principals()[0]["name"] == "alice"
    st.close()
