"""khd's HTTP API: on a unix socket, on 127.0.0.1, and inside the fabric on the public domain,
where it answers GETs only (images, status, hw): a request with a credential or token from a
node goes over the control channel's ssh (kh.service.chanapi), never in clear.

A WSGI application (App) served by kh.service.httpd (waitress, bounded). Text by default
(khget's text object), JSON with ``Accept: application/json`` or ``?format=json``. Request
bodies are JSON objects only (kh.service.request reads them, strictly); every malformed request
is a 4xx with a one-line reason. Each route is ``fn(svc, caller, body, *path_groups) ->
(status, text or file, JSON data)``; the caller (request.Caller) comes from the transport:
the operator is root on the unix socket, anyone else is a source address. docs/api.yaml is the
OpenAPI description.
"""

from __future__ import annotations

import http
import json
import logging
import os
import re
import stat
import time
import urllib.parse
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

from kh import textobj
from kh.admission import AuthError, Throttled, check_user
from kh.allocation import MAX_NETID, MAX_NODE, NIC_SLOTS, AllocationError, Request, host_address
from kh.errors import KhError, UsageError
from kh.metering import billing
from kh.metering import routes as usage_routes
from kh.metering import top as top_routes
from kh.model import PUBLIC
from kh.service import aoe, hosts, httpd, publish, tokens
from kh.service import request as rq
from kh.service.aoe import ROUTES as AOE_ROUTES
from kh.service.core import NotFound, Service
from kh.service.hardware import Hardware
from kh.service.pins import SUMS
from kh.service.placement import UnknownHost
from kh.service.request import Caller

log = logging.getLogger("kh.api")
MAX_BODY = rq.MAX_BODY
MAX_QUERY = 2048  # a GET's parameters (principal, period, times): far less


class MethodNotAllowed(UsageError):
    """405: a method khd does not serve."""


class NoSecretHere(AuthError):
    """403: a POST (every one carries a credential or token) on the public domain's listener,
    where it would cross the domain in clear: nodes ask over the control channel instead
    (kh.service.chanapi)."""


# The most specific first: TooLarge and Unsupported are UsageErrors, Throttled an AuthError.
STATUS = {MethodNotAllowed: 405, rq.TooLarge: 413, rq.Unsupported: 415, rq.Misdirected: 421,
          UsageError: 400, Throttled: 429, AuthError: 403, NotFound: 404, UnknownHost: 404,
          AllocationError: 409}
METHODS = ("GET", "POST")
Result = tuple[int, "str | Path", Any]


def _status(e: KhError) -> int:
    for cls, code in STATUS.items():
        if isinstance(e, cls):
            return code
    return 500


