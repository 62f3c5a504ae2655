"""kh's state in SQLite (WAL): principals, domains, allocations, nodes.

khd is the only writer. Every change is one transaction, so a khd killed at any point restarts
from a consistent state and reconciles it with what is really running. A request whose side
effects reach the host (QEMU, bridges, U-Boot) records what it is about to do in one transaction
(nodes `configuring`, `releasing`, `resetting`; a principal `removing`), does it, and commits the
outcome in one more; the next khd finishes or undoes what it finds half-done (kh.service.core).
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kh.errors import KhError
from kh.model import Domain, DomainKind, NodeState
from kh.store_hosts import LOCAL, HostRow, HostRows
from kh.store_schema import MIGRATIONS, SCHEMA, SCHEMA_VERSION
from kh.store_tokens import TokenRow, TokenRows

__all__ = ["MIGRATIONS", "SCHEMA", "SCHEMA_VERSION", "AllocRow", "HostRow", "NodeRow", "Store",
           "TokenRow"]


@dataclass(frozen=True)
class NodeRow:
    number: int
    uid: int
    state: NodeState
    pid: int | None
    alloc: int | None
    workdir: str
    started: float
    reason: str | None  # why it failed: QEMU's last word, or the stage that timed out
    attempts: int = 0  # failed starts in a row
    retry_at: float | None = None  # when a failed start is tried again; None: not at all
    resetting: bool = False  # a reset is under way (finished by the next khd if this one dies)
    host: str = LOCAL  # the host it runs on (kh.store_hosts; "local": khd's own)


@dataclass(frozen=True)
class AllocRow:
    id: int
    principal: str
    created: float
    released: float | None
    netids: tuple[int, ...]
    token: int | None = None  # the token it was made with (kh.service.tokens), if any


class Store(TokenRows, HostRows):
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.execute("PRAGMA busy_timeout=5000")
        self._migrate()

    def _migrate(self) -> None:
        with self.tx() as db:
            have = db.execute("SELECT name FROM sqlite_master WHERE name='meta'").fetchone()
            if not have:
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
                db.execute("INSERT INTO meta VALUES ('next_uid', '1')")
                db.execute("INSERT INTO domains VALUES (0, 'external', NULL, ?)", (time.time(),))
                db.execute("INSERT INTO domains VALUES (1, 'public', NULL, ?)", (time.time(),))
                db.execute("UPDATE meta SET value='1' WHERE key='schema'")
            version = int(db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0])
            while version < SCHEMA_VERSION:
                version += 1
                for statement in MIGRATIONS[version].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute("UPDATE meta SET value=? WHERE key='schema'", (str(version),))
            if version > SCHEMA_VERSION:
                raise KhError(f"state {self.path} has schema {version}, newer than this kh",
                              "upgrade kh or use another --state-dir")

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One immediate transaction; nested calls join the outer one."""
        with self._lock:
            if self.db.in_transaction:
                yield self.db
                return
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self.db.close()

    def _rows(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        """A read: the one connection is shared by khd's threads, so reads take its lock too."""
        with self._lock:
            return list(self.db.execute(sql, args).fetchall())

    # -- principals -----------------------------------------------------------------------
    def principal(self, name: str) -> tuple[bytes, bytes] | None:
        rows = self._rows("SELECT salt, hash FROM principals WHERE name=?", (name,))
        return (rows[0][0], rows[0][1]) if rows else None

    def add_principal(self, name: str, salt: bytes, digest: bytes) -> None:
        with self.tx() as db:
            db.execute("INSERT INTO principals (name, salt, hash, created) "
                       "VALUES (?, ?, ?, ?)", (name, salt, digest, time.time()))

    # -- keys (control-channel access by public key) --------------------------------------------
    def add_key(self, principal: str, key: str, comment: str, alloc: int | None) -> int:
        with self.tx() as db:
            cur = db.execute("INSERT INTO keys (principal, alloc, key, comment, added) "
                             "VALUES (?, ?, ?, ?, ?)", (principal, alloc, key, comment,
                                                         time.time()))
            return int(cur.lastrowid or 0)

    def remove_key(self, principal: str, key_id: int) -> bool:
        with self.tx() as db:
            cur = db.execute("DELETE FROM keys WHERE id=? AND principal=?", (key_id, principal))
            return cur.rowcount > 0

    def keys(self, principal: str | None = None) -> list[tuple[int, str, int | None, str, str]]:
        q = "SELECT id, principal, alloc, key, comment FROM keys"
        rows = (self._rows(q + " WHERE principal=? ORDER BY id", (principal,))
                if principal else self._rows(q + " ORDER BY id"))
        return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    # -- domains --------------------------------------------------------------------------
    def domains(self) -> list[Domain]:
        rows = self._rows("SELECT netid, kind, owner FROM domains ORDER BY netid")
        return [Domain(r[0], DomainKind(r[1]), r[2]) for r in rows]

    def private_owners(self) -> dict[int, str]:
        return {d.netid: d.owner for d in self.domains() if d.owner is not None}

    def add_domain(self, d: Domain) -> None:
        with self.tx() as db:
            db.execute("INSERT INTO domains VALUES (?, ?, ?, ?)",
                       (d.netid, d.kind.value, d.owner, time.time()))

    def remove_domain(self, netid: int) -> bool:
        """Forget domain ``netid`` in one transaction, unless a live allocation uses it (then
        nothing changes and the answer is False). Released allocations that used it forget it
        too, so that its id can be given to another domain."""
        with self.tx() as db:
            if self.domain_in_use(netid):
                return False
            db.execute("DELETE FROM alloc_domains WHERE netid=? AND alloc IN "
                       "(SELECT id FROM allocations WHERE released IS NOT NULL)", (netid,))
            db.execute("DELETE FROM domains WHERE netid=?", (netid,))
            return True

    def domain_in_use(self, netid: int) -> bool:
        return bool(self._rows(
            "SELECT 1 FROM alloc_domains ad JOIN allocations a ON a.id = ad.alloc "
            "WHERE ad.netid=? AND a.released IS NULL LIMIT 1", (netid,)))

    # -- allocations ----------------------------------------------------------------------
    def add_allocation(self, principal: str, netids: tuple[int, ...],
                       token: int | None = None) -> int:
        with self.tx() as db:
            cur = db.execute("INSERT INTO allocations (principal, created, token) "
                             "VALUES (?, ?, ?)", (principal, time.time(), token))
            alloc = int(cur.lastrowid or 0)
            for slot, netid in enumerate(netids):
                db.execute("INSERT INTO alloc_domains VALUES (?, ?, ?)", (alloc, slot, netid))
            return alloc

    def allocation(self, alloc: int) -> AllocRow | None:
        rows = self._rows("SELECT id, principal, created, released, token FROM allocations "
                          "WHERE id=?", (alloc,))
        if not rows:
            return None
        row = rows[0]
        nets = self._rows("SELECT netid FROM alloc_domains WHERE alloc=? ORDER BY slot",
                          (alloc,))
        return AllocRow(row[0], row[1], row[2], row[3], tuple(n[0] for n in nets), row[4])

    def allocations(self, active_only: bool = True) -> list[AllocRow]:
        q = "SELECT id FROM allocations" + (" WHERE released IS NULL" if active_only else "")
        out = []
        for (i,) in self._rows(q + " ORDER BY id"):
            a = self.allocation(i)
            if a:
                out.append(a)
        return out

    def release_allocation(self, alloc: int) -> None:
        with self.tx() as db:
            db.execute("UPDATE allocations SET released=? WHERE id=? AND released IS NULL",
                       (time.time(), alloc))

    # -- nodes ----------------------------------------------------------------------------
    def new_uid(self) -> int:
        with self.tx() as db:
            uid = int(db.execute("SELECT value FROM meta WHERE key='next_uid'").fetchone()[0])
            db.execute("UPDATE meta SET value=? WHERE key='next_uid'", (str(uid + 1),))
            return uid

    def put_node(self, n: NodeRow) -> None:
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO nodes (number, uid, state, pid, alloc, workdir, "
                       "started, reason, attempts, retry_at, resetting, host) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (n.number, n.uid, n.state.value, n.pid, n.alloc, n.workdir, n.started,
                        n.reason, n.attempts, n.retry_at, int(n.resetting), n.host))

    def _nodes(self, where: str = "", args: tuple[object, ...] = ()) -> list[NodeRow]:
        rows = self._rows("SELECT number, uid, state, pid, alloc, workdir, started, reason, "
                          f"attempts, retry_at, resetting, host FROM nodes {where} ORDER BY number",
                          args)
        return [NodeRow(r[0], r[1], NodeState(r[2]), r[3], r[4], r[5], r[6], r[7], r[8], r[9],
                        bool(r[10]), r[11]) for r in rows]

    def nodes(self, *states: NodeState) -> list[NodeRow]:
        """Every node, or those in one of ``states``, by number."""
        if not states:
            return self._nodes()
        marks = ", ".join("?" * len(states))
        return self._nodes(f"WHERE state IN ({marks})", tuple(s.value for s in states))

    def nodes_of(self, alloc: int, *states: NodeState) -> list[NodeRow]:
        """The nodes of allocation ``alloc`` (in one of ``states``, if given)."""
        return [r for r in self._nodes("WHERE alloc=?", (alloc,))
                if not states or r.state in states]

    def node(self, number: int) -> NodeRow | None:
        rows = self._nodes("WHERE number=?", (number,))
        return rows[0] if rows else None

    def _update(self, number: int, **fields: object) -> None:
        cols = ", ".join(f"{k}=?" for k in fields)
        vals = [v.value if isinstance(v, NodeState) else v for v in fields.values()]
        with self.tx() as db:
            db.execute(f"UPDATE nodes SET {cols} WHERE number=?", (*vals, number))

    def node_starting(self, number: int, pid: int | None = None) -> None:
        """A start of the node is under way (again); ``pid`` once its QEMU runs."""
        self._update(number, state=NodeState.STARTING, pid=pid, retry_at=None)

    def node_free(self, number: int, pid: int, started: float) -> None:
        """The node reached the U-Boot prompt: in the pool. Its failure count stays until it
        has proved itself (see pool.attempts_after)."""
        self._update(number, state=NodeState.FREE, pid=pid, started=started, reason=None,
                     retry_at=None)

    def node_failed(self, number: int, reason: str, attempts: int | None = None,
                    retry_at: float | None = None) -> None:
        """The node failed (its QEMU is gone): never handed out; started again at ``retry_at``
        if that is set."""
        fields: dict[str, object] = {"state": NodeState.FAILED, "pid": None, "reason": reason,
                                     "retry_at": retry_at, "resetting": 0}
        if attempts is not None:
            fields["attempts"] = attempts
        self._update(number, **fields)

    def delete_node(self, number: int) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM nodes WHERE number=?", (number,))

    # -- changes that cross the state and the host (see the module's docstring) ---------------
    @staticmethod
    def _marks(numbers: list[int] | tuple[int, ...]) -> str:
        return ", ".join("?" * len(numbers))

    def nodes_configuring(self, numbers: list[int]) -> None:
        """khget, before it touches the host: free nodes ``numbers`` become `configuring` for an
        allocation not committed yet. All or none (KhError if one is no longer free)."""
        with self.tx() as db:
            cur = db.execute(f"UPDATE nodes SET state=? WHERE state=? AND alloc IS NULL AND "
                             f"number IN ({self._marks(numbers)})",
                             (NodeState.CONFIGURING.value, NodeState.FREE.value, *numbers))
            if cur.rowcount != len(set(numbers)):
                raise KhError(f"nodes {numbers} are not all free")

    def commit_allocation(self, principal: str, register: tuple[bytes, bytes] | None,
                          create: tuple[Domain, ...], netids: tuple[int, ...],
                          numbers: list[int], token: int | None = None) -> int:
        """khget's outcome in one transaction: the principal (``register``: its salt and hash,
        when new), its new domains, the allocation with its domains in eth order, and nodes
        ``numbers`` (`configuring`) allocated to it (made with ``token``, if one). Returns the
        allocation's id."""
        with self.tx() as db:
            now = time.time()
            if register is not None:
                db.execute("INSERT INTO principals (name, salt, hash, created) "
                           "VALUES (?, ?, ?, ?)", (principal, *register, now))
            for d in create:
                db.execute("INSERT INTO domains VALUES (?, ?, ?, ?)",
                           (d.netid, d.kind.value, d.owner, now))
            alloc = self.add_allocation(principal, netids, token)
            cur = db.execute(f"UPDATE nodes SET state=?, alloc=?, attempts=0 WHERE state=? "
                             f"AND number IN ({self._marks(numbers)})",
                             (NodeState.ALLOCATED.value, alloc, NodeState.CONFIGURING.value,
                              *numbers))
            if cur.rowcount != len(set(numbers)):
                raise KhError(f"nodes {numbers} are no longer being configured")
            return alloc

    def nodes_releasing(self, numbers: list[int]) -> None:
        """A release (or a principal's removal), before its QEMUs are stopped: nodes
        ``numbers`` leave their allocation's use (`releasing`)."""
        with self.tx() as db:
            db.execute(f"UPDATE nodes SET state=?, resetting=0 WHERE number IN "
                       f"({self._marks(numbers)})", (NodeState.RELEASING.value, *numbers))

    def drop_nodes(self, numbers: list[int]) -> list[int]:
        """Nodes whose QEMUs are stopped leave the state in one transaction (the pool starts
        fresh ones), with every allocation of theirs that has no node left: returns those
        allocations, now released."""
        with self.tx() as db:
            marks = self._marks(numbers)
            allocs = [r[0] for r in db.execute(
                f"SELECT DISTINCT alloc FROM nodes WHERE alloc IS NOT NULL AND number IN "
                f"({marks}) ORDER BY alloc", tuple(numbers))]
            db.execute(f"DELETE FROM nodes WHERE number IN ({marks})", tuple(numbers))
            emptied = [a for a in allocs if not db.execute(
                "SELECT 1 FROM nodes WHERE alloc=? LIMIT 1", (a,)).fetchone()]
            for a in emptied:
                db.execute("UPDATE allocations SET released=? WHERE id=? AND released IS NULL",
                           (time.time(), a))
            return emptied

    def node_resetting(self, number: int, resetting: bool) -> None:
        self._update(number, resetting=int(resetting))

    def principal_removing(self, name: str, numbers: list[int]) -> None:
        """A principal's removal, before its QEMUs are stopped: the principal is marked, and
        its nodes ``numbers`` are `releasing`, in one transaction."""
        with self.tx() as db:
            db.execute("UPDATE principals SET removing=? WHERE name=?", (time.time(), name))
            if numbers:
                self.nodes_releasing(numbers)

    def removing_principals(self) -> list[str]:
        return [r[0] for r in self._rows("SELECT name FROM principals WHERE removing IS NOT "
                                         "NULL ORDER BY name")]

    def forget_principal(self, name: str) -> dict[str, list[int]]:
        """The principal, with its nodes (their QEMUs already stopped), allocations (released
        ones too), private domains and keys, leaves the state in one transaction. Returns what
        went: {"allocations": live ones released, "nodes", "domains", "keys"} (its tokens go
        too)."""
        with self.tx() as db:
            mine = "SELECT id FROM allocations WHERE principal=?"
            live = [r[0] for r in db.execute(mine + " AND released IS NULL ORDER BY id",
                                             (name,))]
            nodes = [r[0] for r in db.execute(f"SELECT number FROM nodes WHERE alloc IN "
                                              f"({mine}) ORDER BY number", (name,))]
            netids = [r[0] for r in db.execute("SELECT netid FROM domains WHERE owner=? "
                                               "ORDER BY netid", (name,))]
            keys = [r[0] for r in db.execute("SELECT id FROM keys WHERE principal=? OR alloc "
                                             f"IN ({mine}) ORDER BY id", (name, name))]
            db.execute(f"DELETE FROM nodes WHERE alloc IN ({mine})", (name,))
            db.execute(f"DELETE FROM keys WHERE principal=? OR alloc IN ({mine})", (name, name))
            db.execute(f"DELETE FROM alloc_domains WHERE alloc IN ({mine}) OR netid IN "
                       "(SELECT netid FROM domains WHERE owner=?)", (name, name))
            db.execute("DELETE FROM allocations WHERE principal=?", (name,))
            db.execute("DELETE FROM tokens WHERE principal=?", (name,))
            db.execute("DELETE FROM domains WHERE owner=?", (name,))
            db.execute("DELETE FROM principals WHERE name=?", (name,))
            return {"allocations": live, "nodes": nodes, "domains": netids, "keys": keys}

    def principals(self) -> list[dict[str, Any]]:
        """Every principal: name, created (s since the epoch), and how much it holds: live
        allocations, their nodes, private domains, keys."""
        rows = self._rows(
            "SELECT p.name, p.created, "
            "(SELECT COUNT(*) FROM allocations a WHERE a.principal=p.name AND a.released IS "
            "NULL), "
            "(SELECT COUNT(*) FROM nodes n JOIN allocations a ON a.id=n.alloc "
            "WHERE a.principal=p.name AND a.released IS NULL), "
            "(SELECT COUNT(*) FROM domains d WHERE d.owner=p.name), "
            "(SELECT COUNT(*) FROM keys k WHERE k.principal=p.name) "
            "FROM principals p ORDER BY p.name")
        return [{"name": r[0], "created": r[1], "allocations": r[2], "nodes": r[3],
                 "domains": r[4], "keys": r[5]} for r in rows]

    def held_nodes(self, principal: str) -> int:
        """Nodes the principal holds now (its live allocations' nodes that have not failed):
        what its node quota counts."""
        return int(self._rows(
            "SELECT COUNT(*) FROM nodes n JOIN allocations a ON a.id=n.alloc WHERE "
            "a.principal=? AND a.released IS NULL AND n.state != ?",
            (principal, NodeState.FAILED.value))[0][0])
