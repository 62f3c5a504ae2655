"""What the control channel may do, asked of the service at the moment of each use.

The ssh server (kh.cc.sshd) holds no rights of its own: a login becomes a `Grant` (who, which
allocation, one node or all, by credential or by which key), and every later use (a channel
opened, a command started, a node's memory written, and a watcher's look every half second)
asks `ChannelAccess` whether the grant still holds and what it reaches *now*. `ServiceAccess`
answers from khd's state under khd's lock, so an answer is one consistent moment: a release,
a key revocation, a principal's removal or a node leaving its allocation is seen by the next
question. kh.cc holds no SQL and never touches the service's store.
"""

from __future__ import annotations

import threading
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from kh import admission
from kh.cc.channel import Hub, NodeWriter
from kh.errors import KhError
from kh.hw.console import Console
from kh.hw.memload import RamFile as RamFile  # its tests read it here
from kh.metering.sampler import CountedRam
from kh.model import NodeState
from kh.service import chanapi, tokens

if TYPE_CHECKING:
    from kh.service.core import Service

# A node that belongs to its allocation: allocated, or failed (it stays, named, until released).
# One being released, reset-scrapped or configured for someone else is not a member.
MEMBER_STATES = (NodeState.ALLOCATED, NodeState.FAILED)
UBOOT_RESERVE = 16 * 1024 * 1024  # U-Boot relocates itself to the top 16 MiB of RAM


class Revoked(KhError):
    """The grant no longer holds (released, revoked, removed, or the node left)."""


@dataclass(frozen=True)
class Grant:
    """A successful login to ``con<alloc>`` (``node`` None) or ``con<alloc>.<node>``:
    by the principal's credential (``key_id`` and ``token`` None), by its registered key
    ``key_id``, or by token ``token`` (the one that made the allocation, kh.service.tokens).

    ``alloc`` None is a login to the service's API (``api+PRINCIPAL``, kh.service.chanapi),
    which reaches no node: by token ``token`` or by credential, whose ``secret`` it keeps to
    ask the API's routes with (never shown: not in repr, describe or comparisons)."""

    principal: str
    alloc: int | None
    node: int | None
    key_id: int | None
    token: int | None = None
    secret: str = field(default="", repr=False, compare=False)

    def describe(self) -> str:
        if self.alloc is None:
            how = "credential" if self.token is None else f"token {self.token}"
            return f"api+{self.principal} ({how})"
        user = f"con{self.alloc}" + (f".{self.node}" if self.node is not None else "")
        how = "credential" if self.key_id is None else f"key {self.key_id}"
        how = how if self.token is None else f"token {self.token}"
        return f"{user} ({self.principal}, {how})"


@dataclass(frozen=True)
class Standing:
    """Whether a grant holds now. ``reason`` says why not (one line, for the client); while it
    holds, ``nodes`` are the nodes it reaches: the allocation's members, or just its node."""

    reason: str | None
    nodes: frozenset[int]


@dataclass(frozen=True)
class Reach:
    """What a session of a valid grant may use, at one moment: ``members`` (node numbers,
    failed ones too), ``live`` (the allocated, usable ones), the running nodes' ``consoles``
    (read) and the allocation's ``hub`` (write: one writer per node, shared by its sessions)."""

    members: tuple[int, ...]
    live: tuple[int, ...]
    consoles: dict[int, Console]
    hub: Hub


class Ram(Protocol):
    """One node's memory, opened for one load."""

    def write(self, offset: int, data: bytes) -> None:
        """Put ``data`` at guest-physical ``offset``; LoadError if it does not fit."""

    def close(self) -> None: ...


