"""khd's warm pool: the machine's nodes kept started at the U-Boot prompt, and what happens
when one cannot start.

A node that fails to start (or dies while free) keeps its number, its slot and the reason:
QEMU's last word, or the stage that did not come. It is started again after a delay that
doubles each time (``retry_delay``: 1, 2, 4, 8 s), at most START_ATTEMPTS times in a row; then
it stays failed with its reason until an operator acts (`kh service stop` and `kh service
start` try again afresh; `kh clean` removes everything). Such nodes are never replaced by new
numbers, so a host where QEMU cannot start does not spin.

A node that dies allocated is another matter: it belongs to its allocation, stays there
`failed` with its reason (the principal sees it; `kh service status` counts it as died
allocated) and is never handed out again; it holds no slot of the pool, so the pool starts a
node under the next free number in its place. Releasing it removes it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from kh.allocation import AllocationError
from kh.errors import KhError
from kh.hw.backend import Backend, StartAborted, StartFailed
from kh.model import NodeState
from kh.service.config import ServiceConfig
from kh.service.placement import pool_starts
from kh.service.qemunode import death_reason as death_reason  # its tests read it here
from kh.service.qemunode import node_tag, started_otherwise
from kh.store import NodeRow, Store

log = logging.getLogger("kh.pool")

START_ATTEMPTS = 5  # starts of one node in a row before it is left failed
FIRST_DELAY = 1.0  # seconds before the first retry; each further retry waits twice as long
MAX_DELAY = 60.0
STABLE = 60.0  # a node free this long has proved itself: a later death counts as a first
START_WORKERS = 4  # nodes started at once


def retry_delay(attempts: int, *, limit: int = START_ATTEMPTS, first: float = FIRST_DELAY,
                cap: float = MAX_DELAY) -> float | None:
    """Seconds to wait before starting a node again after its ``attempts``-th failure in a row,
    or None when that was the last one allowed (``limit``)."""
    if attempts < 1:
        raise ValueError(f"attempts counts failures, from 1 (got {attempts})")
    if attempts >= limit:
        return None
    return min(cap, first * 2.0 ** (attempts - 1))


def attempts_after(row: NodeRow, now: float) -> int:
    """A node's failure count once it failed again: one more than before, unless it had been
    free long enough (STABLE) to have proved itself."""
    if row.state == NodeState.FREE and now - row.started >= STABLE:
        return 1
    return row.attempts + 1


def is_start_failure(row: NodeRow) -> bool:
    """A failed node of the pool (not one that died in a principal's hands)."""
    return row.state == NodeState.FAILED and row.alloc is None


def has_failed(row: NodeRow) -> bool:
    """A pool node whose last start failed: failed now, or being started again."""
    return is_start_failure(row) or (row.state == NodeState.STARTING and row.attempts > 0)


def plan_starts(rows: list[NodeRow], size: int, now: float) -> tuple[list[int], list[int]]:
    """(new node numbers to start, failed nodes whose retry is due). Every configured slot is
    held by a node in the pool or failing in it; nodes that died allocated hold none."""
    held = [r for r in rows if not (r.state == NodeState.FAILED and r.alloc is not None)]
    retries = [r.number for r in rows if is_start_failure(r) and r.retry_at is not None
               and r.retry_at <= now]
    taken = {r.number for r in rows}
    new: list[int] = []
    n = 1
    while len(new) < size - len(held):
        if n not in taken:
            new.append(n)
        n += 1
    return new, retries


@dataclass(frozen=True)
class Failure:
    node: int
    reason: str
    attempts: int  # failed starts in a row
    retry_at: float | None  # when it is started again (None: being started, or given up)
    final: bool  # given up: failed START_ATTEMPTS times

    def text(self, now: float) -> str:
        return failure_note(self.attempts, self.retry_at, self.reason, now, self.final)


@dataclass(frozen=True)
class PoolStatus:
    """The pool at a glance: what `kh service status`, `kh service start` and khget's refusals
    report."""

    size: int  # configured nodes
    free: int
    allocated: int
    starting: int  # a start under way
    retrying: int  # failed, started again after a delay
    failed: int  # failed START_ATTEMPTS times in a row: left failed
    lost: int  # died while allocated (the principal still sees them)
    failures: tuple[Failure, ...]  # nodes whose last start failed, by number

    @property
    def ready(self) -> bool:
        """Every configured node has settled: free, allocated, or failed for good."""
        return (self.starting == 0 and self.retrying == 0
                and self.free + self.allocated + self.failed >= self.size)

    @property
    def dead(self) -> bool:
        """Settled, and not one node could start."""
        return self.ready and self.failed > 0 and self.free + self.allocated == 0

    def failed_text(self) -> str:
        """`6 nodes failed to start (node 3: qemu-system-ppc: ...)`, or ""."""
        if not self.failures:
            return ""
        n, first = len(self.failures), self.failures[0]
        return (f"{n} node{'s' if n > 1 else ''} failed to start "
                f"(node {first.node}: {first.reason})")

    @property
    def milestone(self) -> tuple[int, int, int]:
        """What a user waiting for the pool cares about: (ready, failing and being retried,
        given up). It does not flap while a failing node goes between waiting for its retry
        and being started again."""
        return (self.free + self.allocated, len(self.failures) - self.failed, self.failed)

    def milestone_text(self) -> str:
        ready, failing, failed = self.milestone
        retried = f", {failing} failing (retried with backoff)" if failing else ""
        return f"{ready} of {self.size} nodes ready{retried}, {failed} failed for good"

    def progress_text(self) -> str:
        again = f" ({self.retrying} to retry after failing)" if self.retrying else ""
        return (f"{self.free + self.allocated} of {self.size} nodes ready, "
                f"{self.starting + self.retrying} starting{again}, {self.failed} failed")

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "free": self.free, "allocated": self.allocated,
                "starting": self.starting, "retrying": self.retrying, "failed": self.failed,
                "lost": self.lost, "ready": self.ready,
                "failures": [{"node": f.node, "reason": f.reason, "attempts": f.attempts,
                              "retry_at": f.retry_at, "final": f.final}
                             for f in self.failures]}


