"""`kh service status` names the live page's URL when the page is on (HARDEN, item 5), and says
it is off otherwise; GET /v1/status's JSON has it as `page`."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from kh.cli import service as service_cli
from kh.cli.main import main
from tests.unit.fake_khd import get, make_service, serving, text_of


@pytest.mark.parametrize("port,line,page", [
    (7481, "live page: http://127.0.0.1:7481/ (`kh page` gives a login link)",
     {"url": "http://127.0.0.1:7481/", "port": 7481}),
    (0, "live page: off (khd runs without --page-port)", None),
])
def test_status_names_the_live_page(tmp_path, monkeypatch, port, line, page):
    svc = make_service(tmp_path, monkeypatch, page_port=port)
    try:
        with serving(svc, svc.cfg.socket) as sock:
            assert line + "\n" in text_of(get(sock, "/v1/status")[1])
            assert json.loads(text_of(get(sock, "/v1/status?format=json")[1]))["page"] == page

            class Client:
                def call(self, method, path, body=None, *, as_json=False):  # type: ignore
                    return text_of(get(sock, path)[1])
            monkeypatch.setattr(service_cli, "client", Client)
            r = CliRunner().invoke(main, ["service", "status"])
            assert r.exit_code == 0 and line in r.output, r.output
    finally:
        svc.store.close()
