"""The pool's pure parts: the restart backoff, what to start, the status and its messages, and
a failed start's reason."""

import re

import pytest

from kh.errors import BootError, KhTimeout
from kh.hw.qemu import died_reason, last_words
from kh.model import NodeState
from kh.service import pool
from kh.service.qemunode import start_reason
from kh.store import NodeRow

ROM = ('qemu-system-ppc: -device virtio-net-pci,netdev=d0,mac=52:54:00:00:01:00: '
       'failed to find romfile "efi-virtio.rom"')


def row(number, state, *, alloc=None, attempts=0, retry_at=None, reason=None, started=0.0):
    return NodeRow(number, number, state, None, alloc, f"/x/node{number}", started, reason,
                   attempts, retry_at)


def test_backoff_doubles_from_one_second_and_gives_up_after_five_starts():
    assert [pool.retry_delay(a) for a in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, None, None]
    assert pool.START_ATTEMPTS == 5


def test_backoff_is_capped():
    delays = [pool.retry_delay(a, limit=20) for a in range(1, 20)]
    assert delays[:7] == [1, 2, 4, 8, 16, 32, 60]
    assert set(delays[6:]) == {pool.MAX_DELAY}


def test_backoff_counts_failures_from_one():
    with pytest.raises(ValueError):
        pool.retry_delay(0)


def test_a_node_that_stayed_up_starts_its_count_afresh():
    fresh = row(1, NodeState.FREE, attempts=3, started=1000.0)
    assert pool.attempts_after(fresh, 1000.0 + pool.STABLE - 1) == 4  # died soon: counts on
    assert pool.attempts_after(fresh, 1000.0 + pool.STABLE) == 1
    assert pool.attempts_after(row(2, NodeState.STARTING, attempts=2), 5.0) == 3


def test_plan_starts_fills_empty_slots_with_the_lowest_numbers():
    assert pool.plan_starts([], 3, 0.0) == ([1, 2, 3], [])
    rows = [row(2, NodeState.FREE), row(4, NodeState.ALLOCATED, alloc=1)]
    assert pool.plan_starts(rows, 4, 0.0) == ([1, 3], [])


def test_failed_nodes_are_retried_in_place_never_replaced():
    """The hot loop of issue 9: a failed node held no slot, so a fresh number was started in
    its place, and failed, and so on. Now it holds its slot and is retried when due."""
    rows = [row(1, NodeState.FAILED, attempts=1, retry_at=10.0, reason=ROM),
            row(2, NodeState.FAILED, attempts=5, retry_at=None, reason=ROM),
            row(3, NodeState.FREE)]
    assert pool.plan_starts(rows, 3, 9.9) == ([], [])
    assert pool.plan_starts(rows, 3, 10.0) == ([], [1])
    # given up on 2: nothing new ever, however late
    assert pool.plan_starts(rows, 3, 1e12) == ([], [1])


def test_a_node_that_died_allocated_gives_its_slot_back():
    rows = [row(1, NodeState.FAILED, alloc=7, reason="QEMU exited"), row(2, NodeState.FREE)]
    assert pool.plan_starts(rows, 2, 0.0) == ([3], [])


def test_status_counts_and_readiness():
    rows = [row(1, NodeState.FREE), row(2, NodeState.STARTING),
            row(3, NodeState.FAILED, attempts=2, retry_at=5.0, reason=ROM)]
    st = pool.summarize(rows, 4)
    assert (st.free, st.starting, st.retrying, st.failed) == (1, 1, 1, 0)
    assert not st.ready and not st.dead
    done = pool.summarize([row(1, NodeState.FREE), row(2, NodeState.ALLOCATED, alloc=1),
                           row(3, NodeState.FAILED, attempts=5, reason=ROM)], 3)
    assert done.ready and not done.dead
    assert not pool.summarize([row(1, NodeState.FREE)], 3).ready  # rows not made yet


def test_a_pool_where_nothing_started_is_dead():
    rows = [row(n, NodeState.FAILED, attempts=5, reason=ROM) for n in (1, 2, 3)]
    st = pool.summarize(rows, 3)
    assert st.ready and st.dead
    assert st.failed_text() == f"3 nodes failed to start (node 1: {ROM})"
    assert all(f.final for f in st.failures)


