"""khdo refuses what a node's console would not run as sent, before it connects."""

import socket

import pytest
from click.testing import CliRunner

from kh.cli import khdo

OBJ = "con12@127.0.0.1\nprotocol: uboot\nnetwork 7 : eth0\nnodeinfo: 3 3 10.7.0.3\nnodes: 3\n"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again: a connection would be refused


def test_write_of_a_line_longer_than_u_boot_takes_fails_with_the_limit():
    r = CliRunner().invoke(khdo.main, ["-p", str(closed_port()), "write", "echo " + "x" * 1095],
                           input=OBJ, env={"KH_CREDENTIAL": "secret-credential"})
    assert r.exit_code != 0
    assert "the line is 1100 bytes; a node's console takes at most 1023" in r.output
    assert "refused" not in r.output  # it never tried to connect


class FakeChannel:
    """The channel khdo opens: what it was asked to run, with which bytes."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def exec(self, command: str, data: bytes = b"", **kw: object) -> tuple[bytes, bytes, int]:
        self.sent.append((command, data))
        return b"", b"", 0

    def close(self) -> None:
        pass


def test_write_sends_bytes_that_are_not_utf8_as_given(monkeypatch):
    """Issue 10: `khdo write $'echo \\xff'` exited 70 (UnicodeEncodeError: surrogates not
    allowed): argv holds such bytes as surrogate escapes; the node gets the bytes."""
    ch = FakeChannel()
    monkeypatch.setattr(khdo.Ctx, "channel", lambda self: ch)
    r = CliRunner().invoke(khdo.main, ["write", "echo \udcff", "\udcfe"], input=OBJ,
                           env={"KH_CREDENTIAL": "secret-credential"})
    assert r.exit_code == 0, r.output
    assert ch.sent == [("send", b"echo \xff \xfe\n")]


@pytest.mark.parametrize("seconds", ["abc", "-1", "nan", "inf", "1e3", "\u0661", "1 2"])
def test_readcon_refuses_what_is_not_a_number_of_seconds(monkeypatch, seconds):
    ch = FakeChannel()
    monkeypatch.setattr(khdo.Ctx, "channel", lambda self: ch)
    r = CliRunner().invoke(khdo.main, ["readcon", *seconds.split(" ")], input=OBJ,
                           env={"KH_CREDENTIAL": "secret-credential"})
    assert r.exit_code == 2 and "readcon takes seconds" in r.output, r.output
    assert ch.sent == []


OBJ3 = ("con12@127.0.0.1\nprotocol: uboot\nnetwork 7 : eth0\nnodeinfo: 1 1 10.7.0.1\n"
        "nodeinfo: 2 2 10.7.0.2\nnodeinfo: 3 3 10.7.0.3\nnodes: 1 2 3\n")


def test_peripcmd_runs_every_node_at_once_and_prints_in_node_order(tmp_path):
    """Issue 12: a web farm's pages are polled in parallel. Node 1's command waits for node
    3's, which one after the other never comes (its `timeout` ends it, status 124); each
    node's output whole, in node order, and the worst status."""
    cmd = (f"if [ %node% = 1 ]; then timeout 20 sh -c 'until [ -e {tmp_path}/3 ]; do "
           f"sleep 0.05; done' || exit $?; fi; touch {tmp_path}/%node%; echo page of %ip%; "
           f"echo more of %node% >&2; [ %node% != 2 ] || exit 3")
    r = CliRunner().invoke(khdo.main, ["peripcmd", cmd], input=OBJ3,
                           env={"KH_CREDENTIAL": "secret-credential"})
    assert r.exit_code == 3, r.output
    # (a line of khdo's own may come first: where the commands run)
    assert r.stderr.endswith("".join(f"page of 10.7.0.{n}\nmore of {n}\n" for n in (1, 2, 3)))


def test_sigterm_ends_khdo_and_the_commands_it_runs(tmp_path):
    """webfarm.sh ends its poller with SIGTERM: khdo must not leave the nodes' commands
    running (they are in sessions of their own, so nothing else would end them)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    p = subprocess.Popen([sys.executable, "-m", "kh.cli.khdo", "peripcmd",
                          f"echo $$ > {tmp_path}/%node%; exec sleep 120"],
                         stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                         env={**os.environ, "KH_CREDENTIAL": "secret-credential"})
    assert p.stdin is not None
    p.stdin.write(OBJ3)
    p.stdin.close()
    deadline = time.monotonic() + 60
    while len([f for f in tmp_path.glob("[0-9]") if f.read_text().strip()]) < 3:
        assert time.monotonic() < deadline and p.poll() is None, p.stderr
        time.sleep(0.05)
    children = [int(f.read_text()) for f in tmp_path.glob("[0-9]")]
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) == 143
    assert "kh: stopped by SIGTERM" in (p.stderr.read() if p.stderr else "")
    for pid in children:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_write_to_a_khd_from_before_send_uses_raw(monkeypatch):
    """Nodes outlive khd and khd outlives kh upgrades: a running khd that does not know the
    channel's `send` refuses it before reading a byte, and khdo write falls back to raw."""
    class OldKhd(FakeChannel):
        def exec(self, command: str, data: bytes = b"", **kw: object
                 ) -> tuple[bytes, bytes, int]:
            self.sent.append((command, data))
            if command == "send":
                return b"", b"kh: unknown channel command 'send' (try: raw, tagged, load " \
                    b"ADDR, nodes)\n", 2
            return b"", b"", 0

    ch = OldKhd()
    monkeypatch.setattr(khdo.Ctx, "channel", lambda self: ch)
    r = CliRunner().invoke(khdo.main, ["write", "run kboot"], input=OBJ,
                           env={"KH_CREDENTIAL": "secret-credential"})
    assert r.exit_code == 0, r.output
    assert ch.sent == [("send", b"run kboot\n"), ("raw", b"run kboot\n")]
    assert "unknown channel command" not in r.output
