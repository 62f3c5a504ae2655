"""A publish never takes one of khd's own ports (HARDEN, item 2): the live page's port was not
among them, so a principal's publish on it, opened again by a restarted khd before its page
listens, kept the operator's page from its port. `kh publish` names its arguments as typed
(PORT, HOSTPORT), not as the API's fields."""

from __future__ import annotations

import dataclasses
import socket

import pytest
from click.testing import CliRunner

from kh.cli import outside as outside_cli
from kh.cli.main import main
from kh.service import publish
from tests.unit import test_publish as base
from tests.unit.fake_khd import make_service, serving

echo, svc, khd = base.echo, base.svc, base.khd  # the same fixtures, this module's own


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return int(s.getsockname()[1])


def test_the_live_page_s_port_is_khd_s_own(khd, svc, echo):
    svc.cfg = dataclasses.replace(svc.cfg, page_port=free_port())
    _, (n,) = base.take(khd, "alice", x=True)
    status, err = base.pub(khd, "alice", n, echo.port, host_port=svc.cfg.page_port)
    assert status == 409 and err["error"] == \
        f"port {svc.cfg.page_port} on 127.0.0.1 is khd's own", err
    assert base.closed(svc.cfg.page_port)


def test_a_restarted_khd_with_the_page_on_a_published_port_drops_the_publish(
        tmp_path, monkeypatch, echo):
    monkeypatch.setattr(publish.Published, "address", property(lambda self: "127.0.0.1"))
    first = base.with_forwarder(make_service(tmp_path, monkeypatch, nodes=2))
    with serving(first, first.cfg.socket) as sock:
        _, (a,) = base.take(sock, "alice", 1, x=True)
        port = base.pub(sock, "alice", a, echo.port)[1]["host_port"]
    first.forwards.stop()
    first.store.close()
    second = base.with_forwarder(make_service(tmp_path, monkeypatch, nodes=2))
    second.cfg = dataclasses.replace(second.cfg, page_port=port)  # the operator's page there
    try:
        repairs = publish.restore(second)
        assert repairs == [f"dropped the publish of 127.0.0.1:{port} -> node {a} port "
                           f"{echo.port} (127.0.0.1): port {port} is khd's own now"]
        assert base.closed(port)  # free for the page
    finally:
        second.forwards.stop()
        second.store.close()


@pytest.mark.parametrize("args,words", [
    (["4", "80", "80"], "kh: HOSTPORT must be from 1024 to 65535, got 80 (leave it out for a "
                        "free port)"),
    (["4", "80", "70000"], "kh: HOSTPORT must be from 1024 to 65535, got 70000"),
    (["4", "0"], "kh: PORT must be from 1 to 65535, got 0"),
    (["4", "65536", "8080"], "kh: PORT must be from 1 to 65535, got 65536"),
])
def test_kh_publish_names_its_arguments(monkeypatch, args, words):
    monkeypatch.setattr(outside_cli, "as_principal",
                        lambda *a, **kw: pytest.fail("khd was asked"))
    monkeypatch.setenv("KH_CREDENTIAL", "s3cret")
    r = CliRunner().invoke(main, ["publish", "-u", "alice", *args])
    assert r.exit_code == 2 and r.output.startswith(words) and r.output.count("\n") == 1, \
        r.output
