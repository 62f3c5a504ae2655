"""khd's side of the live page: its server on 127.0.0.1 (cfg.page_port) with kh.service.httpd's
bounds, tighter: a read-only page needs few connections and small requests."""

from __future__ import annotations

from typing import Any

from kh.service import httpd
from kh.service.config import ServiceConfig

MAX_FORM = 4096  # bytes of a login form or link request (kh.page.app reads no more)
# A browser keeps up to 6 connections to a server; the page polls over one of them.
LIMITS = httpd.Limits(max_body=MAX_FORM, max_connections=32, per_source=8, workers=2)


def page_server(svc: Any, cfg: ServiceConfig) -> httpd.HttpServer | None:
    """The page's server (not yet started), a new operator token written first; None, and
    an old token removed, when cfg.page_port is 0. KhError when the port is taken."""
    if not cfg.page_port:
        cfg.page_token.unlink(missing_ok=True)
        return None
    # the page's modules (Jinja2) only when it is on
    from kh.page.app import PageApp
    from kh.page.content import ServiceSource
    from kh.page.sessions import write_operator_token
    sock = httpd.bind_tcp("127.0.0.1", cfg.page_port, "--page-port")
    write_operator_token(cfg.page_token)
    app = PageApp(ServiceSource(svc), cfg.page_token)
    return httpd.HttpServer(app, [sock], LIMITS, name="page")
