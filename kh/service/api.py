"""khd's HTTP API: on a unix socket, on 127.0.0.1, and inside the fabric on the public domain.

Text by default (khget's text object), JSON with ``Accept: application/json`` or
``?format=json``. Request bodies are JSON objects only (kh.service.request reads them, strictly);
every malformed request is a 4xx with a one-line reason. docs/api.yaml is the OpenAPI
description.
"""

from __future__ import annotations

import http
import http.server
import json
import logging
import os
import re
import shutil
import socketserver
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kh import textobj
from kh.admission import AuthError
from kh.allocation import MAX_NODE, AllocationError, Request
from kh.errors import KhError, UsageError
from kh.service import request as rq
from kh.service.core import Hardware, NotFound, Service

log = logging.getLogger("kh.api")
MAX_BODY = rq.MAX_BODY
# The most specific first: TooLarge and Unsupported are UsageErrors.
STATUS = {rq.TooLarge: 413, rq.Unsupported: 415, rq.Misdirected: 421, UsageError: 400,
          AuthError: 403, NotFound: 404, AllocationError: 409}


def _status(e: KhError) -> int:
    for cls, code in STATUS.items():
        if isinstance(e, cls):
            return code
    return 500


class Handler(http.server.BaseHTTPRequestHandler):
    service: Service
    by_tcp = False  # TCP listeners check the Host header (see request.check_host)
    protocol_version = "HTTP/1.1"
    server_version = "khd"

    def address_string(self) -> str:
        return str(self.client_address[0]) if self.client_address else "unix"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    # -- plumbing ---------------------------------------------------------------------------
    def _wants_json(self) -> bool:
        q = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        return q.get("format", [""])[0] == "json" or \
            "application/json" in self.headers.get("Accept", "")

    def _send(self, code: int, text: str | Path, data: Any) -> None:
        if isinstance(text, Path):
            self._send_file(code, text)
            return
        if self._wants_json():
            body = (json.dumps(data, indent=1) + "\n").encode()
            ctype = "application/json"
        else:
            body = text.encode("utf-8", "backslashreplace")
            ctype = "text/plain; charset=utf-8"
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _send_file(self, code: int, path: Path) -> None:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            self.send_response(code)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            shutil.copyfileobj(f, self.wfile, 1 << 20)

    def _error(self, code: int, e: KhError) -> None:
        self._send(code, f"kh: {e}\n", {"error": e.message, "hint": e.hint})

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        """http.server's own refusals (a bad request line, headers too long, a method khd
        does not serve) in khd's one-line form; the connection is closed after them."""
        if code == http.HTTPStatus.NOT_IMPLEMENTED:  # an unknown method: the client's fault
            code, message = 405, f"method {self.command!r} is not served"
        elif code == http.HTTPStatus.HTTP_VERSION_NOT_SUPPORTED:  # so is HTTP/2.0 or 9.9
            code, message = 400, f"{message} (khd speaks HTTP/1.0 and 1.1)"
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # an unparsable request line: answer in 1.0
            self.request_version = "HTTP/1.0"
        body = f"kh: {message or http.HTTPStatus(code).phrase}\n".encode("utf-8", "replace")
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and code >= 200 and code not in (204, 304):
            self.wfile.write(body)

    def _body(self, method: str) -> dict[str, Any]:
        """The request's JSON object; its length is checked before a byte of it is read."""
        n = rq.content_length(self.headers)
        raw = self.rfile.read(n) if n else b""
        if len(raw) < n:
            self.close_connection = True
            raise rq.BadFraming(f"request body ended after {len(raw)} of {n} bytes")
        return rq.parse_body(raw, self.headers.get("Content-Type")) if method == "POST" else {}

    def _route(self, method: str) -> None:
        path = urllib.parse.urlsplit(self.path).path
        try:
            if self.by_tcp:
                rq.check_host(self.headers)
            body = self._body(method)
            for m, rx, fn in ROUTES:
                if m == method and (match := re.fullmatch(rx, path)):
                    code, text, data = fn(self.service, body, *match.groups())
                    self._send(code, text, data)
                    return
            raise NotFound(f"no such API endpoint: {method} {path[:80]}")
        except KhError as e:
            if isinstance(e, (rq.BadFraming, rq.TooLarge)):
                self.close_connection = True  # the body was not read: the stream is lost
            self._error(_status(e), e)
        except Exception as e:
            log.exception("internal error on %s %s", method, path[:80])
            self._error(500, KhError(f"internal error: {type(e).__name__}: {e}"))

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")


