"""A principal sees only its own things: another principal's allocation, node or private
domain is answered exactly as one that does not exist (same status, same words but the
number), so that its existence is not told. Before, release, reset and `kh domain rm` of
another's answered 403 "belongs to another principal" where a missing one was 404, and khget
`-n` of another's domain said so where a missing one "does not exist"."""

from __future__ import annotations

import json
import re

from tests.unit.fake_khd import api_fixture, post, service_fixture, text_of

svc = service_fixture()
khd = api_fixture()


def call(sock, path: str, user: str, **kw: object) -> tuple[int, str]:
    status, resp = post(sock, path, json.dumps(
        dict(user=user, credential=user + "-cred", **kw)).encode())
    return status, text_of(resp)


def same(theirs: tuple[int, str], none: tuple[int, str], their_id: int, no_id: int) -> None:
    """The two answers are equal once each names its own number."""
    assert theirs[0] == none[0] and theirs[0] in (404, 409), (theirs, none)
    assert re.sub(rf"\b{their_id}\b", "N", theirs[1]) == re.sub(rf"\b{no_id}\b", "N", none[1])


def test_anothers_things_look_like_nothing(svc, khd):
    status, text = call(khd, "/v1/allocations?format=json", "alice")
    assert status == 201, text
    a = json.loads(text)
    node = a["nodes"][0]["node"]
    (netid,) = [n["netid"] for n in a["networks"] if n["kind"] == "private"]
    status, text = call(khd, "/v1/allocations?format=json", "bob")
    assert status == 201, text
    free = max(r.number for r in svc.store.nodes()) + 1  # a node no one holds

    same(call(khd, f"/v1/allocations/{a['id']}/release", "bob"),
         call(khd, "/v1/allocations/999/release", "bob"), a["id"], 999)
    same(call(khd, f"/v1/nodes/{node}/reset", "bob"),
         call(khd, f"/v1/nodes/{free}/reset", "bob"), node, free)
    same(call(khd, f"/v1/domains/{netid}/remove", "bob"),
         call(khd, "/v1/domains/200/remove", "bob"), netid, 200)
    same(call(khd, "/v1/allocations", "bob", n=[netid]),
         call(khd, "/v1/allocations", "bob", n=[200]), netid, 200)
    # and alice's things are untouched
    assert call(khd, f"/v1/allocations/{a['id']}/release", "alice")[0] == 200
