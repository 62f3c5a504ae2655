"""The state's hosts (schema 8): kh.store.Store's rows for kh.service.hosts.

A host is a libvirt host khd runs nodes on besides its own (the implicit ``local``, which has
no row): its name, libvirt URI, capacity (nodes khd keeps there), its underlay address (the
far end of the domains stretched to it, kh.hw.stretch), the kh prefix there (its fabric's
names), the kh command there and the runner (an argv prefix, e.g. ssh ...) that reaches it.
Each node row names its host (``nodes.host``). Each change is one transaction, as in kh.store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sqlite3
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kh.errors import KhError
from kh.model import NodeState

LOCAL = "local"  # khd's own host: never a row
_COLUMNS = "name, uri, capacity, underlay, underlay_if, mtu, prefix, kh, runner, seq, added"


@dataclass(frozen=True)
class HostRow:
    """One host as recorded: ``capacity`` in nodes, ``underlay`` an IPv4 address,
    ``underlay_if`` the interface there that holds it and ``mtu`` its MTU (bytes),
    ``runner`` the words before `kh fabric ...` that run it there (empty: on this machine),
    ``seq`` its place in the order hosts were added (placement's order)."""

    name: str
    uri: str
    capacity: int
    underlay: str
    underlay_if: str
    mtu: int
    prefix: str
    kh: str
    runner: tuple[str, ...]
    seq: int = 0
    added: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "uri": self.uri, "capacity": self.capacity,
                "underlay": self.underlay, "underlay_interface": self.underlay_if,
                "underlay_mtu": self.mtu, "prefix": self.prefix, "kh": self.kh,
                "runner": list(self.runner), "added": self.added}


def _row(r: tuple[Any, ...]) -> HostRow:
    return HostRow(r[0], r[1], int(r[2]), r[3], r[4], int(r[5]), r[6], r[7],
                   tuple(json.loads(r[8])), int(r[9]), float(r[10]))


class HostRows:
    """Store's host methods (a mixin: Store supplies ``tx`` and ``_rows``)."""

    if TYPE_CHECKING:
        def tx(self) -> contextlib.AbstractContextManager[sqlite3.Connection]: ...

        def _rows(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]: ...

    def add_host(self, h: HostRow) -> HostRow:
        """Record host ``h`` after every other (its ``seq``); KhError if the name is taken."""
        with self.tx() as db:
            if db.execute("SELECT 1 FROM hosts WHERE name=?", (h.name,)).fetchone():
                raise KhError(f"host {h.name} is already added", "kh host list shows it")
            seq = int(db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM hosts").fetchone()[0])
            now = time.time()
            db.execute(f"INSERT INTO hosts ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (h.name, h.uri, h.capacity, h.underlay, h.underlay_if, h.mtu, h.prefix,
                        h.kh, json.dumps(list(h.runner)), seq, now))
        return dataclasses.replace(h, seq=seq, added=now)

    def hosts(self) -> list[HostRow]:
        """Every added host, in the order they were added."""
        return [_row(r) for r in self._rows(f"SELECT {_COLUMNS} FROM hosts ORDER BY seq")]

    def host(self, name: str) -> HostRow | None:
        rows = self._rows(f"SELECT {_COLUMNS} FROM hosts WHERE name=?", (name,))
        return _row(rows[0]) if rows else None

    def node_hosts(self) -> dict[int, str]:
        """Each node's host, by number."""
        return {int(r[0]): str(r[1]) for r in self._rows("SELECT number, host FROM nodes")}

    def remove_host(self, name: str) -> list[int]:
        """Forget host ``name`` and its node rows, in one transaction: refused (KhError) while
        one of its nodes is held by an allocation. The node numbers forgotten."""
        with self.tx() as db:
            held = [int(r[0]) for r in db.execute(
                "SELECT number FROM nodes WHERE host=? AND (alloc IS NOT NULL OR state=?) "
                "ORDER BY number", (name, NodeState.CONFIGURING.value))]
            if held:
                raise KhError(f"host {name} has {len(held)} allocated node"
                              f"{'s' if len(held) > 1 else ''} ({' '.join(map(str, held))})",
                              "release them first")
            gone = [int(r[0]) for r in db.execute(
                "SELECT number FROM nodes WHERE host=? ORDER BY number", (name,))]
            db.execute("DELETE FROM nodes WHERE host=?", (name,))
            db.execute("DELETE FROM hosts WHERE name=?", (name,))
            return gone
