"""How kh boot types commands at a node's shell (checked with the host's own shells, on a pipe
and on a terminal), and its command line and signals."""

import json
import os
import pty
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading

import pytest

from kh import boot
from kh.cli.common import stop_on_signals
from kh.errors import Stopped, UsageError
from kh.hw.console import Console

# --- how `kh boot` and BootedNode.run type a command at the node's shell -------------------

TOK = "KH0123456789ab"
# Prints its own argv as JSON: what a program on the node would be handed.
SHOW_ARGV = [sys.executable, "-c", "import json, sys; print(json.dumps(sys.argv[1:]))"]
ODD_ARGS = ["a  b", "$HOME", "it's", 'say "hi"', "back\\slash\\", "", "two\nlines\n",
            "tab\there", "%s%d%%", "\\101\\n", "ünïcödé", "\x03\x04\x1b[A\x7f\x15", "~", "*",
            "$(false)", "`false`", ";", "&&", "# not a comment", "!", "-n", "'", "\\",
            os.fsdecode(b"\xff\xfe not utf-8")]
SHELLS = [s for s in ("dash", "bash") if shutil.which(s)]


@pytest.mark.parametrize("argv,line", [
    (["uname", "-a"], "'uname' -a"),
    (["exit", "7"], "'exit' 7"),
    (["sh", "-c", "exit 7"], "'sh' -c 'exit 7'"),
    (["echo", "a  b", "$HOME", "it's"], """'echo' 'a  b' '$HOME' 'it'"'"'s'"""),
    (["if", "true"], "'if' true"),  # never the keyword
    (["printf", "", "x"], "'printf' '' x"),
    ([""], "''"),
])
def test_argv_command_quotes_for_a_posix_shell(argv, line):
    assert boot.argv_command(argv) == line


def test_empty_argv_refused():
    with pytest.raises(UsageError, match="no command"):
        boot.argv_command([])


def host_shell(shell: str, command: str, tok: str = TOK) -> tuple[str, int, str]:
    """Type ``command``'s lines into a host shell reading its stdin, as the node's does; a
    line typed after them shows they were not swallowed. Returns output, status, the rest."""
    lines = boot.typed_lines(command, tok)
    r = subprocess.run([shell], input="\n".join(lines).encode() + b"\necho typed-after\n",
                       capture_output=True, timeout=30,
                       env={"PATH": os.environ["PATH"], "HOME": "/home-of-the-shell"})
    out = r.stdout.decode("utf-8", "surrogateescape")
    m = re.search(rf"(?s){tok}_B\n(.*)\n{tok}_E(\d+)\n(.*)", out)
    assert m, (out, r.stderr)
    return m.group(1), int(m.group(2)), m.group(3)


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("args", [ODD_ARGS, ["x" * 3000 + "'\n%\\" * 300, "y"], []],
                         ids=["odd", "long", "none"])
def test_argv_arrives_exactly(shell, args):
    out, status, rest = host_shell(shell, boot.argv_command([*SHOW_ARGV, *args]))
    assert (json.loads(out), status, rest) == (args, 0, "typed-after\n")


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("argv,status", [
    (["exit", "7"], 7), (["sh", "-c", "exit 7"], 7), (["exit 7"], 127), (["false"], 1),
    (["sh", "-c", "kill -9 $$"], 137), (["cat"], 0),  # cat reads /dev/null, not the next line
])
def test_argv_status_comes_back(shell, argv, status):
    assert host_shell(shell, boot.argv_command(argv)) == ("", status, "typed-after\n")


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("command,out,status", [
    ("exit 7", "", 7),
    ("echo partial; exit 3; echo never", "partial\n", 3),
    ("set -e; false; echo never", "", 1),
    ("exec true", "", 0),
    ("cd /; pwd # a comment that must not eat the end marker", "/\n", 0),
    ("echo 'a  b' \"$HOME\" it\\'s", "a  b /home-of-the-shell it's\n", 0),
    ("for i in 1 2; do\n  echo $i\ndone", "1\n2\n", 0),
    ('echo "unterminated', None, 2),  # a syntax error: the shell says so, the frame holds
    ("", "", 0),
])
def test_sh_command_line_runs_in_a_subshell(shell, command, out, status):
    got_out, got_status, rest = host_shell(shell, command)
    assert (got_status, rest) == (status, "typed-after\n")
    if out is not None:
        assert got_out == out


