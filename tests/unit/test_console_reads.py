"""A console that prints fast a few bytes at a time is read in pieces, not a read per write.

QEMU's 16550 sends each byte of a node's output by itself; a reader that kept up read 2.3 bytes
at a time, and every read went through khd's log, history, each session's backlog and an ssh
packet per reading client (seen with benchmarks/hostile.py ``--only console-gib``: khd took
0.6 of a host core for 4 nodes printing at U-Boot).
"""

from __future__ import annotations

import threading
import time

from tests.unit.fakenode import FakeNode, wait_for


def test_a_node_writing_two_bytes_at_a_time_is_read_in_larger_pieces(tmp_path):
    node = FakeNode(tmp_path / "console.sock")
    con = node.attach(tmp_path / "node1.log")
    reads: list[bytes] = []
    con.subscribe(reads.append, direct=True)  # called once per read, on the reader thread
    text = b"".join(b"%08x: 00000000 00000000 00000000 00000000    ................\r\n" % i
                    for i in range(30))
    writes = [text[i:i + 2] for i in range(0, len(text), 2)]
    try:
        def uart() -> None:  # one write at a time, the reader idle in between
            for w in writes:
                node.send(w)
                time.sleep(0.0002)

        t = threading.Thread(target=uart)
        t.start()
        t.join()
        assert wait_for(lambda: sum(map(len, reads)) == len(text), 10)
        assert b"".join(reads) == text
        assert len(reads) < len(writes) / 4, f"{len(reads)} reads for {len(writes)} writes"
    finally:
        con.close()
        node.close()
    logged = (tmp_path / "node1.log").read_bytes().splitlines()
    assert [ln.split(b" ", 1)[1] for ln in logged] == text.replace(b"\r", b"").splitlines()
