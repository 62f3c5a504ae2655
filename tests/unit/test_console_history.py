"""A console's memory is a ring (issue 10, finding 3): offsets stay absolute, ``expect`` and
``text`` work as before on what is held; a console read again after khd was away says so in
its log (finding 6); `kh logs -f` follows a log across a khd restart."""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

import pytest

from kh.errors import KhTimeout
from kh.hw import uboot
from kh.hw.console import Console, ConsoleLog, ConsoleOverrun
from kh.logview import follow
from tests.unit.fakenode import FakeNode, pattern, wait_for

STAMP = rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


@pytest.fixture
def node(tmp_path: Path):  # type: ignore[no-untyped-def]
    n = FakeNode(tmp_path / "con.sock")
    yield n
    n.close()


def test_memory_holds_the_last_history_bytes_and_offsets_stay_absolute(node):
    con = node.attach(history=64 * 1024)
    try:
        out = pattern(3 << 20)
        node.send(out)
        assert wait_for(lambda: con.mark() == len(out))
        assert con.mark() - con.oldest() < 64 * 1024
        assert con.text() == out[con.oldest():]  # all that is held
        assert con.text(len(out) - 10) == out[-10:]
        with pytest.raises(ConsoleOverrun):
            con.text(0)
        m = con.expect(re.compile(rb"line (\d+) of 0\n"), 5, stage="a line", start=len(out) - 40)
        assert out[m.start():m.end()] == m.group(0)
        assert m.start() > len(out) - 40 and m.group(1) == out[m.start(1):m.end(1)]
        # A match's groups are its own: the history moving on does not change them.
        group = m.group(0)
        node.send(pattern(256 * 1024, seed=1))
        assert wait_for(lambda: con.oldest() > m.end())
        assert m.group(0) == group
        with pytest.raises(KhTimeout):
            con.expect(b"line 0 of 0\n", 0.2, stage="a line long gone", start=0)
    finally:
        con.close()


def test_a_prompt_is_not_seen_where_the_history_was_cut(node):
    """``(?:^|\\n)=> `` must not match mid-line just because the held bytes start there."""
    con = node.attach(history=16)
    try:
        node.send(b"x" * 20 + b"=> " + b"y" * 13)  # held from the "=" on
        assert wait_for(lambda: con.mark() == 36)
        with pytest.raises(KhTimeout):
            con.expect(uboot.UBOOT_PROMPT, 0.2, stage="U-Boot prompt", start=0)
        node.send(b"\n=> ")
        m = con.expect(uboot.UBOOT_PROMPT, 5, stage="U-Boot prompt", start=0)
        assert (m.start(), m.end()) == (36, 40)
    finally:
        con.close()


def test_uboot_dialogue_after_the_history_moved_on(node):
    """kh's U-Boot dialogue (mark, expect, text by offsets) long after the history moved on;
    an answer longer than the history is an error, never a wrong answer."""
    con = node.attach(history=4096)
    try:
        node.send(pattern(1 << 20) + b"\n=> ")
        assert wait_for(lambda: con.mark() > 1 << 20)

        def answer(dots: int) -> None:
            assert node.read(len(b"version\n")) == b"version\n"
            node.send(b"version\r\nU-Boot 2023.01\r\n" + b"." * dots + b"\r\n=> ")

        for dots, ok in ((1000, True), (10000, False)):
            t = threading.Thread(target=answer, args=(dots,))
            t.start()
            try:
                if ok:
                    assert uboot.uboot_command(con, "version").rstrip("\r\n") == \
                        "U-Boot 2023.01\n" + "." * dots
                else:
                    with pytest.raises(ConsoleOverrun, match="no longer held in memory"):
                        uboot.uboot_command(con, "version")
            finally:
                t.join()
        assert con.text().endswith(b"\r\n=> ") and len(con.text()) < 4096
    finally:
        con.close()