Result = tuple[int, "str | Path", Any]


def allocate(svc: Service, body: dict[str, Any]) -> Result:
    # any integer here; Request.check says what is wrong with one out of range
    req = Request(user=rq.user(body), count=rq.integer(body, "count", 1, -rq.MAX_ID),
                  new_private=rq.integer(body, "p", 0, -rq.MAX_ID),
                  existing=rq.integers(body, "n"),
                  public=rq.flag(body, "i"), external=rq.flag(body, "x"))
    a = svc.khget(req, rq.credential(body))
    return 201, textobj.format(a), textobj.to_json(a)


def release(svc: Service, body: dict[str, Any], alloc: str) -> Result:
    done = svc.release(rq.path_id(alloc, "allocation"), rq.user(body), rq.credential(body),
                       list(rq.integers(body, "nodes", MAX_NODE)))
    return 200, f"released {' '.join(map(str, done))}\n", {"released": done}


def reset(svc: Service, body: dict[str, Any], node: str) -> Result:
    number = rq.path_id(node, "node")
    svc.reset(number, rq.user(body), rq.credential(body))
    return 200, f"node {number} is at the U-Boot prompt\n", {"reset": number}


def domain_rm(svc: Service, body: dict[str, Any], netid: str) -> Result:
    n = rq.path_id(netid, "domain")
    svc.remove_domain(n, rq.user(body), rq.credential(body))
    return 200, f"domain {n} removed\n", {"removed": n}


def key_add(svc: Service, body: dict[str, Any]) -> Result:
    key = rq.text(body, "key", 16 * 1024)
    alloc = body.get("allocation")
    kid = svc.add_key(rq.user(body), rq.credential(body), key,
                      None if alloc is None else rq.integer(body, "allocation", 0))
    return 201, f"key {kid} added\n", {"id": kid}


def key_remove(svc: Service, body: dict[str, Any], key_id: str) -> Result:
    kid = rq.path_id(key_id, "key")
    svc.remove_key(rq.user(body), rq.credential(body), kid)
    return 200, f"key {kid} removed\n", {"removed": kid}


def key_list(svc: Service, body: dict[str, Any]) -> Result:
    keys = svc.list_keys(rq.user(body), rq.credential(body))
    text = "".join(f"{k['id']:>4} {k['allocation'] or 'all'!s:>5} {k['key']} {k['comment']}\n"
                   for k in keys)
    return 200, text, keys


def ps(svc: Service, body: dict[str, Any]) -> Result:
    data = svc.ps()
    lines = [f"{'NODE':>5} {'UID':>5} {'STATE':<10} {'ALLOC':>5} {'PID':>8}  NOTE"]
    for n in data["nodes"]:
        lines.append(f"{n['node']:>5} {n['uid']:>5} {n['state']:<10} "
                     f"{n['allocation'] or '-'!s:>5} {n['pid'] or '-'!s:>8}  {n['note']}")
    lines.append("")
    lines.append(f"{'ALLOC':>5} {'PRINCIPAL':<12} {'DOMAINS':<16} NODES")
    for a in data["allocations"]:
        lines.append(f"{a['id']:>5} {a['principal']:<12} "
                     f"{','.join(map(str, a['netids'])):<16} {' '.join(map(str, a['nodes']))}")
    lines.append("")
    lines.append(f"{'DOMAIN':>6} {'KIND':<9} OWNER")
    for d in data["domains"]:
        lines.append(f"{d['netid']:>6} {d['kind']:<9} {d['owner'] or '-'}")
    return 200, "\n".join(lines) + "\n", data