def summarize_json(data: dict[str, Any]) -> PoolStatus:
    """The status back from its JSON (what `kh service start` reads from khd)."""
    return PoolStatus(**{k: data[k] for k in ("size", "free", "allocated", "starting",
                                              "retrying", "failed", "lost")},
                      failures=tuple(Failure(**f) for f in data["failures"]))


def summarize(rows: list[NodeRow], size: int) -> PoolStatus:
    def count(state: NodeState) -> int:
        return sum(r.state == state for r in rows)

    failing = [r for r in rows if is_start_failure(r)]
    return PoolStatus(
        size=size, free=count(NodeState.FREE), allocated=count(NodeState.ALLOCATED),
        starting=count(NodeState.STARTING),
        retrying=sum(r.retry_at is not None for r in failing),
        failed=sum(r.retry_at is None for r in failing),
        lost=sum(r.state == NodeState.FAILED and r.alloc is not None for r in rows),
        failures=tuple(Failure(r.number, r.reason or "no reason recorded", r.attempts,
                               r.retry_at, is_start_failure(r) and r.retry_at is None)
                       for r in rows if has_failed(r)))


def failure_note(attempts: int, retry_at: float | None, reason: str, now: float,
                 final: bool) -> str:
    """A start failure in words: how many, whether it will be tried again, and why."""
    if final:
        return f"start failed {attempts} time{'s' if attempts > 1 else ''}, given up: {reason}"
    if retry_at is not None:
        return (f"start {attempts} of {START_ATTEMPTS} failed, next in "
                f"{max(0.0, retry_at - now):.0f} s: {reason}")
    return f"start {attempts} of {START_ATTEMPTS} failed, starting again: {reason}"


def note(row: NodeRow, now: float) -> str:
    """`kh ps`'s NOTE for a node: why it failed, and whether it will be tried again."""
    if not has_failed(row) or row.attempts == 0:
        return row.reason or ""
    return failure_note(row.attempts, row.retry_at, row.reason or "", now,
                        is_start_failure(row) and row.retry_at is None)


def shortage(count: int, free: int, status: PoolStatus) -> AllocationError:
    """khget's refusal when too few nodes are free, saying why the pool is short."""
    msg = f"{count} node{'' if count == 1 else 's'} asked for, {free} free"
    if status.failures:
        return AllocationError(f"{msg}: {status.failed_text()}", "kh ps shows them")
    if status.starting:
        return AllocationError(f"{msg}: {status.starting} still starting",
                               "try again in a moment")
    return AllocationError(msg, "ask for fewer or release some (kh ps shows them)")