class App:
    """The API as a WSGI application over one Service. The server puts the caller in the
    environment (``kh.caller``) and says whether it came over TCP (``kh.tcp``: then the Host
    header is checked, request.check_host)."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]
                 ) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        # the path as sent: waitress's PATH_INFO is percent-decoded, and `%33` is not an id
        path = rq.request_path(environ.get("REQUEST_URI", ""))
        query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
        as_json = query.get("format", [""])[0] == "json" or \
            "application/json" in environ.get("HTTP_ACCEPT", "")
        caller: Caller = environ.get("kh.caller") or Caller("unknown", False)
        headers: list[tuple[str, str]] = []
        try:
            code, text, data = self._route(environ, method, path, caller)
        except KhError as e:
            code = _status(e)
            text, data = f"kh: {e}\n", {"error": e.message, "hint": e.hint}
            if isinstance(e, Throttled):
                headers.append(("Retry-After", str(e.retry_after)))
            if code == 405:
                headers.append(("Allow", ", ".join(METHODS)))
        except Exception as e:
            log.exception("internal error on %s %s", method, path[:80])
            code = 500
            text = f"kh: internal error: {type(e).__name__}: {e}\n"
            data = {"error": f"internal error: {type(e).__name__}: {e}", "hint": None}
        status = f"{code} {http.HTTPStatus(code).phrase}"
        if isinstance(text, Path):
            return self._file(environ, start_response, status, text)
        if as_json:
            body = (json.dumps(data, indent=1) + "\n").encode()
            ctype = "application/json"
        else:
            body = text.encode("utf-8", "backslashreplace")
            ctype = "text/plain; charset=utf-8"
        start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(body))),
                                *headers])
        return [body]

    def _route(self, environ: dict[str, Any], method: str, path: str, caller: Caller
               ) -> Result:
        if method not in METHODS:
            raise MethodNotAllowed(f"method {method[:20]!r} is not served", "GET or POST")
        if environ.get("kh.public") and method != "GET":  # its body is never read
            raise NoSecretHere(
                "khd's API on the public domain takes no credential or token (it would cross "
                "the domain in clear); ask over the control channel",
                f"ssh api+USER@{host_address(PUBLIC).ip} -p "
                f"{self.service.cfg.ssh_port}, whose host key nodes pin; the in-node khget does")
        if environ.get("kh.tcp"):
            rq.check_host(environ.get("HTTP_HOST"))
        body = self._body(environ) if method == "POST" else self._query(environ)
        for m, rx, fn in ROUTES:
            if m == method and (match := re.fullmatch(rx, path)):
                if fn in rq.OPERATOR_ONLY and not caller.operator:  # before its fields
                    _operator(caller, rq.OPERATOR_ONLY[fn])
                if "token" in body and fn not in TOKEN_ROUTES:  # kh.service.tokens: scope
                    raise tokens.out_of_scope(f"{method} {path[:80]}")
                if fn in rq.FIELDS:  # each route's parameters, no other (rq.takes)
                    rq.check_fields(body, rq.FIELDS[fn])
                with rq.calling(caller):
                    return fn(self.service, caller, body, *match.groups())
        raise NotFound(f"no such API endpoint: {method} {path[:80]}")

    @staticmethod
    def _body(environ: dict[str, Any]) -> dict[str, Any]:
        """The request's JSON object. The server has framed it (one Content-Length of ASCII
        digits, at most MAX_BODY, refused before it was read otherwise); checked again here."""
        n = rq.content_length(environ.get("CONTENT_LENGTH"),
                              environ.get("HTTP_TRANSFER_ENCODING"))
        raw = environ["wsgi.input"].read(n) if n else b""
        if len(raw) < n:
            raise rq.BadFraming(f"request body ended after {len(raw)} of {n} bytes")
        return rq.parse_body(raw, environ.get("CONTENT_TYPE"))

    @staticmethod
    def _query(environ: dict[str, Any]) -> dict[str, Any]:
        """A GET's parameters, which its route reads as a POST's body: each name once, as a
        string (``format`` is the answer's, not the route's). At most MAX_QUERY bytes."""
        raw = environ.get("QUERY_STRING", "")
        if len(raw) > MAX_QUERY:
            raise UsageError(f"query string of {len(raw)} bytes is too long",
                             f"at most {MAX_QUERY}")
        try:
            pairs = urllib.parse.parse_qsl(raw, keep_blank_values=True, strict_parsing=False,
                                           errors="strict", max_num_fields=32)
        except (ValueError, UnicodeDecodeError):
            raise UsageError("malformed query string") from None
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise UsageError(f"query parameter {k[:40]!r} is given twice")
            out[k] = v
        out.pop("format", None)
        return out

    @staticmethod
    def _file(environ: dict[str, Any], start_response: Callable[..., Any], status: str,
              path: Path) -> Iterable[bytes]:
        """An image, streamed from the open file by the server's loop as the client reads
        it (never read into memory); opened without following a link."""
        f: BinaryIO = open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb")
        size = os.fstat(f.fileno()).st_size
        start_response(status, [("Content-Type", "application/octet-stream"),
                                ("Content-Length", str(size))])
        wrapper = environ.get("wsgi.file_wrapper")
        if wrapper is not None:
            return wrapper(f, 1 << 16)  # type: ignore[no-any-return]
        return iter(lambda: f.read(1 << 16), b"")


# -- the routes --------------------------------------------------------------------------------
def _operator(caller: Caller, what: str, hint: str | None = None) -> None:
    if not caller.operator:
        raise AuthError(what, hint or "as root, on khd's unix socket")


@rq.takes(*rq.PRINCIPAL, "token", "count", "p", "n", "i", "x", "host")
def allocate(svc: Service, caller: Caller, body: dict[str, Any]) -> Result:
    # the bounds Request.check holds, so that an answer out of range states the real range
    req = Request(user=rq.user(body), count=rq.integer(body, "count", 1, 1, MAX_NODE),
                  new_private=rq.integer(body, "p", 0, 0, NIC_SLOTS),
                  existing=rq.integers(body, "n", MAX_NETID),
                  public=rq.flag(body, "i"), external=rq.flag(body, "x"),
                  host=None if body.get("host") is None else rq.text(body, "host", 64))
    a = svc.khget(req, rq.credential(body), tokens.from_body(body))
    return 201, textobj.format(a), textobj.to_json(a)


@rq.takes(*rq.PRINCIPAL, "token", "nodes")
def release(svc: Service, caller: Caller, body: dict[str, Any], alloc: str) -> Result:
    done = svc.release(rq.path_id(alloc, "allocation"), rq.user(body), rq.credential(body),
                       list(rq.integers(body, "nodes", MAX_NODE)), tokens.from_body(body))
    return 200, f"released {' '.join(map(str, done))}\n", {"released": done}


@rq.takes(*rq.PRINCIPAL)
def reset(svc: Service, caller: Caller, body: dict[str, Any], node: str) -> Result:
    number = rq.path_id(node, "node")
    svc.reset(number, rq.user(body), rq.credential(body))
    return 200, f"node {number} is at the U-Boot prompt\n", {"reset": number}


@rq.takes(*rq.PRINCIPAL)
def domain_rm(svc: Service, caller: Caller, body: dict[str, Any], netid: str) -> Result:
    n = rq.path_id(netid, "domain")
    svc.remove_domain(n, rq.user(body), rq.credential(body))
    return 200, f"domain {n} removed\n", {"removed": n}


def _join_body(body: dict[str, Any]) -> int:
    """The domain a join or leave names: {"netid": 0..MAX_NETID}, required."""
    if body.get("netid") is None:
        raise UsageError("`netid` is required", '{"netid": 5}; 0 external, 1 public')
    return rq.integer(body, "netid", 0, 0, MAX_NETID)


@rq.takes(*rq.PRINCIPAL, "netid")
def domain_join(svc: Service, caller: Caller, body: dict[str, Any], node: str) -> Result:
    """Plug a running node's next free interface into a domain (kh.service.membership)."""
    change = svc.join(rq.path_id(node, "node"), _join_body(body), rq.user(body),
                      rq.credential(body))
    return 200, change.text(), change.to_json()


