"""Issue 10, finding 7: a used private domain can be removed, wholly or not at all; a domain in
use is refused with 409; freed ids are given out again; a principal's private domains are
bounded by a quota whose refusal names it."""

from __future__ import annotations

import json

from kh.model import Domain, DomainKind
from kh.store import Store
from tests.unit.fake_khd import (
    api_fixture,
    post,
    refill,
    service_fixture,
    text_of,
)


def body(**kw: object) -> bytes:
    return json.dumps(kw).encode()


svc = service_fixture(domain_quota=3)
khd = api_fixture()


def khget(sock, user: str, **kw: object) -> dict:
    status, resp = post(sock, "/v1/allocations?format=json",
                        body(user=user, credential=user + "-cred", **kw))
    assert status == 201, resp
    return json.loads(text_of(resp))


def release(sock, user: str, alloc: int) -> None:
    status, resp = post(sock, f"/v1/allocations/{alloc}/release",
                        body(user=user, credential=user + "-cred"))
    assert status == 200, resp


def domain_rm(sock, user: str, netid: int) -> tuple[int, str]:
    status, resp = post(sock, f"/v1/domains/{netid}/remove",
                        body(user=user, credential=user + "-cred"))
    return status, text_of(resp)


def private(a: dict) -> list[int]:
    return [n["netid"] for n in a["networks"] if n["kind"] == "private"]


def test_a_used_domain_is_removed_after_release(svc, khd):
    a = khget(khd, "alice")
    (netid,) = private(a)
    assert netid in svc.fake_fabric.bridges
    release(khd, "alice", a["id"])
    assert domain_rm(khd, "alice", netid) == (200, f"domain {netid} removed\n")
    assert netid not in {d.netid for d in svc.store.domains()}
    assert netid not in svc.fake_fabric.bridges
    assert domain_rm(khd, "alice", netid)[0] == 404  # and only once
    refill(svc)
    b = khget(khd, "alice")  # the next plain khget makes a domain afresh, with its bridge
    assert private(b)[0] in svc.fake_fabric.bridges


def test_a_domain_in_use_is_refused_and_nothing_changes(svc, khd):
    a = khget(khd, "alice")
    (netid,) = private(a)
    status, text = domain_rm(khd, "alice", netid)
    assert status == 409 and "still has allocated nodes" in text
    assert netid in {d.netid for d in svc.store.domains()} and netid in svc.fake_fabric.bridges
    assert domain_rm(khd, "bob", netid)[0] == 403  # bob registers nothing by trying
    assert svc.store.principal("bob") is None


def test_removal_is_all_or_nothing(svc, khd):
    a = khget(khd, "alice")
    (netid,) = private(a)
    release(khd, "alice", a["id"])

    def broken(db_netid: int) -> bool:
        raise OSError("disk full")

    # the state cannot change: the bridge stays, and the domain keeps working
    svc.store.remove_domain = broken  # type: ignore[method-assign]
    assert domain_rm(khd, "alice", netid)[0] == 500
    assert netid in svc.fake_fabric.bridges
    del svc.store.remove_domain
    refill(svc)
    b = khget(khd, "alice")
    assert private(b) == [netid]
    release(khd, "alice", b["id"])
    # the bridge cannot go: the state has changed, so the removal stands, and the bridge goes
    # when the fabric is brought to the state again (khd's start)
    svc.fake_fabric.fail_remove = True
    assert domain_rm(khd, "alice", netid)[0] == 200
    assert netid not in {d.netid for d in svc.store.domains()}
    assert netid in svc.fake_fabric.bridges
    svc.sync_fabric()
    assert netid not in svc.fake_fabric.bridges


def test_freed_ids_are_given_out_again(svc, khd):
    svc.store.add_principal("old", b"s", b"h")
    svc.store.add_domain(Domain(253, DomainKind.PRIVATE, "old"))  # the highest id there is
    a = khget(khd, "alice")
    assert private(a) == [3]  # the lowest free id, not max + 1
    release(khd, "alice", a["id"])
    assert domain_rm(khd, "alice", 3)[0] == 200
    refill(svc)
    assert private(khget(khd, "bob")) == [3]


def test_the_private_domain_quota(svc, khd):
    a = khget(khd, "alice", p=3)  # quota 3 in this khd
    assert len(private(a)) == 3
    refill(svc)
    status, resp = post(khd, "/v1/allocations", body(user="alice", credential="alice-cred",
                                                     p=1))
    text = text_of(resp)
    assert status == 409 and "private-domain quota of 3" in text and "domain-quota" in text
    assert len([d for d in svc.store.domains() if d.owner == "alice"]) == 3
    # bob has a quota of his own
    assert len(private(khget(khd, "bob", p=2))) == 2


def test_store_removal_keeps_released_history_consistent(tmp_path):
    st = Store(tmp_path / "kh.db")
    st.add_principal("alice", b"s", b"h")
    st.add_domain(Domain(3, DomainKind.PRIVATE, "alice"))
    live = st.add_allocation("alice", (3,))
    assert st.remove_domain(3) is False  # in use: nothing changes
    assert st.allocation(live).netids == (3,)  # type: ignore[union-attr]
    st.release_allocation(live)
    assert st.remove_domain(3) is True
    assert [d.netid for d in st.domains()] == [0, 1]
    assert st.allocation(live).netids == ()  # type: ignore[union-attr]
    st.close()
