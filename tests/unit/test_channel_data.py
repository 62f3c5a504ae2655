"""The channel's data path (issue 10, findings 3, 5 and 6): a session that stops reading
loses only its own output, with a note, and never stalls the node's reader, its log or any
other session; input waiting for a node is bounded (the writer waits, khd's memory does not
grow) and a reset still drops it; tagged sessions show each node's partial line once *that*
node is quiet, and at the end."""

from __future__ import annotations

import re
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from kh.cc.channel import Hub, NodeWriter, Output
from kh.hw.backlog import Backlog
from tests.unit.fakenode import Collector, FakeNode, pattern, wait_for

NOTE = re.compile(rb"\r?\n?\[kh: (\d+) bytes of (node ?\d+)'s output dropped: "
                  rb"this session did not read\]\r\n")


@pytest.fixture
def node(tmp_path: Path):  # type: ignore[no-untyped-def]
    n = FakeNode(tmp_path / "con.sock")
    yield n
    n.close()


def with_holes(stream: bytes, full: bytes, source: bytes) -> int:
    """Check that ``stream`` is ``full`` with stretches cut out, each replaced by a note
    naming exactly the bytes cut (a client that reads a little between losses has several);
    returns how many bytes were cut in all."""
    pos = lost = last = 0
    for m in NOTE.finditer(stream):
        piece = stream[last:m.start()]
        assert full[pos:pos + len(piece)] == piece, (pos, piece[:100])
        assert m.group(2) == source
        pos += len(piece) + int(m.group(1))
        lost += int(m.group(1))
        last = m.end()
    assert full[pos:] == stream[last:], (pos, stream[last:last + 100])
    assert lost, "a note of the loss"
    return lost


def test_a_session_that_stops_reading_stalls_nobody(node, tmp_path):
    """Finding 5: a client that does not read must not hold up the console's reader."""
    con = node.attach(tmp_path / "node1.log")
    stalled, reading = Collector(), Collector()
    stalled.block()
    a = Output({1: con}, stalled, tagged=False)
    b = Output({1: con}, reading, tagged=False)
    out = pattern(4 << 20)  # four times a session's backlog
    try:
        node.send_async(out)
        # The reader kept up: everything reached memory, the other session and the log.
        assert wait_for(lambda: con.mark() == len(out), 60), (con.mark(), len(out))
        assert wait_for(lambda: len(reading.bytes()) == len(out), 60)
        assert reading.bytes() == out
        assert a.backlog.queued <= a.backlog.limit
        # The stalled client reads again: it gets its backlog, then the note, then new output.
        stalled.unblock()
        node.send(b"after\n")
        assert wait_for(lambda: stalled.bytes().endswith(b"after\n"))
    finally:
        stalled.unblock()
        a.close()
        b.close()
        con.close()
    lost = with_holes(stalled.bytes(), out + b"after\n", b"node 1")
    assert lost >= len(out) - 2 * a.backlog.limit
    assert reading.bytes() == out + b"after\n"
    assert logged_text(tmp_path / "node1.log") == out + b"after\n"


def logged_text(path: Path) -> bytes:
    """What a (rotated) console log holds, its time stamps taken off."""
    files = [path.with_name(f"{path.name}.{i}") for i in (2, 1)] + [path]
    lines = b"".join(f.read_bytes() for f in files if f.exists()).splitlines(keepends=True)
    assert all(re.match(rb"\d{4}-\d\d-\d\dT[\d:.]{12}Z ", ln) for ln in lines)
    return b"".join(ln[25:] for ln in lines)


def test_the_note_comes_when_the_client_reads_again_without_more_output():
    sink = Collector()
    sink.block()
    b = Backlog(sink, limit=100)
    try:
        b.put(b"a" * 80, "node 2")
        assert wait_for(lambda: b.queued == 80)
        b.put(b"b" * 50, "node 2")  # does not fit: dropped
        b.put(b"c" * 10, "node 3")  # fits, after the loss: the note goes first
        sink.unblock()
        assert wait_for(lambda: sink.bytes().endswith(b"c" * 10))
        b.put(b"d" * 150, "node 2")  # one chunk larger than the limit still fits alone
        assert wait_for(lambda: sink.bytes().endswith(b"d" * 150))
    finally:
        sink.unblock()
        assert b.close(5)
    got = sink.bytes()
    assert got == (b"a" * 80 + b"\r\n[kh: 50 bytes of node 2's output dropped: this session "
                   b"did not read]\r\n" + b"c" * 10 + b"d" * 150)
    assert b.dropped_total == {"node 2": 50}


def test_a_loss_is_noted_even_if_the_session_ends_at_once():
    sink = Collector()
    sink.block()
    b = Backlog(sink, limit=10)
    b.put(b"x" * 10, "node 1")
    assert wait_for(lambda: b.queued == 10)
    b.put(b"y", "node 1")
    sink.unblock()
    assert b.close(5)
    assert sink.bytes().endswith(b"[kh: 1 bytes of node 1's output dropped: this session "
                                 b"did not read]\r\n")


def test_a_client_gone_for_good_is_let_go():
    calls = []

    def broken(data: bytes) -> None:
        calls.append(data)
        raise BrokenPipeError(32, "Broken pipe")

    b = Backlog(broken, limit=100)
    b.put(b"one", "node 1")
    assert wait_for(lambda: len(calls) == 1)
    b.put(b"two", "node 1")
    assert b.close(5)
    assert calls == [b"one"]