@rq.takes(*rq.PRINCIPAL, "netid")
def domain_leave(svc: Service, caller: Caller, body: dict[str, Any], node: str) -> Result:
    change = svc.leave(rq.path_id(node, "node"), _join_body(body), rq.user(body),
                       rq.credential(body))
    return 200, change.text(), change.to_json()


@rq.takes(*rq.PRINCIPAL, "key", "allocation")
def key_add(svc: Service, caller: Caller, body: dict[str, Any]) -> Result:
    key = rq.text(body, "key", 16 * 1024)
    alloc = body.get("allocation")
    kid = svc.add_key(rq.user(body), rq.credential(body), key,
                      None if alloc is None else rq.integer(body, "allocation", 0))
    return 201, f"key {kid} added\n", {"id": kid}


@rq.takes(*rq.PRINCIPAL)
def key_remove(svc: Service, caller: Caller, body: dict[str, Any], key_id: str) -> Result:
    kid = rq.path_id(key_id, "key")
    svc.remove_key(rq.user(body), rq.credential(body), kid)
    return 200, f"key {kid} removed\n", {"removed": kid}


@rq.takes(*rq.PRINCIPAL)
def key_list(svc: Service, caller: Caller, body: dict[str, Any]) -> Result:
    keys = svc.list_keys(rq.user(body), rq.credential(body))
    text = "".join(f"{k['id']:>4} {k['allocation'] or 'all'!s:>5} {k['key']} {k['comment']}\n"
                   for k in keys)
    return 200, text, keys


