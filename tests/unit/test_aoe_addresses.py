"""AoE addresses are unique per domain (issue 11): khd hands each disk node its shelf.slot
(POST /v1/aoe/addresses), records it with the node and frees it when the node is released.
Before, khgetdisk picked ids from a file in its own node, so two disk servers (or a disk the
principal booted by hand) handed out e1.0 twice in one domain."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kh.service import membership
from kh.service.aoe import MAX_SLOT, lowest_free
from tests.unit.fake_khd import (
    api_fixture,
    post,
    refill,
    service_fixture,
    text_of,
)

svc = service_fixture(nodes=6)
khd = api_fixture()


def call(sock, path: str, user: str, cred: str | None = None, **kw: Any) -> tuple[int, Any]:
    status, resp = post(sock, path + "?format=json", json.dumps(
        dict(user=user, credential=cred or user + "-cred", **kw)).encode())
    return status, json.loads(text_of(resp))


def take(sock, user: str, count: int, **kw: Any) -> tuple[int, list[int], list[int]]:
    """khget: (allocation, its nodes, its private domains)."""
    status, a = call(sock, "/v1/allocations", user, count=count, **kw)
    assert status == 201, a
    return (a["id"], [n["node"] for n in a["nodes"]],
            [n["netid"] for n in a["networks"] if n["kind"] == "private"])


def address(sock, user: str, node: int, netid: int, **kw: Any) -> tuple[int, Any]:
    return call(sock, "/v1/aoe/addresses", user, node=node, netid=netid, **kw)


def test_addresses_are_unique_per_domain_and_kept_per_node(khd):
    _, (n1, n2), (disknet,) = take(khd, "alice", 2, p=1)
    assert address(khd, "alice", n1, disknet) == (201, {
        "address": "e1.0", "netid": disknet, "shelf": 1, "slot": 0, "node": n1})
    assert address(khd, "alice", n2, disknet)[1]["address"] == "e1.1"
    # the same node asking again (a retried khgetdisk) gets its own address back
    assert address(khd, "alice", n1, disknet) == (200, {
        "address": "e1.0", "netid": disknet, "shelf": 1, "slot": 0, "node": n1})
    # ... but not a second one on another shelf of that domain: one disk per node
    status, err = address(khd, "alice", n1, disknet, shelf=2)
    assert status == 409 and "already has address e1.0" in err["error"], err
    # another domain has its own slots; another shelf too
    _, (n3, n4), (other,) = take(khd, "alice", 2, p=1)
    assert address(khd, "alice", n3, other)[1]["address"] == "e1.0"
    assert address(khd, "alice", n4, other, shelf=7)[1]["address"] == "e7.0"
    status, listed = call(khd, "/v1/aoe/addresses/list", "alice")
    assert status == 200 and [(a["address"], a["node"], a["netid"]) for a in listed] == [
        ("e1.0", n1, disknet), ("e1.1", n2, disknet), ("e1.0", n3, other),
        ("e7.0", n4, other)], listed
    status, listed = call(khd, "/v1/aoe/addresses/list", "alice", netid=other)
    assert [a["node"] for a in listed] == [n3, n4]


def test_slots_answering_already_are_avoided(khd):
    _, nodes, (disknet,) = take(khd, "alice", 3, p=1)
    # e1.0 and e1.2 answer on disknet already (disks the principal booted by hand)
    assert address(khd, "alice", nodes[0], disknet, avoid=[0, 2])[1]["slot"] == 1
    assert address(khd, "alice", nodes[1], disknet, avoid=[0, 2])[1]["slot"] == 3
    status, err = address(khd, "alice", nodes[2], disknet, avoid=list(range(MAX_SLOT + 1)))
    assert status == 409 and "shelf 1 of domain" in err["error"] and "no free slot" in \
        err["error"], err
    assert lowest_free({0, 1, 3}, {2}) == 4 and lowest_free(set(range(255)), set()) is None


def test_a_released_nodes_address_is_free_again(svc, khd):
    alloc, (n1, n2), (disknet,) = take(khd, "alice", 2, p=1)
    address(khd, "alice", n1, disknet)
    address(khd, "alice", n2, disknet)
    status, out = call(khd, f"/v1/allocations/{alloc}/release", "alice", nodes=[n1])
    assert status == 200, out
    refill(svc)  # the pool starts a fresh node (a new uid) where n1 was
    _, (n3,), _ = take(khd, "alice", 1, n=[disknet])
    assert address(khd, "alice", n3, disknet)[1]["address"] == "e1.0"
    status, listed = call(khd, "/v1/aoe/addresses/list", "alice", netid=disknet)
    assert sorted((a["address"], a["node"]) for a in listed) == [("e1.0", n3), ("e1.1", n2)]


def test_only_the_owner_of_an_allocated_node_in_that_domain_gets_one(svc, khd):
    _, (mine,), (disknet,) = take(khd, "alice", 1, p=1)
    _, (theirs,), _ = take(khd, "bob", 1, p=1)
    free = max(r.number for r in svc.store.nodes()) + 1
    # another principal's node looks exactly like a node that is not allocated
    s1, e1 = address(khd, "alice", theirs, disknet)
    s2, e2 = address(khd, "alice", free, disknet)
    assert s1 == s2 == 404
    assert e1["error"].replace(str(theirs), "N") == e2["error"].replace(str(free), "N")
    status, err = address(khd, "alice", mine, 1)  # not one of the node's domains
    assert status == 409 and f"node {mine} is not in domain 1" in err["error"], err
    assert address(khd, "alice", mine, disknet, cred="wrong")[0] == 403
    status, listed = call(khd, "/v1/aoe/addresses/list", "bob")
    assert status == 200 and listed == []


@pytest.mark.parametrize("body, words", [
    ({}, "`node` is required"),
    ({"node": 1}, "`netid` is required"),
    ({"node": 1, "netid": 3, "shelf": 65535}, "`shelf` must be between 0 and 65534"),
    ({"node": 1, "netid": 3, "avoid": [255]}, "`avoid` must be a list of integers from 0"),
    ({"node": "1", "netid": 3}, "`node` must be an integer"),
])
def test_malformed_requests_are_400(khd, body, words):
    status, err = call(khd, "/v1/aoe/addresses", "alice", **body)
    assert status == 400 and words in err["error"], err


def test_a_node_that_joined_a_domain_gets_one_there_and_leaving_frees_it(svc, khd):
    """Domains change while nodes run (kh domain join/leave): the node's own slot map counts,
    not its allocation's domains. The map is set here as a join and a leave leave it."""
    _, (n1, n2), (d1,) = take(khd, "alice", 2, p=1)
    _, _, (d2,) = take(khd, "alice", 1, p=1)
    status, err = address(khd, "alice", n1, d2)
    assert status == 409 and f"not in domain {d2}" in err["error"], err
    membership.put_map(svc.store, n1, (d1, d2))  # n1 joined d2 on eth1
    assert address(khd, "alice", n1, d2)[1]["address"] == "e1.0"
    membership.put_map(svc.store, n2, (d1, d2))
    assert address(khd, "alice", n2, d2)[1]["address"] == "e1.1"
    membership.put_map(svc.store, n1, (d1,))  # n1 left d2: its address there is free again
    status, listed = call(khd, "/v1/aoe/addresses/list", "alice", netid=d2)
    assert [(a["address"], a["node"]) for a in listed] == [("e1.1", n2)], listed
    membership.put_map(svc.store, n1, (d1, d2))  # ... and back: the lowest free slot
    assert address(khd, "alice", n1, d2)[1]["address"] == "e1.0"
