"""Console logs never show a token or credential in full (kh.hw.redact, issue 11): the
`kh.token=`/`kh.cred=` values U-Boot echoes and the kernel prints are cut to their first 4
characters in the log file, and so in what `kh logs` replays from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from kh.hw.console import ConsoleLog
from kh.hw.redact import redact
from kh.logview import follow
from tests.unit.fakenode import FakeNode, wait_for

TOKEN = b"kht_Zq3v9Xy2Hw8bLm4Np7Rs1Tu6Vc0Dk5Ej2Fg9Ah3Bi7"
CRED = b"alice-secret-credential"


@pytest.mark.parametrize(("line", "want"), [
    (b"=> setenv khargs \"${khargs} kh.token=" + TOKEN + b" kh.disknet=5\"",
     b"=> setenv khargs \"${khargs} kh.token=kht_... kh.disknet=5\""),
    (b"=> setenv khargs 'kh.node=3 kh.cred=" + CRED + b"'",
     b"=> setenv khargs 'kh.node=3 kh.cred=alic...'"),
    (b"Kernel command line: console=ttyS0 kh.user=alice kh.cred=" + CRED + b" kh.token="
     + TOKEN, b"Kernel command line: console=ttyS0 kh.user=alice kh.cred=alic... "
     b"kh.token=kht_..."),
    (b"kh.token=abc kh.cred=", b"kh.token=abc kh.cred="),  # nothing past 4 characters
    # a quoted value (found by the issue-10 trial: it was logged whole)
    (b"=> setenv khargs kh.token=\"" + TOKEN + b"\" kh.cred='" + CRED + b"'",
     b"=> setenv khargs kh.token=\"kht_...\" kh.cred='alic...'"),
    (b"kh.tokens=1 xkh.credit=2 kh.server=10.1.255.254:7480",
     b"kh.tokens=1 xkh.credit=2 kh.server=10.1.255.254:7480"),
])
def test_redact(line, want):
    assert redact(line) == want


def test_the_log_and_its_replay_hold_no_secret(tmp_path: Path):
    """Through a real Console reading a node that echoes byte by byte, as U-Boot does."""
    log = tmp_path / "node1.log"
    node = FakeNode(tmp_path / "con.sock")
    con = node.attach(log)
    try:
        typed = b"setenv khargs \"${khargs} kh.token=" + TOKEN + b"\"\r\n=> "
        for i in range(len(typed)):
            node.send(typed[i:i + 1])
        node.send(b"\r\nKernel command line: kh.cred=" + CRED + b" kh.token=" + TOKEN + b"\r\n")
        assert wait_for(lambda: log.read_bytes().count(b"\n") >= 3)
        assert TOKEN in con.text()  # the live console is the node's own, untouched
    finally:
        con.close()
        node.close()
    data = log.read_bytes()
    assert TOKEN not in data and CRED not in data and TOKEN[:8] not in data
    assert data.count(b"kh.token=kht_...") == 2 and b"kh.cred=alic..." in data
    replayed = bytearray()
    follow(log, replayed.extend, follow=False)  # what `kh logs` prints
    assert TOKEN not in replayed and CRED not in replayed and b"kh.token=kht_..." in replayed


def test_a_line_logged_in_pieces_is_redacted_whole(tmp_path: Path):
    log = ConsoleLog(tmp_path / "n.log")
    for piece in (b"kh.to", b"ken=" + TOKEN[:10], TOKEN[10:] + b" x\r", b"\n"):
        log.write(piece)
    log.close()
    assert (tmp_path / "n.log").read_bytes().endswith(b" kh.token=kht_... x\n")