def test_a_subscriber_that_blocks_holds_up_neither_reader_nor_log(node, tmp_path):
    """The same for any subscriber of a console (kh console's mux, an attached terminal)."""
    con = node.attach(tmp_path / "node1.log")
    slow = Collector()
    slow.block()
    unsub = con.subscribe(slow)
    out = pattern(4 << 20)
    try:
        node.send_async(out)
        assert wait_for(lambda: con.mark() == len(out), 60)
        assert wait_for(lambda: logged_text(tmp_path / "node1.log") == out[:out.rindex(b"\n") + 1])
        slow.unblock()
        node.send(b"end\n")
        assert wait_for(lambda: slow.bytes().endswith(b"end\n"))
    finally:
        slow.unblock()
        unsub()
        con.close()
    with_holes(slow.bytes(), out + b"end\n", b"node1")


def test_tagged_prompt_of_a_quiet_node_shows_while_another_prints(tmp_path):
    """Finding 6: the quiet timer is per node, and the session's end shows every partial."""
    n1, n2 = FakeNode(tmp_path / "a.sock"), FakeNode(tmp_path / "b.sock")
    c1, c2 = n1.attach(), n2.attach()
    got = Collector()
    out = Output({1: c1, 2: c2}, got, tagged=True)
    stop = threading.Event()

    def chatter() -> None:
        i = 0
        while not stop.is_set():
            n1.send(b"tick %d\r\n" % i)
            i += 1
            time.sleep(0.01)

    t = threading.Thread(target=chatter)
    t.start()
    try:
        assert wait_for(lambda: b"node1: tick 3\r\n" in got.bytes())
        n2.send(b"=> ")
        assert wait_for(lambda: b"node2: => \r\n" in got.bytes(), 10), got.bytes()[-200:]
        assert t.is_alive() and not stop.is_set()  # node 1 never went quiet meanwhile
    finally:
        stop.set()
        t.join()
        out.close()
        for x in (c1, c2, n1, n2):
            x.close()
    ticks = [int(m) for m in re.findall(rb"node1: tick (\d+)\r\n", got.bytes())]
    assert ticks == list(range(len(ticks)))  # every line, in order, none cut


def test_tagged_session_end_shows_every_partial_line(tmp_path):
    n1, n2 = FakeNode(tmp_path / "a.sock"), FakeNode(tmp_path / "b.sock")
    c1, c2 = n1.attach(), n2.attach()
    got = Collector()
    out = Output({1: c1, 2: c2}, got, tagged=True, quiet=3600)  # only close() shows them
    try:
        fed = threading.Semaphore(0)
        for c in (c1, c2):  # subscribed after the session: called once it has the bytes
            c.subscribe(lambda d: fed.release(), direct=True)
        n1.send(b"whole\r\nhalf a li")
        n2.send(b"=> ")
        assert fed.acquire(timeout=10) and fed.acquire(timeout=10)
        assert wait_for(lambda: got.bytes() == b"node1: whole\r\n")
        assert out.close(5)
    finally:
        out.close()
        for x in (c1, c2, n1, n2):
            x.close()
    assert got.bytes() in (b"node1: whole\r\nnode1: half a li\r\nnode2: => \r\n",
                           b"node1: whole\r\nnode2: => \r\nnode1: half a li\r\n")


def test_input_waiting_for_a_node_is_bounded(node):
    """Finding 3: far more input than the node takes makes the writer wait; khd's memory
    stays flat, and every byte still arrives, in order."""
    con = node.attach()
    w = NodeWriter(1, con)
    hub = Hub(1, {1: w})
    total, chunk = 4 << 20, 128 * 1024
    data = pattern(total, seed=7)
    pushed = [0]

    def push() -> None:
        for off in range(0, total, chunk):
            hub.write(data[off:off + chunk])
            pushed[0] = off + chunk

    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    t = threading.Thread(target=push)
    t.start()
    try:
        # The node reads nothing: wait until the writer stops making progress.
        last = -1
        while pushed[0] != last and t.is_alive():
            last = pushed[0]
            time.sleep(0.5)
        grown = tracemalloc.get_traced_memory()[0] - base
        assert pushed[0] < total and t.is_alive(), "the writer was made to wait"
        assert w.queued <= w.limit
        assert grown < 4 * w.limit, grown
        got = node.read(total)  # now the node takes everything
        t.join(60)
        assert not t.is_alive()
        assert got == data
    finally:
        tracemalloc.stop()
        w.stop()
        con.close()


def test_a_reset_drops_what_waits_even_for_a_blocked_writer(node):
    con = node.attach()
    w = NodeWriter(1, con, limit=8 * 1024)
    hub = Hub(1, {1: w})
    data = pattern(1 << 20, seed=3)
    done = threading.Event()

    def push() -> None:
        hub.write(data)
        done.set()

    t = threading.Thread(target=push)
    t.start()
    try:
        assert wait_for(lambda: w.queued >= 7 * 1024)
        assert not done.is_set()
        # The node consumes what sits in the socket only after the flush (as after a reset).
        flusher = threading.Thread(target=w.flush)
        flusher.start()
        assert done.wait(10), "the blocked write gave up its data"
        got = node.read(64 * 1024, timeout=0.5)
        flusher.join(10)
        hub.write(b"after reset\n")
        got += node.read(len(b"after reset\n"))
    finally:
        w.stop()
        con.close()
    assert got.endswith(b"after reset\n")
    before = got[:-len(b"after reset\n")]
    assert data.startswith(before) and len(before) < 16 * 1024, len(before)