def test_typed_lines_are_short_printable_ascii():
    for command in (boot.argv_command(["echo", *ODD_ARGS]), "\t" * 5000, "é" * 4000):
        lines = boot.typed_lines(command, TOK)
        assert len(lines) > 1 or len(command) < boot.LINE_MAX
        for line in lines:
            assert len(line) + 1 <= boot.LINE_MAX
            assert all(0x20 <= ord(c) < 0x7F for c in line), line


def test_nul_refused():
    with pytest.raises(UsageError, match="NUL"):
        boot.typed_lines("echo a\0b", TOK)


@pytest.fixture(params=SHELLS)
def tty_node(request, tmp_path):
    """A BootedNode whose console is an interactive host shell on a pseudo-terminal, reached
    as a node's is, through a unix socket: echo, prompts, a line discipline."""
    shell = request.param
    argv = [shell, "-i"] if shell == "dash" else [shell, "--norc", "--noprofile", "-i"]
    path = tmp_path / "console.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(1)
    pid, master = pty.fork()
    if pid == 0:  # the child: a session leader with the pty as its controlling terminal
        os.execvpe(shell, argv, {"PATH": os.environ["PATH"], "PS1": "$ ", "TERM": "dumb",
                                  "HOME": "/home-of-the-shell"})

    def relay() -> None:
        conn, _ = srv.accept()
        with conn:
            while True:
                ready, _, _ = select.select([conn, master], [], [])
                try:
                    if conn in ready:
                        typed = conn.recv(4096)
                        if not typed:
                            return
                        os.write(master, typed)
                    if master in ready:
                        conn.sendall(os.read(master, 4096))
                except OSError:  # the shell is gone (EIO) or kh hung up
                    return

    threading.Thread(target=relay, daemon=True).start()
    con = Console(path, name=f"host-{shell}")
    con.connect(5)
    try:
        yield boot.BootedNode(con, f"host-{shell}")
    finally:
        con.close()
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(master)
        srv.close()


def test_run_through_a_terminal(tty_node):
    shell_pid, status = tty_node.run("echo $$")
    assert status == 0 and shell_pid.strip().isdigit()
    assert tty_node.run("exit 7") == ("", 7)
    assert tty_node.run(boot.argv_command(["sh", "-c", "exit 7"])) == ("", 7)
    assert tty_node.run("cat") == ("", 0)
    assert tty_node.run(boot.argv_command(["printf", "%s|", "a  b", "$HOME", "it's"])) == \
        ("a  b|$HOME|it's|", 0)
    assert tty_node.run("echo $$") == (shell_pid, 0)  # still the same console shell


def test_long_command_through_a_terminal(tty_node):
    # Far past a canonical-mode tty's 4095 bytes and busybox's 1022-character line editor.
    args = ["x" * 5000, "it's\t%s\\", "ü" * 1000]
    out, status = tty_node.run(boot.argv_command(["printf", "%s\\n", *args]))
    assert (out, status) == ("".join(a + "\n" for a in args), 0)
    assert tty_node.run("echo after") == ("after\n", 0)


# --- kh boot's command line and its signals -----------------------------------------------

def kh_boot(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kh.cli.main", "boot", *args],
                          capture_output=True, text=True, timeout=60)


def test_sh_and_argv_together_refused_before_booting(tmp_path):
    r = kh_boot("--kernel", str(tmp_path / "absent"), "--sh", "exit 7", "--", "true")
    assert r.returncode == 2
    assert r.stderr == "kh: give either --sh 'CMD' or -- ARGV..., not both\n"


def test_argv_after_the_first_word_is_the_commands(tmp_path):
    # `kh boot uname -a` is `kh boot -- uname -a`: -a is uname's, not an unknown option of kh's
    # (the missing U-Boot is refused next, which shows the command line was taken).
    r = kh_boot("--bios", str(tmp_path / "absent"), "uname", "-a")
    assert r.returncode == 1 and "absent" in r.stderr, r.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signals_raise_once_then_handlers_come_back(signum):
    before = signal.getsignal(signum)
    unwound = []
    with pytest.raises(Stopped) as e, stop_on_signals():
        try:
            os.kill(os.getpid(), signum)  # the handler runs before kill returns to Python
        finally:
            os.kill(os.getpid(), signum)  # a second one while unwinding is ignored
            unwound.append(True)
    assert unwound == [True] and e.value.__context__ is None  # the second raised nothing
    assert e.value.exit_code == 128 + signum
    assert str(e.value) == f"stopped by {signal.Signals(signum).name}"
    assert signal.getsignal(signum) == before
