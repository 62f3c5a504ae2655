"""khd's live page (issue 15, item 4), its WSGI application driven directly: the login form,
a wrong credential, a principal's view without another's node, console lines escaped, the
operator's token, one-time links, sessions that end, and the requests it refuses."""

from __future__ import annotations

import io
import json
import os
import shutil
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from kh.admission import AuthError
from kh.errors import KhError
from kh.hw.console import utc_stamp
from kh.page import content, sessions
from kh.page.app import COOKIE, PageApp
from kh.page.sessions import Sessions, read_operator_token, write_operator_token
from kh.service.request import Caller

CREATED = 1_700_000_000.0


class FakeSource:
    """Two principals: alice (allocation 3: nodes 5, 6) and bob (allocation 4: node 7)."""

    ssh_port = 7422

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.principals = {"alice": "alice-secret-1", "bob": "bob-secret-22"}
        self.allocs = [{"id": 3, "principal": "alice", "netids": [3], "nodes": [5, 6],
                        "created": CREATED},
                       {"id": 4, "principal": "bob", "netids": [4], "nodes": [7],
                        "created": CREATED}]

    def view(self, principal: str | None) -> dict[str, Any]:
        allocs = [a for a in self.allocs if principal in (None, a["principal"])]
        nodes = [{"node": n, "uid": n, "state": "allocated", "allocation": a["id"],
                  "note": "", "netids": a["netids"]} for a in allocs for n in a["nodes"]]
        doms = [{"netid": a["netids"][0], "kind": "private", "owner": a["principal"]}
                for a in allocs]
        return {"allocations": allocs, "nodes": nodes, "domains": doms, "publishes": [],
                "pool": {"free": 2}, **({"principal": principal} if principal else {})}

    def console_log(self, node: int) -> Path:
        return self.logs / f"node{node}.log"

    def authenticate(self, user: str, credential: str) -> None:
        if self.principals.get(user) != credential:
            raise AuthError("wrong name or credential")

    def exists(self, principal: str) -> bool:
        return principal in self.principals

    def usage(self, principal: str | None) -> list[tuple[str, str]] | None:
        return [("cpu_seconds", "12.5 s")] if principal == "alice" else None


