"""khd's HTTP API: on a unix socket, on 127.0.0.1, and inside the fabric on the public domain.

Text by default (khget's text object), JSON with ``Accept: application/json`` or
``?format=json``. Request bodies are JSON or form-encoded (busybox wget inside a node posts
forms). docs/api.yaml is the OpenAPI description.
"""

from __future__ import annotations

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
from kh.admission import AuthError, read_credential
from kh.allocation import AllocationError, Request
from kh.errors import KhError, UsageError
from kh.service.core import Hardware, NotFound, Service

log = logging.getLogger("kh.api")
MAX_BODY = 64 * 1024
STATUS = {UsageError: 400, AuthError: 403, NotFound: 404, AllocationError: 409}


def _status(e: KhError) -> int:
    for cls, code in STATUS.items():
        if isinstance(e, cls):
            return code
    return 500


def _int(body: dict[str, Any], key: str, default: int) -> int:
    v = body.get(key)
    if v in ("", None):
        return default
    try:
        return int(v)
    except (TypeError, ValueError):
        raise UsageError(f"`{key}` must be a number, got {v!r}") from None


def _flag(body: dict[str, Any], key: str) -> bool:
    v = body.get(key, False)
    if isinstance(v, str):
        return v.lower() in ("1", "true", "yes", "on")
    return bool(v)


def _netids(body: dict[str, Any]) -> tuple[int, ...]:
    v = body.get("n", [])
    if isinstance(v, str):
        v = [x for x in v.split(",") if x.strip()]
    if not isinstance(v, list):
        raise UsageError("`n` must be a list of domain ids")
    try:
        return tuple(int(x) for x in v)
    except (TypeError, ValueError):
        raise UsageError(f"bad domain list {v!r}", "write -n 3,4") from None


class Handler(http.server.BaseHTTPRequestHandler):
    service: Service
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
            body = text.encode()
            ctype = "text/plain; charset=utf-8"
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
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

    def _body(self) -> dict[str, Any]:
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise UsageError("bad Content-Length") from None
        if n > MAX_BODY:
            raise UsageError(f"request body of {n} bytes is too large", f"at most {MAX_BODY}")
        raw = self.rfile.read(n) if n else b""
        if not raw:
            return {}
        ctype = self.headers.get("Content-Type", "")
        try:
            if "json" in ctype:
                data = json.loads(raw)
            else:
                data = {k: v[-1] for k, v in
                        urllib.parse.parse_qs(raw.decode(), keep_blank_values=True).items()}
        except (ValueError, UnicodeDecodeError):
            raise UsageError("request body is not valid JSON or form data") from None
        if not isinstance(data, dict):
            raise UsageError("request body must be an object")
        return data

    def _route(self, method: str) -> None:
        path = urllib.parse.urlsplit(self.path).path
        try:
            body = self._body() if method == "POST" else {}
            for m, rx, fn in ROUTES:
                if m == method and (match := re.fullmatch(rx, path)):
                    code, text, data = fn(self.service, body, *match.groups())
                    self._send(code, text, data)
                    return
            raise NotFound(f"no such API endpoint: {method} {path}")
        except KhError as e:
            self._error(_status(e), e)
        except Exception as e:
            log.exception("internal error on %s %s", method, path)
            self._error(500, KhError(f"internal error: {type(e).__name__}: {e}"))

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")


Result = tuple[int, "str | Path", Any]


def _cred(body: dict[str, Any]) -> str | None:
    c = body.get("credential")
    if c is not None and not isinstance(c, str):
        raise UsageError("`credential` must be a string")
    return read_credential(c) if c else None


def _user(body: dict[str, Any]) -> str:
    u = body.get("user")
    if not isinstance(u, str) or not u:
        raise UsageError("`user` is required")
    return u


def allocate(svc: Service, body: dict[str, Any]) -> Result:
    req = Request(user=_user(body), count=_int(body, "count", 1),
                  new_private=_int(body, "p", 0), existing=_netids(body),
                  public=_flag(body, "i"), external=_flag(body, "x"))
    a = svc.khget(req, _cred(body))
    return 201, textobj.format(a), textobj.to_json(a)


def release(svc: Service, body: dict[str, Any], alloc: str) -> Result:
    nodes = body.get("nodes") or []
    if isinstance(nodes, str):
        nodes = [x for x in nodes.split(",") if x]
    done = svc.release(int(alloc), _user(body), _cred(body), [int(n) for n in nodes])
    return 200, f"released {' '.join(map(str, done))}\n", {"released": done}


def reset(svc: Service, body: dict[str, Any], node: str) -> Result:
    svc.reset(int(node), _user(body), _cred(body))
    return 200, f"node {node} is at the U-Boot prompt\n", {"reset": int(node)}


def domain_rm(svc: Service, body: dict[str, Any], netid: str) -> Result:
    svc.remove_domain(int(netid), _user(body), _cred(body))
    return 200, f"domain {netid} removed\n", {"removed": int(netid)}


def key_add(svc: Service, body: dict[str, Any]) -> Result:
    key = body.get("key")
    if not isinstance(key, str):
        raise UsageError("`key` must be an OpenSSH public key line")
    alloc = body.get("allocation")
    kid = svc.add_key(_user(body), _cred(body), key,
                      None if alloc in (None, "") else _int(body, "allocation", 0))
    return 201, f"key {kid} added\n", {"id": kid}


def key_remove(svc: Service, body: dict[str, Any], key_id: str) -> Result:
    svc.remove_key(_user(body), _cred(body), int(key_id))
    return 200, f"key {key_id} removed\n", {"removed": int(key_id)}


def key_list(svc: Service, body: dict[str, Any]) -> Result:
    keys = svc.list_keys(_user(body), _cred(body))
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


ROUTES: list[tuple[str, str, Callable[..., Result]]] = [
    ("POST", r"/v1/allocations", allocate),
    ("POST", r"/v1/allocations/(\d+)/release", release),
    ("POST", r"/v1/nodes/(\d+)/reset", reset),
    ("POST", r"/v1/domains/(\d+)/remove", domain_rm),
    ("POST", r"/v1/keys", key_add),
    ("POST", r"/v1/keys/list", key_list),
    ("POST", r"/v1/keys/(\d+)/remove", key_remove),
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
        return TCPServer((addr, port), handler)
    except OSError as e:
        if e.errno in (98,):
            raise KhError(f"port {port} on {addr} is in use", "pick another with --port") from None
        raise