def test_reattach_writes_a_gap_with_both_times(node, tmp_path):
    log = tmp_path / "node1.log"
    first = ConsoleLog(log)
    first.write(b"before khd stopped\n")
    first.close()
    then = 1704164645.678  # 2024-01-02T03:04:05.678Z: as if khd stopped then
    os.utime(log, (then, then))
    con = node.attach(log, gap="khd was not running")
    try:
        node.send(b"after\n")
        assert wait_for(lambda: log.read_bytes().endswith(b" after\n"))
    finally:
        con.close()
    lines = log.read_bytes().splitlines()
    assert lines[0].endswith(b" before khd stopped")
    assert re.fullmatch(
        STAMP + rb" \[kh: console not read from 2024-01-02T03:04:05\.678Z to (" + STAMP
        + rb") \(khd was not running\); output in that time may be lost\]", lines[1]), lines
    assert lines[2].endswith(b" after")


def test_no_gap_note_on_a_plain_start_and_close_marks_the_time(node, tmp_path):
    log = tmp_path / "node1.log"
    log.write_bytes(b"")
    os.utime(log, (1.0, 1.0))
    con = node.attach(log)
    con.close()
    assert log.read_bytes() == b""
    assert log.stat().st_mtime > time.time() - 3600  # until when this reader read


def test_a_console_that_never_connected_does_not_claim_it_read(tmp_path):
    log = tmp_path / "node1.log"
    log.write_bytes(b"")
    os.utime(log, (1.0, 1.0))
    con = Console(tmp_path / "nobody-listens.sock", log, name="node1", gap="khd was not running")
    with pytest.raises(KhTimeout):
        con.connect(0.05)
    con.close()
    assert log.stat().st_mtime == 1.0 and log.read_bytes() == b""


def test_gap_without_an_earlier_log(node, tmp_path):
    log = tmp_path / "node1.log"
    con = node.attach(log, gap="khd was not running")
    con.close()
    assert re.fullmatch(STAMP + rb" \[kh: console not read until " + STAMP
                        + rb" \(khd was not running\); output before then may be lost\]\n",
                        log.read_bytes())


def test_follow_goes_on_across_a_khd_restart(node, tmp_path):
    """`kh logs -f` across khd stopping (the log closed) and a new khd (opened again, a gap
    note, more lines), and across the file being made anew."""
    log = tmp_path / "node1.log"
    first = ConsoleLog(log)
    first.write(b"one\n")
    seen = bytearray()
    stop = threading.Event()
    t = threading.Thread(target=follow, args=(log, seen.extend),
                         kwargs={"follow": True, "poll": 0.01, "stop": stop.is_set})
    t.start()
    try:
        assert wait_for(lambda: b"one\n" in seen)
        first.write(b"half")
        first.close()  # khd stops: its partial line is written whole
        con = node.attach(log, gap="khd was not running")
        node.send(b"two\n")
        assert wait_for(lambda: b" two\n" in seen)
        con.close()
        log.unlink()  # made anew (another inode), as a cleaned state dir would be
        again = ConsoleLog(log)
        again.write(b"three\n")
        again.close()
        assert wait_for(lambda: b" three\n" in seen)
    finally:
        stop.set()
        t.join(5)
    text = bytes(seen)
    assert re.search(rb" one\n.* half\n.*console not read from .* two\n.* three\n", text,
                     re.DOTALL), text


def test_a_closed_console_has_nothing_left_to_send(node):
    """A session draining its input when the node was released (its console closed) crashed
    its thread: ``unsent`` asked the kernel about descriptor -1 (ValueError). A closed console
    can send nothing more: 0 bytes wait, and waiting for them is over at once."""
    con = node.attach()
    con.write(b"x" * 4096)  # the node reads none of it
    assert wait_for(lambda: con.unsent() > 0)
    con.close()
    assert con.unsent() == 0
    assert con.wait_sent(5) is True
    never = Console(node.path, None, name="node9")  # never connected: the same
    assert never.unsent() == 0 and never.wait_sent(0) is True
