"""Resetting an allocated node (`kh reset`): back to the U-Boot prompt with its allocation's
khargs. The node is marked as being reset under khd's lock (``svc._resetting``, and in the
state for a khd that dies meanwhile: kh.service.recovery.resume_resets); the reset runs
outside the lock (a slow node stalls no one else), and whoever needs the node (a release, a
principal's removal, a membership change) waits for the mark to go (``await_resets``): a
per-node lock. kh.service.core.Service's ``reset``, ``_do_reset`` and ``_await_resets`` are
these.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kh.allocation import AllocationError
from kh.errors import KhError
from kh.model import Domain, NodeState
from kh.service import membership

if TYPE_CHECKING:
    from kh.service.core import Service

WAIT = 30.0  # seconds ``await_resets`` gives up the lock for at most, before checking again


def await_resets(svc: Service, numbers: list[int]) -> bool:
    """Under the lock: True at once when no node of ``numbers`` is being reset; else wait,
    giving the lock up meanwhile, until a reset ends, and answer False: what the caller
    checked may have changed, so it checks again."""
    if not svc._resetting.intersection(numbers):
        return True
    svc.idle.wait(WAIT)
    return False


def reset(svc: Service, number: int, user: str, credential: str | None) -> None:
    """Reset node ``number`` of ``user``'s: NotFound when it is not theirs, allocated and
    running; a failed reset leaves the node `failed` with the reason (AllocationError)."""
    from kh.service.core import NotFound  # core uses this module
    with svc.admitted(user, credential):
        while True:
            row = svc.store.node(number)
            owner = None if row is None or row.alloc is None else \
                svc.store.allocation(row.alloc)
            if row is None or row.alloc is None or row.state not in (
                    NodeState.ALLOCATED, NodeState.FAILED) or owner is None or \
                    owner.principal != user:  # another's node: as if not allocated
                raise NotFound(f"principal {user} has no allocated node {number}")
            svc._own_allocation(row.alloc, user)
            if await_resets(svc, [number]):
                break
        if row.state != NodeState.ALLOCATED or number not in svc.nodes.running:
            raise NotFound(f"node {number} is not running ({row.state.value})")
        alloc = svc.store.allocation(row.alloc)
        assert alloc is not None  # checked by _own_allocation, under the lock
        domains = membership.reset_domains(svc, number, alloc)
        svc.publish_sync(reset=number)  # the node boots afresh: its ports go
        svc._resetting.add(number)
        svc.store.node_resetting(number, True)
    svc.meter.sample([number])
    try:
        do_reset(svc, number, domains)
    finally:
        svc.meter.sample([number])


def do_reset(svc: Service, number: int, domains: tuple[Domain, ...]) -> None:
    """The reset proper, for a node marked as being reset; clears the mark. On failure the
    node, if still allocated, is stopped and marked failed (never handed out again), and
    AllocationError says why."""
    try:
        svc.nodes.reset(number)
        svc._configure(number, domains)
    except Exception as e:
        why = e.message if isinstance(e, KhError) else f"{type(e).__name__}: {e}"
        with svc.lock:
            row = svc.store.node(number)
            if row is not None and row.state == NodeState.ALLOCATED:
                # its U-Boot is in no known state: never handed out again
                svc.nodes.stop(number)
                svc.store.node_failed(number, f"reset failed: {why}")
            svc._resetting.discard(number)
            svc.idle.notify_all()
        svc.pool.wake()
        raise AllocationError(f"node {number} did not come back from its reset: {why}",
                              "it is marked failed; release it and khget another") from e
    with svc.lock:
        svc.store.node_resetting(number, False)
        svc._resetting.discard(number)
        svc.idle.notify_all()
