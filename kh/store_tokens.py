"""The state's tokens (schema 5): kh.store.Store's rows for kh.service.tokens.

A token row holds only a hash of the secret (see kh.service.tokens for why a fast hash is
enough), its principal, the domains its allocations may use, its node budget, when it expires
and whether it was revoked. A revoked token keeps its row: the allocations it made still name
it, and `kh token list` shows it revoked. Each change is one transaction, as in kh.store.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kh.model import NodeState

_COLUMNS = "id, principal, netids, max_nodes, expires, revoked, created"


@dataclass(frozen=True)
class TokenRow:
    """One token: ``netids`` its allocations may use (0: the external domain, as khget -x;
    1: the public one, -i; private ones by id), ``max_nodes`` it may hold at once (None: only
    the principal's quota bounds it), ``expires`` and ``revoked`` (seconds since the epoch,
    or None), ``created``."""

    id: int
    principal: str
    netids: tuple[int, ...]
    max_nodes: int | None
    expires: float | None
    revoked: float | None
    created: float

    def state(self, now: float | None = None) -> str:
        """``active``, ``expired`` or ``revoked`` at ``now`` (default: now)."""
        if self.revoked is not None:
            return "revoked"
        if self.expires is not None and (time.time() if now is None else now) >= self.expires:
            return "expired"
        return "active"

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "principal": self.principal, "allocate_on": list(self.netids),
                "max_nodes": self.max_nodes, "expires": self.expires, "revoked": self.revoked,
                "created": self.created, "state": self.state()}


def _row(r: tuple[Any, ...]) -> TokenRow:
    netids = tuple(int(x) for x in str(r[2]).split(",") if x)
    return TokenRow(r[0], r[1], netids, r[3], r[4], r[5], r[6])


class TokenRows:
    """Store's token methods (a mixin: Store supplies ``tx`` and ``_rows``)."""

    if TYPE_CHECKING:
        def tx(self) -> contextlib.AbstractContextManager[sqlite3.Connection]: ...

        def _rows(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]: ...

    def add_token(self, principal: str, digest: bytes, netids: tuple[int, ...],
                  max_nodes: int | None, expires: float | None) -> int:
        """A new token of ``principal``'s whose secret hashes to ``digest``; returns its id."""
        with self.tx() as db:
            cur = db.execute(
                "INSERT INTO tokens (principal, hash, netids, max_nodes, expires, created) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (principal, digest, ",".join(map(str, sorted(set(netids)))), max_nodes,
                 expires, time.time()))
            return int(cur.lastrowid or 0)

    def token(self, token_id: int) -> TokenRow | None:
        rows = self._rows(f"SELECT {_COLUMNS} FROM tokens WHERE id=?", (token_id,))
        return _row(rows[0]) if rows else None

    def token_by_hash(self, digest: bytes) -> TokenRow | None:
        rows = self._rows(f"SELECT {_COLUMNS} FROM tokens WHERE hash=?", (digest,))
        return _row(rows[0]) if rows else None

    def tokens(self, principal: str) -> list[TokenRow]:
        return [_row(r) for r in self._rows(
            f"SELECT {_COLUMNS} FROM tokens WHERE principal=? ORDER BY id", (principal,))]

    def revoke_token(self, principal: str, token_id: int) -> bool:
        """Revoke ``principal``'s token ``token_id`` (again: no change). False if it has none
        of that id."""
        with self.tx() as db:
            if not db.execute("SELECT 1 FROM tokens WHERE id=? AND principal=?",
                              (token_id, principal)).fetchone():
                return False
            db.execute("UPDATE tokens SET revoked=? WHERE id=? AND revoked IS NULL",
                       (time.time(), token_id))
            return True

    def active_tokens(self, principal: str) -> int:
        """How many of ``principal``'s tokens are neither revoked nor expired."""
        return int(self._rows(
            "SELECT COUNT(*) FROM tokens WHERE principal=? AND revoked IS NULL AND "
            "(expires IS NULL OR expires > ?)", (principal, time.time()))[0][0])

    def prune_tokens(self, principal: str, keep: int) -> int:
        """Forget ``principal``'s revoked or expired tokens but the newest ``keep``, except
        those a live allocation names (released ones forget them); returns how many went."""
        with self.tx() as db:
            old = [r[0] for r in db.execute(
                "SELECT id FROM tokens WHERE principal=? AND (revoked IS NOT NULL OR "
                "(expires IS NOT NULL AND expires <= ?)) AND id NOT IN (SELECT token FROM "
                "allocations WHERE released IS NULL AND token IS NOT NULL) "
                "ORDER BY id DESC LIMIT -1 OFFSET ?", (principal, time.time(), keep))]
            for tid in old:
                db.execute("UPDATE allocations SET token=NULL WHERE token=?", (tid,))
                db.execute("DELETE FROM tokens WHERE id=?", (tid,))
            return len(old)

    def token_held(self, token_id: int) -> int:
        """Nodes held now through allocations the token made (live ones, nodes that have not
        failed): what its budget counts, as the principal's quota counts its own."""
        return int(self._rows(
            "SELECT COUNT(*) FROM nodes n JOIN allocations a ON a.id=n.alloc WHERE "
            "a.token=? AND a.released IS NULL AND n.state != ?",
            (token_id, NodeState.FAILED.value))[0][0])
