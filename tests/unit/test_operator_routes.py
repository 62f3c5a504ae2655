"""The operator's routes answer a principal 403 whatever it sends (TRIAL16, issue 16): a
principal calling `POST /v1/hosts` the way it calls every other route, with its user and
credential, was told 400 "unknown parameter 'credential'" (the route's parameters were checked
before who called), which reads as if the request were only malformed."""

from __future__ import annotations

import pytest

from kh.service.request import Caller
from tests.unit.fake_khd import make_service
from tests.unit.test_hosts import URI, served

ALICE = Caller("loopback", False)
AS_ALICE = {"user": "alice", "credential": "c" * 32}


@pytest.fixture
def svc(tmp_path, monkeypatch):
    s = make_service(tmp_path, monkeypatch, nodes=1)
    yield s
    s.store.close()


@pytest.mark.parametrize("method, path, body", [
    ("POST", "/v1/hosts", {**AS_ALICE, "name": "b", "uri": URI}),
    ("POST", "/v1/hosts", {"name": "b", "uri": URI, "color": "red"}),
    ("GET", "/v1/hosts", {}),
    ("POST", "/v1/hosts/b/remove", AS_ALICE),
    ("POST", "/v1/hosts/b/remove", {}),
    ("POST", "/v1/principals/bob/remove", AS_ALICE),
])
def test_a_principal_on_an_operators_route_is_403(svc, method, path, body):
    status, data = served(svc, method, path, ALICE, body)
    assert status == 403, data
    assert "operator" in data["error"]