class ChannelAccess(Protocol):
    """The questions the ssh server asks. Every answer is about the moment of the call."""

    def login_password(self, alloc: int, node: int | None, password: str,
                       source: str) -> Grant | None:
        """The grant for the allocation's owner's credential, or None (also for an allocation
        that is not live, or a node not in it). ``source`` is the peer's address or its
        source (admission.source_of): refused credentials are rate-limited by source."""

    def login_key(self, alloc: int, node: int | None, key: str) -> Grant | None:
        """The grant for a public key ("type base64") the owner registered for all its channels
        or for this allocation, or None."""

    def standing(self, grants: Collection[Grant]) -> dict[Grant, Standing]:
        """Each grant's standing, all read at one moment."""

    def reach(self, grant: Grant) -> Reach:
        """What a session of ``grant`` reaches now; Revoked if the grant no longer holds."""

    def open_ram(self, grant: Grant, node: int) -> Ram:
        """Node ``node``'s memory, opened while the grant holds and the node is its member (the
        open file stays bound to that node's QEMU, whatever happens to the number later).
        Revoked, or LoadError (the node is not running, its RAM cannot be opened)."""

    def mem_limit(self) -> int:
        """Loads must end below this guest-physical address (bytes)."""

    def login_api(self, principal: str, password: str, source: str) -> Grant | None:
        """The grant of an ``api+PRINCIPAL`` login (password: a token of PRINCIPAL's or its
        credential), or None; refusals are rate-limited by ``source`` as the API's are."""

    def api(self, grant: Grant, command: str, source: str) -> chanapi.Answer:
        """The answer of API login ``grant`` to ``command`` (kh.service.chanapi), asked from
        ``source``: the API route's text, or its one-line reason and exit status."""