def test_a_node_being_started_again_still_counts_as_failed():
    rows = [row(1, NodeState.STARTING, attempts=2, reason=ROM), row(2, NodeState.STARTING)]
    st = pool.summarize(rows, 2)
    assert [f.node for f in st.failures] == [1] and not st.failures[0].final
    assert pool.note(rows[0], 0.0) == f"start 2 of 5 failed, starting again: {ROM}"
    assert pool.note(rows[1], 0.0) == ""


def test_status_survives_its_json():
    rows = [row(1, NodeState.FREE), row(2, NodeState.FAILED, attempts=1, retry_at=3.5,
                                        reason=ROM)]
    st = pool.summarize(rows, 2)
    assert pool.summarize_json(st.to_json()) == st


def test_khget_refusal_says_why_the_pool_is_short():
    """The issue's line: `kh: 2 nodes asked for, 0 free: 6 nodes failed to start (node 3:
    qemu-system-ppc: ...) (kh ps shows them)`."""
    rows = [row(n, NodeState.FAILED, attempts=5, reason=ROM) for n in range(3, 9)]
    e = pool.shortage(2, 0, pool.summarize(rows, 6))
    assert str(e) == f"2 nodes asked for, 0 free: 6 nodes failed to start (node 3: {ROM}) " \
                     "(kh ps shows them)"
    starting = pool.shortage(1, 0, pool.summarize([row(1, NodeState.STARTING)], 1))
    assert str(starting) == "1 node asked for, 0 free: 1 still starting (try again in a moment)"
    busy = pool.shortage(3, 1, pool.summarize([row(1, NodeState.FREE)], 1))
    assert "failed" not in str(busy) and "release some" in str(busy)


def test_ps_note_says_what_happens_next():
    waiting = row(1, NodeState.FAILED, attempts=2, retry_at=104.0, reason=ROM)
    assert pool.note(waiting, 100.0) == f"start 2 of 5 failed, next in 4 s: {ROM}"
    final = row(2, NodeState.FAILED, attempts=5, reason=ROM)
    assert pool.note(final, 100.0) == f"start failed 5 times, given up: {ROM}"
    lost = row(3, NodeState.FAILED, alloc=4, reason="QEMU exited")
    assert pool.note(lost, 100.0) == "QEMU exited"


QEMU_OUTPUT = f"""qemu-system-ppc: warning: TCG doesn't support requested feature
{ROM}

"""


def test_last_words_is_qemus_last_meaningful_line():
    assert last_words(QEMU_OUTPUT) == ROM
    killed = ROM + "\nqemu-system-ppc: terminating on signal 15 from pid 12 (python3)\n"
    assert last_words(killed) == ROM
    assert last_words("") is None and last_words("\n  \n") is None
    long = last_words("x" * 1000)
    assert long is not None and len(long) == 300 and long.endswith("...")


def test_start_reason_when_qemu_exited_or_a_stage_timed_out():
    err = BootError("kq-node3: QEMU exited before its console was up")
    assert start_reason(err, 1, QEMU_OUTPUT, "kq-node3") == ROM
    assert start_reason(err, 1, "", "kq-node3") == \
        "QEMU exited at start with status 1 and said nothing"
    timeout = KhTimeout("node3: no U-Boot prompt within 30 s", "console log: x")
    assert start_reason(timeout, None, "", "kq-node3", "node3") == \
        "no U-Boot prompt within 30 s"
    qmp = KhTimeout("kq-node3: no QMP socket within 10 s")
    assert start_reason(qmp, None, "", "kq-node3", "node3") == "no QMP socket within 10 s"


def test_died_reason():
    assert died_reason(None, "") == "QEMU exited"
    assert died_reason(-9, ROM) == f"QEMU exited with status -9: {ROM}"


def test_a_killed_node_names_the_signal():
    assert pool.death_reason(-9, ROM) == f"QEMU was killed by SIGKILL: {ROM}"
    assert pool.death_reason(-15, "") == "QEMU was killed by SIGTERM"
    assert pool.death_reason(1, ROM) == f"QEMU exited with status 1: {ROM}"
    assert pool.death_reason(None, "") == "QEMU exited"