def hw(svc: Service, body: dict[str, Any]) -> Result:
    d = Hardware(svc.cfg).describe()
    text = "\n".join(f"{k}: {v}" if not isinstance(v, (list, dict)) else
                     f"{k}:\n" + "\n".join(f"  {x}" if isinstance(v, list) else f"  {x}: {v[x]}"
                                          for x in v) for k, v in d.items())
    return 200, text + "\n", d


def status(svc: Service, body: dict[str, Any]) -> Result:
    st = svc.pool.status()
    counts = [f"{st.free} free", f"{st.allocated} allocated"]
    counts += [f"{n} {what}" for n, what in ((st.starting, "starting"),
                                             (st.retrying, "to start again after failing"),
                                             (st.failed, "failed to start"),
                                             (st.lost, "died allocated")) if n]
    text = (f"khd running: {st.size} nodes, {', '.join(counts)}"
            f"{'' if st.ready else ' (the pool is still starting)'}\n")
    now = time.time()
    text += "".join(f"node {f.node}: {f.text(now)}\n" for f in st.failures)
    return 200, text, {"running": True, "nodes": st.size, **st.to_json(),
                       "repairs": svc.repairs}


def images(svc: Service, body: dict[str, Any]) -> Result:
    """The published images a node may fetch (the disk server loads kernels and appliances)."""
    files = sorted(p for p in svc.cfg.images.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix != ".json")
    data = [{"image": p.name, "size": p.stat().st_size} for p in files]
    return 200, "".join(f"{d['image']} {d['size']}\n" for d in data), data


def image(svc: Service, body: dict[str, Any], name: str) -> Result:
    p = svc.cfg.images / name
    if name.startswith(".") or p.suffix == ".json" or not p.is_file():
        raise NotFound(f"no image {name!r}", "GET /v1/images lists them")
    return 200, p, None


ID = r"([^/]+)"  # an id in a path: checked by its handler (rq.path_id), so "abc" is a 400
ROUTES: list[tuple[str, str, Callable[..., Result]]] = [
    ("POST", r"/v1/allocations", allocate),
    ("POST", rf"/v1/allocations/{ID}/release", release),
    ("POST", rf"/v1/nodes/{ID}/reset", reset),
    ("POST", rf"/v1/domains/{ID}/remove", domain_rm),
    ("POST", r"/v1/keys", key_add),
    ("POST", r"/v1/keys/list", key_list),
    ("POST", rf"/v1/keys/{ID}/remove", key_remove),
    ("GET", r"/v1/ps", ps),
    ("GET", r"/v1/hw", hw),
    ("GET", r"/v1/status", status),
    ("GET", r"/v1/images", images),
    ("GET", r"/v1/images/([A-Za-z0-9_+-][A-Za-z0-9._+-]*)", image),
]


class UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    # A unix socket whose backlog is full refuses at once (EAGAIN) rather than making the
    # client wait as TCP does; socketserver's default of 5 lost khgets run 20 at a time.
    request_queue_size = 128


class TCPServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    request_queue_size = 128
    allow_reuse_address = True


def handler_for(svc: Service) -> type[Handler]:
    return type("BoundHandler", (Handler,), {"service": svc})


def serve(server: socketserver.BaseServer) -> threading.Thread:
    t = threading.Thread(target=server.serve_forever, daemon=True, name="api")
    t.start()
    return t


def tcp_server(addr: str, port: int, handler: type[Handler]) -> TCPServer:
    try:
        return TCPServer((addr, port), type("TCPHandler", (handler,), {"by_tcp": True}))
    except OSError as e:
        if e.errno in (98,):
            raise KhError(f"port {port} on {addr} is in use", "pick another with --port") from None
        raise


