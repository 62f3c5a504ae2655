"""Reading kh's U-Boot on a node's console: what ends a `run kboot`."""

import socket
import threading

import pytest

from kh.errors import UsageError
from kh.hw import uboot
from kh.hw.console import Console


@pytest.mark.parametrize("line,group,text", [
    (b"kh-failed: vblade node1: boot key kh.aoe=12.x is missing or malformed\r\n", "failed",
     b"vblade node1: boot key kh.aoe=12.x is missing or malformed"),
    (b"Kernel panic - not syncing: VFS: Unable to mount root fs\r\n", "panic",
     b"Kernel panic - not syncing: VFS: Unable to mount root fs"),
    (b"Wrong Image Format for bootm command\r\n", "uboot", b"Wrong Image Format for bootm command"),
    (b"kh-ready: apache node3 eth0=10.1.0.3\r\n", "appliance", b"apache"),
])
def test_kboot_outcomes_are_whole_lines(line, group, text):
    # The console can hand over half a line; a half line must not be taken for the message.
    for cut in range(1, len(line) - 2):
        assert uboot.KBOOT_OUTCOME.search(b"Run /init as init process\r\n" + line[:cut]) is None
    m = uboot.KBOOT_OUTCOME.search(b"Run /init as init process\r\n" + line)
    assert m is not None and m.group(group) == text


@pytest.mark.parametrize("text,lines", [
    ("run kboot", ["run kboot"]),
    ("run kboot\n", ["run kboot"]),
    ("a\r\nb\rc\nd", ["a", "b", "c", "d"]),  # any line end is one line end
    ("a\r\n", ["a"]),  # not "a" and an empty line (U-Boot: repeat the last command)
    ("", [""]),
    ("x" * uboot.LINE_MAX, ["x" * uboot.LINE_MAX]),
])
def test_console_lines_one_line_sent_is_one_command(text, lines):
    assert uboot.console_lines(text) == lines


def test_a_line_longer_than_u_boot_takes_is_refused_with_the_limit():
    # Seen: `khdo write` of a 1,100-character line exited 0 while U-Boot kept part of it.
    with pytest.raises(UsageError, match=r"line 2 is 1100 bytes; .* at most 1023"):
        uboot.console_lines("echo ok\n" + "x" * 1100)
    with pytest.raises(UsageError, match="1024 bytes"):
        uboot.console_lines("é" * 512)  # bytes, not characters, fill U-Boot's buffer


@pytest.mark.parametrize("ch", ["\t", "\x15", "\x1b", "\x7f", "\x00"])
def test_a_control_character_in_a_line_is_refused(ch):
    with pytest.raises(UsageError, match="control character"):
        uboot.console_lines(f"echo a{ch}b")


def test_uboot_command_refuses_what_is_not_one_line():
    class NoConsole:  # nothing may be written
        def mark(self):
            raise AssertionError("written")

    with pytest.raises(UsageError):
        uboot.uboot_command(NoConsole(), "setenv khargs '" + "k" * 1100 + "'")  # type: ignore
    with pytest.raises(UsageError):
        uboot.uboot_command(NoConsole(), "echo a\nreset")  # type: ignore


def test_bytes_that_are_not_utf8_count_and_go_as_given():
    """Issue 10: `khdo write $'echo \\xff'` was an internal error (UnicodeEncodeError): argv
    carries such bytes as surrogate escapes, and a line is the bytes given."""
    line = "echo \udcff\udcfe"  # os.fsdecode(b"echo \xff\xfe")
    assert uboot.console_lines(line + "\n") == [line]
    assert uboot.line_bytes(line) == b"echo \xff\xfe"
    assert uboot.console_lines("\udcff" * uboot.LINE_MAX) == ["\udcff" * uboot.LINE_MAX]
    with pytest.raises(UsageError, match="1024 bytes"):
        uboot.console_lines("\udcff" * (uboot.LINE_MAX + 1))


def test_khargs_with_a_single_quote_are_refused_before_anything_is_typed():
    class NoConsole:  # nothing may be written
        def mark(self):
            raise AssertionError("written")

        def write(self, data):
            raise AssertionError("written")

    with pytest.raises(UsageError, match="single quote"):
        uboot.set_khargs(NoConsole(), "kh.x='1'")  # type: ignore


def test_khargs_are_set_quoted_and_the_prompt_awaited(tmp_path):
    a, b = socket.socketpair()
    with Console(tmp_path / "none", name="fake") as con:
        con.adopt(a)
        b.sendall(b"=> ")
        uboot.wait_prompt(con, 5)
        uboot_side = []

        def answer():
            got = b""
            while not got.endswith(b"\n"):
                got += b.recv(4096)
            uboot_side.append(got)
            b.sendall(got.replace(b"\n", b"\r\n") + b"=> ")

        t = threading.Thread(target=answer)
        t.start()
        uboot.set_khargs(con, "kh.node=3 kh.a=b c")
        t.join(5)
    b.close()
    assert uboot_side == [b"setenv khargs 'kh.node=3 kh.a=b c'\n"]