class ServiceAccess:
    """`ChannelAccess` answered from khd's Service: its store and running nodes, read under
    its lock (an RLock: a question asked while khd holds it for a request waits for it)."""

    def __init__(self, svc: Service) -> None:
        self.svc = svc
        self._hubs: dict[int, Hub] = {}
        self._hubs_lock = threading.Lock()

    # -- logins --------------------------------------------------------------------------------
    def _owner(self, alloc: int, node: int | None) -> str | None:
        """Under the lock: the principal owning live allocation ``alloc`` (holding ``node``)."""
        row = self.svc.store.allocation(alloc)
        if row is None or row.released is not None:
            return None
        if node is not None and node not in self._members(alloc):
            return None
        return row.principal

    def login_password(self, alloc: int, node: int | None, password: str,
                       source: str) -> Grant | None:
        with self.svc.lock:
            owner = self._owner(alloc, node)
        # A token opens only the allocations it made; one that does not is checked (and its
        # refusal counted) as a credential below.
        tok = None if owner is None else tokens.channel_token(
            self.svc, owner, alloc, password, admission.source_of(source))
        if owner is not None and tok is not None:
            g = Grant(owner, alloc, node, None, tok)
            return g if self.standing([g])[g].reason is None else None
        if owner is None:
            # The same work as a wrong credential, so live channels cannot be told by timing.
            try:
                admission.hash_credential(admission.check_credential(password))
            except KhError:
                pass
            return None
        try:
            self._authenticate(owner, password, source)
        except KhError:  # refused, malformed, or rate-limited: all the same to the client
            return None
        grant = Grant(owner, alloc, node, None)
        # The hash ran outside the lock: the allocation may have gone meanwhile.
        return grant if self.standing([grant])[grant].reason is None else None

    def _authenticate(self, owner: str, password: str, source: str) -> None:
        # The service's own check: refused credentials are rate-limited per source and per
        # principal there, for ssh as for the API.
        self.svc.authenticate(owner, password, register=False,
                              source=admission.source_of(source))

    def login_key(self, alloc: int, node: int | None, key: str) -> Grant | None:
        with self.svc.lock:
            owner = self._owner(alloc, node)
            if owner is None:
                return None
            for key_id, principal, key_alloc, stored, _comment in self.svc.store.keys(owner):
                if principal == owner and key_alloc in (None, alloc) and \
                        " ".join(stored.split()[:2]) == key:
                    return Grant(owner, alloc, node, key_id)
        return None

    # -- standing ------------------------------------------------------------------------------
    def _members(self, alloc: int) -> list[int]:
        return [r.number for r in self.svc.store.nodes_of(alloc, *MEMBER_STATES)]

    def _standing(self, g: Grant) -> Standing:
        """Under the lock."""
        store = self.svc.store
        if g.alloc is None:
            return Standing(chanapi.lost(store, g), frozenset())
        if store.principal(g.principal) is None:
            return Standing(f"principal {g.principal} was removed", frozenset())
        row = store.allocation(g.alloc)
        if row is None or row.released is not None or row.principal != g.principal:
            return Standing(f"allocation {g.alloc} was released", frozenset())
        members = frozenset(self._members(g.alloc))
        if g.key_id is not None and not any(
                k[0] == g.key_id and k[2] in (None, g.alloc) for k in store.keys(g.principal)):
            return Standing(f"key {g.key_id} was revoked", frozenset())
        if g.token is not None and (why := tokens.grant_lost(store, g.token, row)):
            return Standing(why, frozenset())
        if g.node is not None:
            if g.node not in members:
                return Standing(f"node {g.node} left allocation {g.alloc}", frozenset())
            return Standing(None, frozenset({g.node}))
        return Standing(None, members)

    def standing(self, grants: Collection[Grant]) -> dict[Grant, Standing]:
        with self.svc.lock:
            return {g: self._standing(g) for g in set(grants)}

    def reach(self, grant: Grant) -> Reach:
        if grant.alloc is None:
            raise Revoked("an API login reaches no node")
        with self.svc.lock:
            st = self._standing(grant)
            if st.reason is not None:
                raise Revoked(st.reason)
            live = {r.number for r in self.svc.store.nodes_of(grant.alloc, NodeState.ALLOCATED)}
            running = self.svc.nodes.running
            consoles = {n: running[n].console for n in sorted(st.nodes) if n in running}
            hub = self._hub(grant.alloc, {n: running[n].writer for n in self._members(grant.alloc)
                                          if n in running})
        return Reach(tuple(sorted(st.nodes)), tuple(sorted(st.nodes & live)), consoles, hub)

    def _hub(self, alloc: int, writers: dict[int, NodeWriter]) -> Hub:
        """The allocation's hub, made again when its nodes' writers changed (a node left, or
        its QEMU was replaced): sessions share it, so their writes keep one order."""
        with self._hubs_lock:
            h = self._hubs.get(alloc)
            if h is None or h.writers != dict(sorted(writers.items())):
                h = Hub(alloc, writers)
                self._hubs[alloc] = h
            for other in [a for a in self._hubs if a != alloc]:
                row = self.svc.store.allocation(other)
                if row is None or row.released is not None:
                    del self._hubs[other]
            return h

    # -- memory ----------------------------------------------------------------------------
    def open_ram(self, grant: Grant, node: int) -> Ram:
        # Under the lock, so the node cannot be released (its QEMU stopped, its number given
        # to a fresh one) between the check and the open.
        with self.svc.lock:
            st = self._standing(grant)
            if st.reason is not None:
                raise Revoked(st.reason)
            if node not in st.nodes:
                raise Revoked(f"node {node} is not in allocation {grant.alloc}")
            return CountedRam(self.svc.nodes.open_ram(node), self.svc.meter, node)

    def mem_limit(self) -> int:
        return int(self.svc.cfg.mem_mib) * 1024 * 1024 - UBOOT_RESERVE

    # -- the service's API (kh.service.chanapi) ----------------------------------------------
    def login_api(self, principal: str, password: str, source: str) -> Grant | None:
        g = chanapi.login(self.svc, principal, password, source)
        # the check ran outside the lock: the principal or token may have gone meanwhile
        return g if g is not None and self.standing([g])[g].reason is None else None

    def api(self, grant: Grant, command: str, source: str) -> chanapi.Answer:
        if grant.alloc is not None:
            raise Revoked(f"{grant.describe()} is not an API login")
        return chanapi.run(self.svc, grant, command, source)
