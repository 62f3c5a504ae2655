"""A client's backlog holds about its limit in memory, however small the pieces of output are.

A console's reader gets a node's output a few bytes at a time (2.3 bytes a recv on average from
a node printing under TCG), so a session that never reads queues hundreds of thousands of
pieces: one object each held 35 MiB for a backlog of 1 MiB (seen with benchmarks/hostile.py
``--only console-gib``: khd grew 108 MiB after the first MiB of output).
"""

from __future__ import annotations

import threading
import tracemalloc

from kh.hw.backlog import Backlog

PATTERN = bytes(range(256)) * 16


def pieces(total: int, size: int) -> list[bytes]:
    """``total`` bytes of PATTERN as new ``size``-byte objects (slices, never cached ones)."""
    return [PATTERN[i % len(PATTERN):i % len(PATTERN) + size] for i in range(0, total, size)]


def test_a_backlog_full_of_tiny_pieces_holds_little_more_than_its_limit():
    limit = 256 * 1024
    release = threading.Event()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        b = Backlog(lambda data: release.wait(), limit=limit)
        for p in pieces(2 * limit, 2):  # twice what fits: the rest is dropped
            b.put(p, "node 1")
        held = tracemalloc.get_traced_memory()[0] - base
        queued = b.queued
    finally:
        tracemalloc.stop()
        release.set()
    assert b.close(5)
    assert queued == limit  # full: the first piece being sent, the rest waiting
    assert b.dropped_total["node 1"] >= limit - 2
    assert held < 2 * limit, f"{held} bytes held for a backlog of {limit}"


def test_tiny_pieces_reach_the_client_whole_and_in_order():
    got: list[bytes] = []
    release = threading.Event()

    def sink(data: bytes) -> None:
        release.wait()
        got.append(data)

    b = Backlog(sink, limit=1 << 20)
    sent = pieces(300_000, 3) + [PATTERN * 8] + pieces(3_000, 1)
    for p in sent:
        b.put(p, "node 1")
    release.set()
    assert b.close(10)
    assert b"".join(got) == b"".join(sent)
    assert all(isinstance(c, bytes) for c in got)
    assert len(got) < len(sent) // 100  # handed on in chunks, not a call per piece