class Client:
    """WSGI requests to the app, keeping its cookie like a browser."""

    def __init__(self, app: PageApp) -> None:
        self.app = app
        self.cookie: str | None = None

    def request(self, method: str, path: str, body: bytes = b"", ctype: str = "",
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
        environ = {"REQUEST_METHOD": method, "REQUEST_URI": path, "PATH_INFO": path,
                   "HTTP_HOST": "127.0.0.1:7481", "CONTENT_LENGTH": str(len(body)),
                   "CONTENT_TYPE": ctype, "wsgi.input": io.BytesIO(body),
                   "kh.caller": Caller("loopback", False)}
        if self.cookie:
            environ["HTTP_COOKIE"] = f"{COOKIE}={self.cookie}"
        for k, v in (headers or {}).items():
            environ["HTTP_" + k.upper().replace("-", "_")] = v
        got: dict[str, Any] = {}

        def start_response(status: str, hdrs: list[tuple[str, str]]) -> None:
            got["status"], got["headers"] = int(status.split()[0]), dict(hdrs)

        out = b"".join(self.app(environ, start_response)).decode()
        set_cookie = got["headers"].get("Set-Cookie")
        if set_cookie:
            self.cookie = set_cookie.split(";")[0].split("=", 1)[1] or None
        return got["status"], got["headers"], out

    def login(self, **fields: str) -> tuple[int, dict[str, str], str]:
        return self.request("POST", "/login", urllib.parse.urlencode(fields).encode(),
                            "application/x-www-form-urlencoded")


@pytest.fixture
def page(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    token = tmp_path / "page-operator-token"
    write_operator_token(token)
    return PageApp(FakeSource(logs), token, svgs=content.SvgCache(dot_program=str(
        tmp_path / "no-dot")))


def test_login_form_without_a_session(page):
    status, headers, body = Client(page).request("GET", "/")
    assert status == 200 and '<form method="post" action="/login"' in body
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert Client(page).request("GET", "/live")[0] == 401


def test_wrong_credential_gets_no_session(page):
    c = Client(page)
    status, headers, body = c.login(user="alice", credential="bob-secret-22")
    assert status == 403 and "wrong name or credential" in body and "Set-Cookie" not in headers
    assert c.login(user="nobody", credential="x" * 20)[0] == 403
    assert c.login(user="../etc", credential="x" * 20)[0] == 403
    assert c.request("GET", "/live")[0] == 401


def test_principal_sees_its_own_nodes_not_anothers(page):
    c = Client(page)
    status, headers, _ = c.login(user="alice", credential="alice-secret-1")
    assert status == 303 and headers["Location"] == "/"
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Max-Age=" in cookie
    status, _, body = c.request("GET", "/")
    assert status == 200
    assert 'id="node-5"' in body and 'id="node-6"' in body and 'id="node-7"' not in body
    assert "bob" not in body and "12.5 s" in body
    status, _, live = c.request("GET", "/live")
    assert status == 200 and 'id="node-5"' in live and "bob" not in live


def test_console_lines_are_escaped_and_only_the_principals_own(page, tmp_path):
    log = tmp_path / "logs" / "node5.log"
    before = utc_stamp(CREATED - 60)
    after = utc_stamp(CREATED + 5)
    log.write_bytes(
        f"{before} the previous holder's secret line\n".encode()
        + f"{after} \x1b]0;retitled\x07<script>alert(1)</script> \x1b[31mred\x1b[0m\r\n".encode()
        + f"{after} bell\x07 and backspace\x08 and nul\x00\n".encode())
    c = Client(page)
    c.login(user="alice", credential="alice-secret-1")
    _, _, body = c.request("GET", "/")
    assert "&lt;script&gt;alert(1)&lt;/script&gt; red" in body
    assert "<script>alert" not in body and "retitled" not in body
    assert not any(ch in body for ch in "\x1b\x07\x08\x00\r")
    assert "bell^G and backspace^H and nul^@" in body
    assert "previous holder" not in body  # before alice's allocation
    op = Client(page)
    op.login(operator_token=read_operator_token(page.token_path))
    assert "previous holder" in op.request("GET", "/")[2]  # the operator sees the whole log


def test_operator_token(page):
    c = Client(page)
    status, _, body = c.login(operator_token="not-the-token")
    assert status == 403 and "wrong operator token" in body and c.cookie is None
    status, _, _ = c.login(operator_token=read_operator_token(page.token_path))
    assert status == 303
    _, _, body = c.request("GET", "/")
    assert all(f'id="node-{n}"' in body for n in (5, 6, 7)) and "the operator" in body


def test_operator_token_file_is_roots_alone(tmp_path):
    p = tmp_path / "token"
    write_operator_token(p)
    assert p.stat().st_mode & 0o777 == 0o600
    first = read_operator_token(p)
    write_operator_token(p)
    assert read_operator_token(p) != first and len(first) >= 40
    p.chmod(0o644)
    with pytest.raises(KhError, match="not a private file"):
        read_operator_token(p)


def test_one_time_link(page):
    c = Client(page)
    body = json.dumps({"user": "alice", "credential": "alice-secret-1"}).encode()
    status, _, out = c.request("POST", "/login/link", body, "application/json")
    assert status == 201
    path = urllib.parse.urlsplit(json.loads(out)["url"]).path
    status, _, _ = c.request("GET", path)
    assert status == 303 and c.cookie
    assert 'id="node-5"' in c.request("GET", "/")[2]
    again = Client(page)
    assert again.request("GET", path)[0] == 403 and again.cookie is None  # used up
    bad = json.dumps({"user": "alice", "credential": "nope-nope-nope"}).encode()
    assert c.request("POST", "/login/link", bad, "application/json")[0] == 403


def test_logout_and_a_removed_principal_end_the_session(page):
    c = Client(page)
    c.login(user="alice", credential="alice-secret-1")
    kept = c.cookie
    c.request("POST", "/logout")
    c.cookie = kept  # a stolen copy of the cookie is no good after the logout
    assert c.request("GET", "/live")[0] == 401
    c.login(user="bob", credential="bob-secret-22")
    assert c.request("GET", "/live")[0] == 200
    del page.source.principals["bob"]
    assert c.request("GET", "/live")[0] == 401


def test_sessions_expire():
    now = [1000.0]
    s = Sessions(clock=lambda: now[0])
    v = s.create("alice")
    now[0] += sessions.IDLE - 1
    assert s.get(v) is not None  # and its use moves the idle deadline on
    now[0] += sessions.IDLE - 1
    assert s.get(v) is not None
    now[0] += sessions.IDLE + 1
    assert s.get(v) is None
    v = s.create("alice")
    for _ in range(sessions.LIFETIME // (sessions.IDLE // 2)):
        now[0] += sessions.IDLE // 2
        s.get(v)
    assert s.get(v) is None  # LIFETIME after the login, however used
    assert s.get("x" * 500) is None and s.get("") is None


def test_sessions_are_bounded():
    s = Sessions()
    values = [s.create("alice") for _ in range(sessions.MAX_PER_PRINCIPAL + 3)]
    assert sum(s.get(v) is not None for v in values) == sessions.MAX_PER_PRINCIPAL
    assert s.get(values[-1]) is not None  # the newest kept


def test_cross_site_posts_and_foreign_hosts_are_refused(page):
    c = Client(page)
    fields = urllib.parse.urlencode({"user": "alice", "credential": "alice-secret-1"}).encode()
    status, _, _ = c.request("POST", "/login", fields, "application/x-www-form-urlencoded",
                             {"Origin": "http://evil.example"})
    assert status == 403 and c.cookie is None
    status, _, _ = c.request("POST", "/login", fields, "application/x-www-form-urlencoded",
                             {"Sec-Fetch-Site": "cross-site"})
    assert status == 403 and c.cookie is None
    status, _, _ = c.request("POST", "/login", fields, "application/x-www-form-urlencoded",
                             {"Origin": "http://127.0.0.1:7481"})
    assert status == 303
    environ_host = Client(page)
    environ_host.cookie = c.cookie
    status, _, _ = environ_host.request("GET", "/live", headers={"Host": "rebound.example"})
    assert status == 421
    assert c.request("GET", "/static/../app.py")[0] == 404
    assert c.request("PUT", "/")[0] == 400


def test_no_dot_still_shows_the_nodes(page):
    c = Client(page)
    c.login(user="alice", credential="alice-secret-1")
    body = c.request("GET", "/")[2]
    assert "no picture: cannot start" in body and 'id="node-5"' in body


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz's dot is not installed "
                    "(tools/setup-apt installs it)")
def test_topology_svg_is_inline(page):
    page.svgs = content.SvgCache()
    c = Client(page)
    c.login(user="alice", credential="alice-secret-1")
    body = c.request("GET", "/")[2]
    assert "<svg" in body and "node 5" in body and "<?xml" not in body


def test_checked_svg_refuses_scripts_and_links():
    ok = '<svg xmlns="http://www.w3.org/2000/svg"><g><text>x</text></g></svg>'
    assert content.checked_svg('<?xml version="1.0"?>\n' + ok) == ok
    for bad in ('<svg xmlns="http://www.w3.org/2000/svg"><script>x</script></svg>',
                '<svg xmlns="http://www.w3.org/2000/svg" onload="x()"></svg>',
                '<svg xmlns="http://www.w3.org/2000/svg" xmlns:l="http://www.w3.org/1999/xlink">'
                '<a l:href="javascript:x"><text>x</text></a></svg>',
                '<svg xmlns="http://www.w3.org/2000/svg"><g><text>x</g></svg>'):
        with pytest.raises(KhError):
            content.checked_svg(bad)


def test_console_tail_reads_only_the_end(tmp_path):
    log = tmp_path / "n.log"
    stamp = utc_stamp(CREATED)
    log.write_bytes(b"".join(f"{stamp} line {i}\n".encode() for i in range(5000)))
    tail = content.console_tail(log, None)
    assert tail == [f"{stamp} line {i}" for i in range(4992, 5000)]
    assert content.console_tail(tmp_path / "missing.log", None) == []
    assert os.path.getsize(log) > content.CONSOLE_BYTES


def test_usage_comes_from_the_meter(tmp_path):
    from datetime import UTC, datetime

    from kh.page.usage import last_day
    from kh.service import membership
    from kh.store import Store
    from tests.unit.test_metering import T0, FakeSource, meter
    from tests.unit.test_metering import allocate as metered
    st = Store(tmp_path / "state.db")
    membership.ensure_schema(st)
    try:
        src = FakeSource()
        metered(st, "alice", 1)
        src.cpu_of[1] = ("g1", 5_000_000)
        m = meter(st, src)
        m.take(now=T0)
        src.cpu_of[1] = ("g1", 7_500_000)
        m.take(now=T0 + 10)
        now = datetime.fromtimestamp(T0 + 60, UTC)
        rows = dict(last_day(st, "alice", now) or [])
        assert rows["cpu_seconds"] == "2.5 s" and rows["node_seconds"] == "10.0 s"
        assert last_day(st, "bob", now) is None  # nothing metered: said, not zeros
        assert last_day(st, "alice", datetime.fromtimestamp(T0 + 2 * 86400, UTC)) is None
    finally:
        st.close()


def test_no_page_port_no_page_and_no_token(tmp_path):
    from kh.page.serve import page_server
    from kh.service.config import ServiceConfig
    cfg = ServiceConfig(state_dir=tmp_path, images=tmp_path)
    write_operator_token(cfg.page_token)
    assert page_server(object(), cfg) is None and not cfg.page_token.exists()


def test_a_second_session_cookie_is_no_session(page):
    """A page on another port of 127.0.0.1 (cookies ignore ports) sets kh_page=<bob's
    session> for path /live; the operator's browser then sends both, bob's first. The page
    must not serve the operator's page bob's view: with two, there is no session."""
    operator, bob = Client(page), Client(page)
    operator.login(operator_token=read_operator_token(page.token_path))
    bob.login(user="bob", credential="bob-secret-22")
    assert 'id="node-5"' in operator.request("GET", "/live")[2]
    tossed = f"{COOKIE}={bob.cookie}; {COOKIE}={operator.cookie}"
    status, _, body = operator.request("GET", "/live", headers={"Cookie": tossed})
    assert status == 401 and 'id="node-7"' not in body