class Pool:
    """Fills the pool, retries failed nodes with backoff, notices nodes that die."""

    def __init__(self, cfg: ServiceConfig, store: Store, nodes: Backend,
                 lock: threading.RLock,
                 sizes: Callable[[], dict[str, int]] | None = None) -> None:
        """``sizes``: each host's share of the pool (kh.service.hosts: ``local`` the
        service's ``nodes``, each added host its capacity); None: ``local`` only."""
        self.cfg = cfg
        self.store = store
        self.nodes = nodes
        self.lock = lock
        self.sizes = sizes or (lambda: {"local": cfg.nodes})
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def status(self) -> PoolStatus:
        return summarize(self.store.nodes(), sum(self.sizes().values()))

    def adopt(self) -> list[str]:
        """After a khd (re)start: take over the nodes the state names; return the repairs."""
        repairs = []
        for row in self.store.nodes():
            n, tag = row.number, node_tag(self.cfg, row.number)
            if row.state == NodeState.STARTING:
                self.nodes.kill_recorded(n, row.pid)  # only if row.pid is still its QEMU
                self.store.delete_node(n)
                repairs.append(f"node {n}: was starting when khd stopped; starting it again")
                continue
            if row.state == NodeState.FAILED:
                if row.alloc is None:  # an operator restarted khd: a fresh set of attempts
                    log.warning("node %d had failed to start (%s); trying again", n, row.reason)
                    self.store.delete_node(n)
                continue
            try:
                if self.nodes.reattach(n, row.pid or 0) is not None:
                    repairs += self._restart_if_otherwise(row)
                    continue
            except KhError as e:
                log.warning("node %d: cannot reattach: %s", n, e)
                self.nodes.kill_recorded(n, row.pid)
            if row.state == NodeState.ALLOCATED:
                self.store.node_failed(n, "QEMU exited while khd was away")
                repairs.append(f"node {n}: {tag} had exited; marked failed")
            else:
                self.store.delete_node(n)
                repairs.append(f"node {n}: {tag} had exited; restarting it")
        # QEMUs of this khd's tag that no node row holds (a khd killed between starting one
        # and recording it) are stopped, and cgroups of nodes that are gone removed.
        return repairs + self.nodes.stop_orphans()

    def _restart_if_otherwise(self, row: NodeRow) -> list[str]:
        """A free node adopted from an earlier khd whose QEMU is not what this khd starts
        (kh service stop, then start with another KH_QEMU) is stopped, to be started afresh
        with this khd's settings; an allocated one runs on until released (a released node's
        QEMU is replaced anyway). Returns the repair, in words."""
        if self.cfg.backend != "qemu" or row.state != NodeState.FREE or not row.pid:
            return []
        why = started_otherwise(self.cfg, row.number, row.pid)
        if why is None:
            return []
        self.nodes.stop(row.number)
        self.store.delete_node(row.number)
        return [f"node {row.number}: {why}; starting it again"]

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True, name="pool")
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop filling; starts under way end, QEMU and all (NodeManager.abort_starts waits
        for them); running nodes stay. No QEMU is started from here on."""
        self._stop.set()
        self._wake.set()
        self.nodes.abort_starts()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.nodes.fabric.watch()  # br_netfilter turned on behind khd's back
                self._reap_dead()
                self._fill()
            except Exception:  # the pool must outlive one bad turn; the next one tries again
                log.exception("keeping the pool filled")
            self._wake.wait(self._next_wait(time.time()))
            self._wake.clear()

    def _next_wait(self, now: float) -> float:
        due = [r.retry_at - now for r in self.store.nodes(NodeState.FAILED)
               if r.retry_at is not None]
        return max(0.0, min([1.0, *due]))

    def _fill(self) -> None:
        now = time.time()
        with self.lock:
            rows = self.store.nodes()
            sizes = self.sizes()
            _, retries = plan_starts(rows, sum(sizes.values()), now)
            retries = [r.number for r in rows if r.number in retries and r.host in sizes]
            new = pool_starts([(r.number, r.host, not (r.state == NodeState.FAILED and
                                                       r.alloc is not None)) for r in rows],
                              sizes)
            for n, host in new:
                self.store.put_node(NodeRow(n, self.store.new_uid(), NodeState.STARTING, None,
                                            None, str(self.cfg.node_dir(n)), now, None,
                                            host=host))
            for n in retries:
                self.store.node_starting(n)
        numbers = sorted([n for n, _ in new] + retries)
        if numbers and not self._stop.is_set():
            with ThreadPoolExecutor(max_workers=START_WORKERS) as ex:
                list(ex.map(self._start_node, numbers))

    def _start_node(self, number: int) -> None:
        try:
            node = self.nodes.start(number,
                                    on_spawn=lambda pid: self.store.node_starting(number, pid))
        except StartAborted:
            return  # khd is stopping; the next khd starts the node again
        except StartFailed as e:
            self._failed(number, e.reason)
            return
        except Exception as e:  # whatever it was, the node failed and must say so
            log.exception("node %d: start failed unexpectedly", number)
            self._failed(number, str(e) if isinstance(e, KhError) else
                         f"{type(e).__name__}: {e}")
            return
        self.store.node_free(number, node.pid, time.time())

    def _failed(self, number: int, reason: str) -> None:
        now = time.time()
        with self.lock:
            row = self.store.node(number)
            if row is None:
                return
            attempts = attempts_after(row, now)
            delay = retry_delay(attempts)
            self.store.node_failed(number, reason, attempts,
                                   None if delay is None else now + delay)
        if delay is None:
            log.error("node %d failed to start %d times, left failed: %s", number, attempts,
                      reason)
        else:
            log.warning("node %d failed to start (%d of %d), again in %.0f s: %s", number,
                        attempts, START_ATTEMPTS, delay, reason)

    def _reap_dead(self) -> None:
        """Nodes whose QEMU exited: allocated ones are marked failed (their principal sees
        it), free ones fail like a start and are started again with backoff."""
        dead = []
        with self.lock:
            for row in self.store.nodes(NodeState.FREE, NodeState.ALLOCATED):
                node = self.nodes.running.get(row.number)
                if node is None or node.alive():
                    continue
                reason = node.death_reason()
                self.nodes.stop(row.number)
                log.warning("node %d died: %s", row.number, reason)
                if row.state == NodeState.ALLOCATED:
                    self.store.node_failed(row.number, reason)
                else:
                    dead.append((row.number, reason))
        for number, reason in dead:
            self._failed(number, reason)