def ps_table(data: dict[str, Any]) -> str:
    """`kh ps`'s tables: nodes, allocations, domains (a principal's view has no PIDs)."""
    lines = [f"{'NODE':>5} {'UID':>5} {'STATE':<10} {'ALLOC':>5} {'PID':>8} {'DOMAINS':<11} "
             "NOTE"]
    for n in data["nodes"]:
        doms = "-" if n.get("netids") is None else _netids(n["netids"]) or "none"
        where = n.get("host", "local")  # a node of another host (kh host add) says so
        note = n["note"] if where == "local" else "; ".join(
            x for x in (f"on host {where}", n["note"]) if x)
        lines.append(f"{n['node']:>5} {n['uid']:>5} {n['state']:<10} "
                     f"{n['allocation'] or '-'!s:>5} {n['pid'] or '-'!s:>8} {doms:<11} "
                     f"{note}")
    lines.append("")
    lines.append(f"{'ALLOC':>5} {'PRINCIPAL':<12} {'DOMAINS':<16} NODES")
    for a in data["allocations"]:
        lines.append(f"{a['id']:>5} {a['principal']:<12} "
                     f"{_netids(a['netids']):<16} {' '.join(map(str, a['nodes']))}")
    lines.append("")
    lines.append(f"{'DOMAIN':>6} {'KIND':<9} OWNER")
    for d in data["domains"]:
        lines.append(f"{d['netid']:>6} {d['kind']:<9} {d['owner'] or '-'}")
    if "quota" in data:
        q = data["quota"]
        lines += ["", f"quota: {q['nodes'][0]} of {q['nodes'][1]} nodes, "
                  f"{q['domains'][0]} of {q['domains'][1]} private domains"]
    return "\n".join(lines) + "\n"


def _netids(netids: list[int | None]) -> str:
    """Domains by interface, "-" for a free one: 0,-,5."""
    return ",".join("-" if n is None else str(n) for n in netids)


@rq.takes()
def ps(svc: Service, caller: Caller, body: dict[str, Any]) -> Result:
    """Everything, with QEMU PIDs: the operator's alone."""
    _operator(caller, "`kh ps` over TCP needs a principal's credential", "POST /v1/ps")
    data = svc.ps()
    data["publishes"] = publish.listing(svc)
    return 200, ps_table(data) + publish.table(data["publishes"]), data


@rq.takes(*rq.PRINCIPAL)
def ps_of(svc: Service, caller: Caller, body: dict[str, Any]) -> Result:
    """One principal's own allocations, nodes and domains, in ps's shape."""
    user = rq.user(body)
    data = svc.ps_of(user, rq.credential(body))
    data["publishes"] = publish.listing(svc, user)  # its own only
    return 200, ps_table(data) + publish.table(data["publishes"]), data


