"""Where khget's nodes go when khd has several hosts (issue 16): a pure policy.

``fill`` (the default): khd's own host (``local``) first, then the added hosts in the order
they were added, each until its free nodes run out; an allocation stays on as few hosts as it
can, so its domains span as few as possible. ``spread``: one node at a time from each host
with free nodes, in that order, round and round (an allocation's nodes on as many hosts as
there are). ``--host NAME`` pins every node of the allocation to that host. The policy is the
service setting ``placement`` (ServiceConfig; `kh service start --placement`, KH_PLACEMENT).

Within a host, the lowest free node numbers are taken (allocation.choose_nodes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from kh.allocation import AllocationError, choose_nodes
from kh.errors import KhError
from kh.service.config import PLACEMENTS as POLICIES  # the one list: the service setting's


class UnknownHost(KhError):
    """A pin names a host khd does not have (404)."""

    exit_code = 4


def place(free: Mapping[str, Sequence[int]], order: Sequence[str], count: int,
          policy: str = "fill", pin: str | None = None) -> list[int]:
    """``count`` node numbers from ``free`` (host -> its free node numbers), hosts taken in
    ``order`` (``local`` first, then the added hosts); sorted. UnknownHost for a ``pin`` not in
    ``order``; AllocationError (409) when the host pinned, or all of them, have too few free
    nodes; ValueError for an unknown ``policy``."""
    if policy not in POLICIES:
        raise ValueError(f"placement policy {policy!r}: not one of {POLICIES}")
    if pin is not None:
        if pin not in order:
            raise UnknownHost(f"no host {pin}", "kh host list shows them")
        have = sorted(free.get(pin, ()))
        if count > len(have):
            raise AllocationError(f"host {pin} has {len(have)} free node"
                                  f"{'' if len(have) == 1 else 's'}, {count} asked for",
                                  "ask for fewer, or leave --host out")
        return choose_nodes(have, count)
    pools = [sorted(free.get(h, ())) for h in order]
    total = sum(len(p) for p in pools)
    if count > total:
        raise AllocationError(f"{total} free nodes on all hosts, {count} asked for")
    taken: list[int] = []
    if policy == "fill":
        for p in pools:
            taken += p[:count - len(taken)]
    else:
        cursor = [0] * len(pools)
        while len(taken) < count:
            for i, p in enumerate(pools):
                if cursor[i] < len(p) and len(taken) < count:
                    taken.append(p[cursor[i]])
                    cursor[i] += 1
    return sorted(taken)


def plan_numbers(taken: set[int], wanted: Mapping[str, int], have: Mapping[str, int]
                 ) -> list[tuple[int, str]]:
    """New nodes to start: for each host (in ``wanted``'s order) as many as ``wanted[host]``
    (its capacity) exceeds ``have[host]`` (its nodes that hold a place in the pool), each
    under the lowest node number not ``taken`` (numbers are global: one per node whatever its
    host). [(number, host)], in number order per host."""
    out: list[tuple[int, str]] = []
    used = set(taken)
    n = 1
    for host, size in wanted.items():
        for _ in range(max(0, size - have.get(host, 0))):
            while n in used:
                n += 1
            used.add(n)
            out.append((n, host))
    return out


def pool_starts(rows: Sequence[tuple[int, str, bool]], sizes: Mapping[str, int]
                ) -> list[tuple[int, str]]:
    """The pool's new nodes when khd has several hosts: ``rows`` (number, host, holds a place:
    every node but one that died allocated, as pool.plan_starts counts), ``sizes`` each host's
    capacity (``local``: the service's ``nodes``). Nodes of a host no longer in ``sizes``
    hold numbers but no place. [(number, host)] (plan_numbers)."""
    have: dict[str, int] = {}
    for _, host, holds in rows:
        if holds:
            have[host] = have.get(host, 0) + 1
    return plan_numbers({n for n, _, _ in rows}, sizes, have)
