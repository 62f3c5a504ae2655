"""A kh command's error line is one line a terminal only displays (HARDEN 4): errors can carry
what a node printed (the appliance's `kh-failed:` line, a kernel panic's line, U-Boot's refusal,
mrw's error: kh.hw.uboot) or what another host answered, and those bytes went to the user's
terminal as they were: a node could retitle it, clear it, or rewrite the line with a CR so the
failure read as something else. Now `kh: ...` shows every control character in caret notation
(kh.logview.one_line), newlines too, as `kh logs` shows a console."""

from __future__ import annotations

import socket

import pytest

from kh.cli.common import report
from kh.errors import BootError, KhError
from kh.hw import uboot
from kh.hw.console import Console

# a title, a cleared screen, a C1 CSI (UTF-8), the cursor back to column 1 and a backspace
HOSTILE = b"\x1b]0;owned\x07\x1b[2J\xc2\x9b31m\x1b[1G\x08kh: node 3 booted fine"


def kboot_error(tmp_path, line: bytes) -> BootError:
    """What `run kboot`'s wait (kh boot, a lab's nodes) raises for a node that prints
    ``line``, read through a real Console."""
    ours, node = socket.socketpair()
    con = Console(tmp_path / "console.sock", name="node3")
    con.adopt(ours)
    try:
        node.sendall(line)
        with pytest.raises(BootError) as e:
            uboot.kboot_outcome(con, 0, 60)  # (found at once)
        return e.value
    finally:
        node.close()
        con.close()


def test_what_a_node_printed_reaches_the_terminal_as_text(tmp_path, capsys):
    e = kboot_error(tmp_path, b"kh-failed: " + HOSTILE + b"\n")
    assert report(e, False) == 1
    err = capsys.readouterr().err
    assert err == ("kh: the appliance failed: ^[]0;owned^G^[[2JM-^[31m^[[1G^Hkh: node 3 booted "
                   "fine (console log: None)\n")


@pytest.mark.parametrize("e", [KhError("two\nlines", "and\ra hint\x1b[K"),
                               RuntimeError("internal\x1b[2J\nerror")])
def test_every_error_is_one_safe_line(e, capsys):
    report(e, False)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n")
    assert not any(c < " " or "\x7f" <= c <= "\x9f" for c in err[:-1]), repr(err)
    assert "^J" in err and "^[" in err
