"""The live page as a WSGI application, served by khd on 127.0.0.1 (kh.service.httpd, with
its bounds) when ServiceConfig.page_port is set.

Routes (every one but the login's and the static files' needs a live session, checked on
every request; a principal's session also needs the principal to still exist):
  GET  /                 the page (or the login form)
  GET  /live             the page's live part, which the page fetches every REFRESH s
  POST /login            form: user + credential (a principal), or operator_token
  GET  /login/once/CODE  a one-time link (`kh page` makes it): a session, then /
  POST /login/link       JSON {"user", "credential"} or {"operator_token"}: a one-time link
  POST /logout
  GET  /static/page.js, /static/page.css

After the login everything is a GET that changes nothing; the cookie is HttpOnly and
SameSite=Strict, POSTs carrying another Origin are refused, and the Host must be an address
(request.check_host: no DNS rebinding). Every page carries a Content-Security-Policy allowing
only its own script and style. Templates are Jinja2 with autoescape on; the only markup not
escaped is the topology SVG, checked element by element (content.checked_svg).
"""

from __future__ import annotations

import http
import json
import logging
import re
import time
import urllib.parse
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jinja2

from kh.admission import AuthError, Throttled, check_user
from kh.errors import KhError, UsageError
from kh.page import content
from kh.page.serve import MAX_FORM
from kh.page.sessions import LIFETIME, Sessions, read_operator_token, same
from kh.service import request as rq
from kh.service.request import Caller

log = logging.getLogger("kh.page")

HERE = Path(__file__).resolve().parent
COOKIE = "kh_page"
REFRESH = 2  # seconds between the page's fetches of its live part
STATIC = {"page.js": "text/javascript; charset=utf-8", "page.css": "text/css; charset=utf-8"}
HEADERS = [
    ("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; "
     "img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
     "base-uri 'none'"),
    ("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"), ("X-Frame-Options", "DENY")]
Response = tuple[int, str, str, list[tuple[str, str]]]  # status, type, body, headers


class Unauthorized(AuthError):
    """401: no live session."""


def templates() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                              autoescape=True, undefined=jinja2.StrictUndefined)


