"""What the live page shows, gathered for one session: the view (kh ps's shape, through the
same kh.service.views as the API: a principal's has only its own), each shown node's last
console lines made safe, the topology SVG, and the principal's usage when the meter runs.

``Source`` is what the page asks of khd; ``ServiceSource`` answers from the running Service.
Console lines come from khd's console logs (already redacted of secrets, kh.hw.redact); a
principal sees only the lines its allocation's time covers (a node's log goes on across the
principals that held it), never terminal bytes: escape sequences are removed, other controls
shown as ^X (kh.logview), and the template escapes the rest for HTML.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from xml.etree import ElementTree

from kh.errors import KhError
from kh.hw.console import utc_stamp
from kh.logview import safe_text
from kh.topo import render
from kh.topo.model import from_ps

log = logging.getLogger("kh.page")

CONSOLE_LINES = 8  # a node's last console lines shown
CONSOLE_BYTES = 16 * 1024  # read from a log's end to find them
LINE_CHARS = 200  # a console line is cut there
# ESC sequences: CSI (colours, cursor moves), OSC (titles: ends with BEL or ST), and the rest
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[ -~]?")
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (.*)$")


class Source(Protocol):
    """What the page needs of khd."""

    ssh_port: int

    def view(self, principal: str | None) -> dict[str, Any]:
        """kh ps's JSON: the operator's (None) or the principal's own, with "publishes"."""

    def console_log(self, node: int) -> Path: ...

    def authenticate(self, user: str, credential: str) -> None:
        """Raises admission.AuthError (or Throttled) unless ``credential`` is ``user``'s."""

    def exists(self, principal: str) -> bool: ...

    def usage(self, principal: str | None) -> list[tuple[str, str]] | None:
        """(what, amount) rows of the last 24 hours, or None when nothing is metered."""


class ServiceSource:
    """The running Service's answers."""

    def __init__(self, svc: Any) -> None:
        self.svc = svc
        self.ssh_port = svc.cfg.ssh_port

    def view(self, principal: str | None) -> dict[str, Any]:
        from kh.service import publish, views
        svc = self.svc
        size = sum(svc.hosts.sizes().values())  # every host's share (kh.service.hosts)
        data = (views.operator(svc.store, svc.cfg, svc.repairs, size) if principal is None
                else views.principal(svc.store, svc.cfg, principal, size))
        data["publishes"] = publish.listing(svc, principal)
        return data

    def console_log(self, node: int) -> Path:
        return Path(self.svc.cfg.console_log(node))

    def authenticate(self, user: str, credential: str) -> None:
        self.svc.authenticate(user, credential)

    def exists(self, principal: str) -> bool:
        return self.svc.store.principal(principal) is not None

    def usage(self, principal: str | None) -> list[tuple[str, str]] | None:
        from kh.page.usage import last_day
        return last_day(self.svc.store, principal)


def clean_line(raw: bytes) -> str:
    """One console line as the page may show it: no escape sequence, every other control
    as ^X, at most LINE_CHARS characters."""
    text = _ESCAPES.sub("", raw.decode("utf-8", "replace"))
    text = safe_text(text.replace("\t", " "))
    return text if len(text) <= LINE_CHARS else text[: LINE_CHARS - 1] + "…"


def console_tail(path: Path, since: float | None, lines: int = CONSOLE_LINES) -> list[str]:
    """The last ``lines`` lines of a console log (made safe), only those stamped at or after
    ``since`` (seconds since the epoch) when given; [] when there is no log."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - CONSOLE_BYTES))
            data = f.read(CONSOLE_BYTES)
    except OSError:
        return []
    rows = data.split(b"\n")
    if size > CONSOLE_BYTES:
        rows = rows[1:]  # the first may be cut
    floor = None if since is None else utc_stamp(since)
    out = []
    for row in rows:
        if not row.strip():
            continue
        m = _STAMP.match(row.decode("utf-8", "replace"))
        if floor is not None and (m is None or m[1] < floor):
            continue
        out.append(clean_line(row))
    return out[-lines:]


# -- the topology picture ----------------------------------------------------------------------
# What Graphviz writes for kh's DOT; anything else (a script, a link, an event attribute) and
# the picture is not shown.
_SVG_TAGS = {"svg", "g", "title", "polygon", "polyline", "path", "ellipse", "text", "desc",
             "defs", "style"}
_SVG_NS = "{http://www.w3.org/2000/svg}"


def checked_svg(svg: str) -> str:
    """``svg`` without its XML prologue, after checking it holds only drawing elements and no
    event handler or link (KhError otherwise): safe to put inline in the page."""
    try:
        root = ElementTree.fromstring(svg)
    except ElementTree.ParseError as e:
        raise KhError(f"the topology SVG is not XML: {e}") from None
    for el in root.iter():
        tag = el.tag.removeprefix(_SVG_NS)
        if tag not in _SVG_TAGS or tag == "style":
            raise KhError(f"the topology SVG holds a <{tag[:20]}>")
        for attr in el.attrib:
            name = attr.rsplit("}", 1)[-1].lower()
            if name.startswith("on") or name == "href":
                raise KhError(f"the topology SVG has an attribute {name[:20]}")
    start = svg.find("<svg")
    return svg[start:]


class SvgCache:
    """Graphviz's SVG for a topology, kept for the last few distinct DOT texts (a page
    polling an unchanged system does not run dot each time)."""

    def __init__(self, size: int = 16, dot_program: str = "dot") -> None:
        self.size = size
        self.dot_program = dot_program
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, str] = OrderedDict()

    def get(self, data: dict[str, Any], ssh_port: int) -> tuple[str | None, str | None]:
        """(SVG, None), or (None, why it cannot be drawn)."""
        t = from_ps(data, ssh_port=ssh_port)
        key = hashlib.sha256(render.dot(t).encode()).hexdigest()
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key], None
        try:
            svg = checked_svg(render.svg(t, self.dot_program))
        except KhError as e:
            return None, str(e)
        with self._lock:
            self._cache[key] = svg
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return svg, None


@dataclass(frozen=True)
class NodeRow:
    """One node on the page."""

    number: int
    principal: str
    state: str
    allocation: int | None
    note: str
    console: tuple[str, ...]


def nodes(source: Source, data: dict[str, Any], principal: str | None) -> list[NodeRow]:
    """The view's allocated nodes with their console tails (a principal's only from its
    allocation's creation on)."""
    allocs = {a["id"]: a for a in data["allocations"]}
    out = []
    for n in data["nodes"]:
        a = allocs.get(n.get("allocation"))
        if a is None:
            continue
        since = None if principal is None else float(a.get("created") or 0)
        out.append(NodeRow(int(n["node"]), str(a["principal"]), str(n["state"]),
                           n.get("allocation"), str(n.get("note") or ""),
                           tuple(console_tail(source.console_log(int(n["node"])), since))))
    return out