def test_progress_news_does_not_flap_while_a_node_retries():
    """Node 2 fails, waits, is started again, fails again: what a waiting user is told (ready,
    failing, failed for good) stays the same until a node comes up or is given up."""
    seq = [[row(1, NodeState.STARTING), row(2, NodeState.STARTING)],
           [row(1, NodeState.STARTING), row(2, NodeState.FAILED, attempts=1, retry_at=5.0,
                                               reason=ROM)],
           [row(1, NodeState.STARTING), row(2, NodeState.STARTING, attempts=1, reason=ROM)],
           [row(1, NodeState.STARTING), row(2, NodeState.FAILED, attempts=2, retry_at=9.0,
                                               reason=ROM)],
           [row(1, NodeState.FREE), row(2, NodeState.STARTING, attempts=2, reason=ROM)],
           [row(1, NodeState.FREE), row(2, NodeState.FAILED, attempts=5, reason=ROM)]]
    statuses = [pool.summarize(rows, 2) for rows in seq]
    assert len({st.progress_text() for st in statuses[1:4]}) > 1  # the internal flapping
    news = []
    for st in statuses:
        if st.milestone not in news[-1:]:
            news.append(st.milestone)
    assert news == [(0, 0, 0), (0, 1, 0), (1, 1, 0), (1, 0, 1)]
    assert statuses[4].milestone_text() == \
        "1 of 2 nodes ready, 1 failing (retried with backoff), 0 failed for good"


def test_the_docs_give_the_backoff_kh_really_uses():
    from pathlib import Path
    docs = (Path(__file__).resolve().parents[2] / "docs" / "service.md").read_text()
    text = " ".join(docs.split())
    delays = []
    while (d := pool.retry_delay(len(delays) + 1)) is not None:
        delays.append(f"{d:g}")
    assert f"after {', '.join(delays[:-1])} and {delays[-1]} s" in text
    assert f"{pool.START_ATTEMPTS} failed starts in a row" in text
    # no cap on the backoff: kh gives up after START_ATTEMPTS (other things may be capped)
    about_retries = [s for s in re.split(r"(?<=\.) ", text)
                     if re.search(r"backoff|started again|each wait", s)]
    assert about_retries and not [s for s in about_retries if "capped" in s], about_retries


def test_a_qemu_the_state_does_not_know_is_stopped_at_adopt(tmp_path):
    """Issue 10: a QEMU started for the pool while khd was SIGKILLed (before its PID reached
    the state) survived the restart unknown to khd. Now khd's start stops every process
    carrying its tag that no node holds: not a known node's, nor another prefix's."""
    import os
    import subprocess
    import threading
    import types

    from kh.service.config import ServiceConfig
    from kh.service.nodes import NodeManager
    from kh.store import Store
    from tests.unit.test_procid import alive, sleeper

    prefix = f"ko{os.getpid() % 10000}"
    cfg = ServiceConfig(state_dir=tmp_path / "state", images=tmp_path, prefix=prefix)
    started: list[subprocess.Popen[bytes]] = []
    try:
        orphan = sleeper(started, f"{prefix}-node2")
        known = sleeper(started, f"{prefix}-node3")
        stranger = sleeper(started, f"{prefix}x-node2")
        nodes = NodeManager(cfg, None)  # type: ignore[arg-type]  # no fabric needed here
        nodes.running[3] = types.SimpleNamespace(pid=known.pid)  # type: ignore[assignment]
        store = Store(cfg.db)
        try:
            repairs = pool.Pool(cfg, store, nodes, threading.RLock()).adopt()
        finally:
            store.close()
        assert not alive(orphan)
        assert alive(known) and alive(stranger)
        (repair,) = repairs
        assert repair.startswith(f"stopped QEMU PID {orphan.pid} ({prefix}-node2, started at "
                                 "tick ") and repair.endswith("): the state did not know it")
    finally:
        for p in started:
            p.kill()
            p.wait()