class PageApp:
    """The page over a content.Source; ``token_path`` is the operator's token file."""

    def __init__(self, source: content.Source, token_path: Path,
                 sessions: Sessions | None = None, svgs: content.SvgCache | None = None
                 ) -> None:
        self.source = source
        self.token_path = token_path
        self.sessions = sessions or Sessions()
        self.svgs = svgs or content.SvgCache()
        self.env = templates()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]
                 ) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        path = rq.request_path(environ.get("REQUEST_URI", ""))
        try:
            rq.check_host(environ.get("HTTP_HOST"))
            code, ctype, body, headers = self._route(environ, method, path)
        except Unauthorized:
            code, ctype, body, headers = 401, "text/plain; charset=utf-8", "kh: log in\n", []
        except KhError as e:
            code = (429 if isinstance(e, Throttled) else 403 if isinstance(e, AuthError)
                    else 421 if isinstance(e, rq.Misdirected) else 400)
            code, ctype, body, headers = code, "text/plain; charset=utf-8", f"kh: {e}\n", []
        except Exception as e:
            log.exception("page: internal error on %s %s", method, path[:80])
            code, ctype = 500, "text/plain; charset=utf-8"
            body, headers = f"kh: internal error: {type(e).__name__}\n", []
        data = body.encode("utf-8", "replace")
        start_response(f"{code} {http.HTTPStatus(code).phrase}",
                       [("Content-Type", ctype), ("Content-Length", str(len(data))),
                        *HEADERS, *headers])
        return [data] if method != "HEAD" else []

    # -- routing ----------------------------------------------------------------------------
    def _route(self, environ: dict[str, Any], method: str, path: str) -> Response:
        caller: Caller = environ.get("kh.caller") or Caller("unknown", False)
        if method in ("GET", "HEAD"):
            if path == "/":
                s = self._session(environ, required=False)
                if s is None:
                    return self._login_form(200, "")
                return self._html(self.env.get_template("page.html").render(
                    **self._live(s.principal), refresh=REFRESH))
            if path == "/live":
                s = self._session(environ)
                return self._html(self.env.get_template("live.html").render(
                    **self._live(s.principal)))
            if m := re.fullmatch(r"/login/once/([A-Za-z0-9_-]{1,100})", path):
                return self._once(m[1])
            if (m := re.fullmatch(r"/static/([a-z]+\.[a-z]+)", path)) and m[1] in STATIC:
                return 200, STATIC[m[1]], (HERE / "static" / m[1]).read_text(), []
        elif method == "POST":
            self._same_origin(environ)
            if path == "/login":
                return self._login(environ, caller)
            if path == "/login/link":
                return self._link(environ, caller)
            if path == "/logout":
                self.sessions.end(self._cookie(environ))
                return 303, "text/plain", "", [("Location", "/"), _set_cookie("", 0)]
        else:
            raise UsageError(f"method {method[:20]!r} is not served", "GET or POST")
        return 404, "text/plain; charset=utf-8", f"kh: no page {path[:80]}\n", []

    # -- sessions ---------------------------------------------------------------------------
    @staticmethod
    def _cookie(environ: dict[str, Any]) -> str | None:
        """The session cookie's value; None without one, or with two: cookies are not kept
        apart by port, so a page on another port of 127.0.0.1 (a published node's) can add
        its own kh_page for a deeper path (/live), which the browser sends first. Taking it
        would show one principal's view in another's (or the operator's) page."""
        values = set()
        for part in environ.get("HTTP_COOKIE", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE:
                values.add(value)
        return str(values.pop()) if len(values) == 1 else None

    def _session(self, environ: dict[str, Any], required: bool = True) -> Any:
        """The request's live session; Unauthorized (or None) without one. A principal's
        ends when the principal is gone."""
        s = self.sessions.get(self._cookie(environ))
        if s is not None and s.principal is not None and not self.source.exists(s.principal):
            self.sessions.end_principal(s.principal)
            s = None
        if s is None and required:
            raise Unauthorized("no live session", "log in at /")
        return s

    @staticmethod
    def _same_origin(environ: dict[str, Any]) -> None:
        """A POST from another site's page (CSRF) is refused: its Origin (browsers send one
        with every POST) must be this server; Sec-Fetch-Site same-origin or none."""
        origin = environ.get("HTTP_ORIGIN")
        host = environ.get("HTTP_HOST", "")
        if origin is not None and origin != f"http://{host}":
            raise AuthError(f"a request from {origin[:60]!r} is not the page's own")
        site = environ.get("HTTP_SEC_FETCH_SITE")
        if site is not None and site not in ("same-origin", "none"):
            raise AuthError(f"a {site[:20]} request is not the page's own")

    def _who(self, fields: dict[str, str], caller: Caller) -> str | None:
        """The principal (None: the operator) these login fields prove; AuthError if none."""
        token = fields.get("operator_token", "")
        if token:
            if not same(token, read_operator_token(self.token_path)):
                raise AuthError("wrong operator token")
            return None
        user, cred = fields.get("user", ""), fields.get("credential", "")
        if not user or not cred:
            raise AuthError("give a principal's name and credential, or the operator token")
        try:
            check_user(user)
        except KhError:
            raise AuthError("wrong name or credential") from None
        with rq.calling(caller):  # failed checks are rate-limited by source
            try:
                self.source.authenticate(user, cred)
            except Throttled:
                raise
            except KhError:  # the same answer for an unknown name or a bad credential
                raise AuthError("wrong name or credential") from None
        return user

    def _login(self, environ: dict[str, Any], caller: Caller) -> Response:
        fields = _form(_read(environ))
        try:
            who = self._who(fields, caller)
        except Throttled:
            raise
        except AuthError as e:
            return self._login_form(403, e.message, fields.get("user", ""))
        value = self.sessions.create(who)
        log.info("page: %s logged in from %s", who or "the operator", caller.source)
        return 303, "text/plain", "", [("Location", "/"), _set_cookie(value, LIFETIME)]

    def _link(self, environ: dict[str, Any], caller: Caller) -> Response:
        raw = _read(environ)
        body = rq.parse_body(raw, environ.get("CONTENT_TYPE"))
        fields = {k: v for k, v in body.items() if isinstance(v, str)}
        who = self._who(fields, caller)
        code = self.sessions.link(who)
        host = environ.get("HTTP_HOST") or "127.0.0.1"
        url = f"http://{host}/login/once/{code}"
        return 201, "application/json", json.dumps({"url": url}) + "\n", []

    def _once(self, code: str) -> Response:
        good, who = self.sessions.redeem(code)
        if not good:
            return self._login_form(403, "that login link is used or expired")
        value = self.sessions.create(who)
        return 303, "text/plain", "", [("Location", "/"), _set_cookie(value, LIFETIME)]

    # -- pages ------------------------------------------------------------------------------
    def _login_form(self, code: int, error: str, user: str = "") -> Response:
        body = self.env.get_template("login.html").render(
            title="log in", error=error, user=user[:64], token_path=str(self.token_path))
        return code, "text/html; charset=utf-8", body, []

    @staticmethod
    def _html(body: str) -> Response:
        return 200, "text/html; charset=utf-8", body, []

    def _live(self, principal: str | None) -> dict[str, Any]:
        """The template's values for ``principal``'s view (None: the operator's)."""
        data = self.source.view(principal)
        svg, svg_error = self.svgs.get(data, self.source.ssh_port)
        nodes = content.nodes(self.source, data, principal)
        pool = data.get("pool") or {}
        who = "the operator" if principal is None else f"principal {principal}"
        summary = (f"{len(nodes)} allocated node{'s' * (len(nodes) != 1)} shown, "
                   f"{pool.get('free', '?')} free in the pool")
        return {"title": who, "who": who, "nodes": nodes, "svg": svg, "svg_error": svg_error,
                "usage": self.source.usage(principal), "summary": summary,
                "now": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def _read(environ: dict[str, Any]) -> bytes:
    n = rq.content_length(environ.get("CONTENT_LENGTH"), environ.get("HTTP_TRANSFER_ENCODING"))
    if n > MAX_FORM:
        raise UsageError(f"request body of {n} bytes is too large (at most {MAX_FORM})")
    raw: bytes = environ["wsgi.input"].read(n) if n else b""
    return raw


def _form(raw: bytes) -> dict[str, str]:
    """A urlencoded form's fields (the first of each name), UsageError if it is not one."""
    try:
        pairs = urllib.parse.parse_qsl(raw.decode("ascii"), keep_blank_values=True,
                                       strict_parsing=bool(raw), max_num_fields=8)
    except (UnicodeDecodeError, ValueError):
        raise UsageError("the form is not urlencoded ASCII") from None
    out: dict[str, str] = {}
    for k, v in pairs:
        out.setdefault(k, v)
    return out


def _set_cookie(value: str, max_age: int) -> tuple[str, str]:
    return ("Set-Cookie", f"{COOKIE}={value}; Max-Age={max_age}; Path=/; HttpOnly; "
            "SameSite=Strict")