@rq.operator_only("listing principals is the operator's")
@rq.takes()
def principals(svc: Service, caller: Caller, body: dict[str, Any]) -> Result:
    _operator(caller, "listing principals is the operator's")
    data = svc.principals()
    lines = [f"{'PRINCIPAL':<16} {'ALLOCS':>6} {'NODES':>5} {'DOMAINS':>7} {'KEYS':>4}  CREATED"]
    lines += [f"{p['name']:<16} {p['allocations']:>6} {p['nodes']:>5} {p['domains']:>7} "
              f"{p['keys']:>4}  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(p['created']))}"
              for p in data]
    return 200, "\n".join(lines) + "\n", data


@rq.operator_only("removing a principal is the operator's")
@rq.takes()
def principal_rm(svc: Service, caller: Caller, body: dict[str, Any], name: str) -> Result:
    _operator(caller, "removing a principal is the operator's")
    gone = svc.remove_principal(check_user(name))
    text = (f"principal {name} removed: released allocations "
            f"{' '.join(map(str, gone.get('allocations', []))) or 'none'}, nodes "
            f"{' '.join(map(str, gone.get('nodes', []))) or 'none'}, domains "
            f"{' '.join(map(str, gone.get('domains', []))) or 'none'}, "
            f"{gone.get('keys', 0)} keys\n")
    return 200, text, gone


@rq.takes()
def hw(svc: Service, caller: Caller, body: dict[str, Any]) -> Result:
    d = Hardware(svc.cfg).describe()
    text = "\n".join(f"{k}: {v}" if not isinstance(v, (list, dict)) else
                     f"{k}:\n" + "\n".join(f"  {x}" if isinstance(v, list) else f"  {x}: {v[x]}"
                                          for x in v) for k, v in d.items())
    return 200, text + "\n", d


@rq.takes()
def status(svc: Service, caller: Caller, body: dict[str, Any]) -> Result:
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
    out = svc.cfg.fabric
    outside = None if out.uplink_netns is None else {"netns": out.uplink_netns,
                                                     "own": out.own_outside}
    text += ("outside world: none (khd runs with --no-outside)\n" if outside is None else
             f"outside world: network namespace {out.uplink_netns} "
             f"({'kh' if out.own_outside else 'the operator'}'s; `kh outside CMD` runs there)\n")
    port = svc.cfg.page_port  # the live page (kh.page), on 127.0.0.1 when on
    page = {"url": f"http://127.0.0.1:{port}/", "port": port} if port else None
    text += (f"live page: {page['url']} (`kh page` gives a login link)\n" if page else
             "live page: off (khd runs without --page-port)\n")
    return 200, text, {"running": True, "nodes": st.size, **st.to_json(),
                       "repairs": svc.repairs, "outside": outside, "page": page}


# What a principal may fetch from the images directory (docs/api.yaml): the node images (U-Boot,
# the kernel, each appliance: kh.appliance.spec.NAME_RE before .cpio.gz.uimg) and the full root
# file servers unpack (kh.rootimage). Nothing else there is published: kh's own QEMU, the build
# records, the root's tree, whatever the operator leaves there.
PUBLISHED = re.compile(r"u-boot\.elf|uImage|root\.tar\.gz|[a-z][a-z0-9-]{0,30}\.cpio\.gz\.uimg")


def _published(images: Path, name: str) -> Path | None:
    """``images/name`` when ``name`` is a published image's name and that is a regular file
    (never through a link: the final open is O_NOFOLLOW too); None otherwise."""
    if not PUBLISHED.fullmatch(name):
        return None
    p = images / name
    try:
        return p if stat.S_ISREG(p.lstat().st_mode) else None
    except OSError:
        return None


@rq.takes()
def images(svc: Service, caller: Caller, body: dict[str, Any]) -> Result:
    """The published images a node may fetch (the disk server loads kernels and appliances;
    PUBLISHED names them): regular files only, never a link; one ``NAME SIZE SHA256`` line
    each (kh.service.pins)."""
    files = sorted(p for p in (_published(svc.cfg.images, n)
                               for n in os.listdir(svc.cfg.images)) if p is not None)
    data = []
    for p in files:
        try:  # each with its sha256, which a node checks its download against
            data.append({"image": p.name, "size": p.lstat().st_size,
                         "sha256": SUMS.sha256(p)})
        except OSError:  # gone (or replaced by a link) since it was listed
            continue
    return 200, "".join(f"{d['image']} {d['size']} {d['sha256']}\n" for d in data), data


@rq.takes()
def image(svc: Service, caller: Caller, body: dict[str, Any], name: str) -> Result:
    """One published image (PUBLISHED), as the open file; 404 for any other name."""
    p = _published(svc.cfg.images, name)
    if p is None:
        raise NotFound(f"no image {name[:80]!r}", "GET /v1/images lists them")
    return 200, p, None


ID = r"([^/]+)"  # an id in a path: checked by its handler (rq.path_id), so "abc" is a 400
NAME = r"([^/]+?)"  # a principal's name in a path: checked by its handler (400 when bad)
ROUTES: list[tuple[str, str, Callable[..., Result]]] = [
    ("POST", r"/v1/allocations", allocate),
    ("POST", rf"/v1/allocations/{ID}/release", release),
    ("POST", rf"/v1/nodes/{ID}/reset", reset),
    ("POST", rf"/v1/domains/{ID}/remove", domain_rm),
    ("POST", rf"/v1/nodes/{ID}/join", domain_join),
    ("POST", rf"/v1/nodes/{ID}/leave", domain_leave),
    ("POST", r"/v1/keys", key_add),
    ("POST", r"/v1/keys/list", key_list),
    ("POST", rf"/v1/keys/{ID}/remove", key_remove),
    ("POST", r"/v1/tokens", tokens.route_add),
    ("POST", r"/v1/tokens/list", tokens.route_list),
    ("POST", rf"/v1/tokens/{ID}/remove", tokens.route_remove),
    ("GET", r"/v1/ps", ps),
    ("POST", r"/v1/ps", ps_of),
    ("GET", r"/v1/principals", principals),
    ("POST", rf"/v1/principals/{NAME}/remove", principal_rm),
    ("GET", r"/v1/hw", hw),
    ("GET", r"/v1/status", status),
    ("GET", r"/v1/images", images),
    ("GET", r"/v1/images/([A-Za-z0-9_+-][A-Za-z0-9._+-]*)", image),
    *hosts.ROUTES,  # kh host add|list|rm, the operator's (kh.service.hosts)
    *AOE_ROUTES,  # disk nodes' AoE addresses, unique per domain (kh.service.aoe)
    *publish.ROUTES,  # node ports on the host's loopback (kh.service.publish)
    *usage_routes.ROUTES,  # what principals used (kh.metering)
    *billing.ROUTES,  # their bills (kh.metering.billing)
    *top_routes.ROUTES,  # the nodes now, for `kh top` (kh.metering.top)
]

# The only routes a token may use (with `token` instead of `credential`; kh.service.tokens).
TOKEN_ROUTES = (allocate, release, aoe.route_assign, usage_routes.usage_own)


# -- servers -----------------------------------------------------------------------------------
def handler_for(svc: Service) -> App:
    return App(svc)


def UnixServer(path: str | Path, app: App, limits: httpd.Limits | None = None
               ) -> httpd.HttpServer:
    """The API on a unix socket at ``path``: its peers' credentials say who is the operator.
    Its own worker threads (httpd.OPERATOR_WORKERS), so TCP clients never hold it up."""
    lim = limits or httpd.Limits(workers=httpd.OPERATOR_WORKERS)
    return httpd.HttpServer(app, [httpd.bind_unix(path)], lim, name="api-unix")


def tcp_server(addr: str, port: int, app: App, limits: httpd.Limits | None = None
               ) -> httpd.HttpServer:
    return httpd.HttpServer(app, [httpd.bind_tcp(addr, port)], limits, name="api-tcp")


def serve(server: httpd.HttpServer) -> Any:
    return server.start()
