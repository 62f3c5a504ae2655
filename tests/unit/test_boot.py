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
from kh.hw import framing, nodeshell
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
    assert framing.argv_command(argv) == line


def test_empty_argv_refused():
    with pytest.raises(UsageError, match="no command"):
        framing.argv_command([])


def host_shell(shell: str, command: str, tok: str = TOK) -> tuple[str, int, str]:
    """Type ``command``'s lines into a host shell reading its stdin, as the node's does; a
    line typed after them shows they were not swallowed. Returns output, status, the rest."""
    lines = framing.typed_lines(command, tok)
    r = subprocess.run([shell], input="\n".join(lines).encode() + b"\necho typed-after\n",
                       capture_output=True, timeout=30,
                       env={"PATH": os.environ["PATH"], "HOME": "/home-of-the-shell"})
    out = r.stdout.decode("utf-8", "surrogateescape")
    m = re.search(rf"(?s){tok}_B\n(.*){tok}_E(\d+)\n(.*)", out)
    assert m, (out, r.stderr)
    return m.group(1), int(m.group(2)), m.group(3)


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("args", [ODD_ARGS, ["x" * 3000 + "'\n%\\" * 300, "y"], []],
                         ids=["odd", "long", "none"])
def test_argv_arrives_exactly(shell, args):
    out, status, rest = host_shell(shell, framing.argv_command([*SHOW_ARGV, *args]))
    assert (json.loads(out), status, rest) == (args, 0, "typed-after\n")


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("argv,status", [
    (["exit", "7"], 7), (["sh", "-c", "exit 7"], 7), (["exit 7"], 127), (["false"], 1),
    (["sh", "-c", "kill -9 $$"], 137), (["cat"], 0),  # cat reads /dev/null, not the next line
])
def test_argv_status_comes_back(shell, argv, status):
    assert host_shell(shell, framing.argv_command(argv)) == ("", status, "typed-after\n")


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
    for command in (framing.argv_command(["echo", *ODD_ARGS]), "\t" * 5000, "é" * 4000):
        lines = framing.typed_lines(command, TOK)
        assert len(lines) > 1 or len(command) < framing.LINE_MAX
        for line in lines:
            assert len(line) + 1 <= framing.LINE_MAX
            assert all(0x20 <= ord(c) < 0x7F for c in line), line


def test_nul_refused():
    with pytest.raises(UsageError, match="NUL"):
        framing.typed_lines("echo a\0b", TOK)


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
        yield nodeshell.BootedNode(con, f"host-{shell}")
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
    assert tty_node.run(framing.argv_command(["sh", "-c", "exit 7"])) == ("", 7)
    assert tty_node.run("cat") == ("", 0)
    assert tty_node.run(framing.argv_command(["printf", "%s|", "a  b", "$HOME", "it's"])) == \
        ("a  b|$HOME|it's|", 0)
    assert tty_node.run("echo $$") == (shell_pid, 0)  # still the same console shell


def test_long_command_through_a_terminal(tty_node):
    # Far past a canonical-mode tty's 4095 bytes and busybox's 1022-character line editor.
    args = ["x" * 5000, "it's\t%s\\", "ü" * 1000]
    out, status = tty_node.run(framing.argv_command(["printf", "%s\\n", *args]))
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


# --- a command's output as it comes, and the node leaving Linux under it -------------------

def test_output_is_handed_on_while_the_command_runs(tty_node, tmp_path):
    # The command goes on only once kh has handed "started" on: output held to the end would
    # leave it waiting until the timeout.
    flag = tmp_path / "seen"
    parts: list[bytes] = []

    def output(data: bytes) -> None:
        parts.append(data)
        if b"started\n" in b"".join(parts):  # the line whole, newline included, at once
            flag.touch()

    command = f"echo started; while [ ! -e {flag} ]; do sleep 0.05; done; echo done"
    assert tty_node.run_streaming(command, output, timeout=60) == 0
    assert b"".join(parts) == b"started\ndone\n"


END = TOK.encode() + b"_E0\r\n"


@pytest.mark.parametrize("out", [b"abc\r\n", b"abc", b"\r\n\r\n", b"", b"x\r\nKH0123\r\n",
                                 b"reboot: Power down is a phrase\r\nU-Boot 2 lines\r\n"])
def test_no_part_of_the_end_marker_is_ever_handed_on(out):
    text = out + END
    for n in range(len(text)):  # the whole marker is the end, found before anything is cut
        cut = framing.held_back(text[:n], TOK)
        assert out.startswith(text[:cut]), (n, text[:cut])
    assert framing.held_back(out + b"more", TOK) == len(out) + 4  # only a marker's start waits


def test_a_finished_line_is_handed_on_whole():
    """A line's newline never waits for the command's next byte (readers go by lines)."""
    assert framing.held_back(b"one\r\n", TOK) == len(b"one\r\n")
    assert framing.held_back(b"one\r\n" + TOK.encode()[:5], TOK) == len(b"one\r\n")


def test_a_line_end_cut_between_its_cr_and_lf_is_not_handed_on_half():
    """The console's \r\n may arrive in two reads: the \r waits for its \n, so the output
    (\r\n made \n per piece) never carries a stray \r (a sha256sum line once failed to
    match the intranet's ^...$ check that way)."""
    assert framing.held_back(b"one\r", TOK) == len(b"one")
    text = b"a f1\r\nb f2\r\n" + END
    for n in range(len(text)):
        cut = framing.held_back(text[:n], TOK)
        rest = text[cut:]
        got = text[:cut].replace(b"\r\n", b"\n") + rest[:rest.index(END)].replace(b"\r\n", b"\n")
        assert got == b"a f1\nb f2\n", (n, got)


@pytest.mark.parametrize("tail,cut", [
    (b"reboot: Resta", 4), (b"System Halted, OK", 4), (b"Kernel panic - not syncing: x", 4),
    (b"U-Boot 2023.01 (Jan", 4), (b"U", 4), (b"rebuilt", 11), (b"Kernel", 4), (b"half", 8),
])
def test_an_unfinished_kernel_line_is_not_output(tail, cut):
    assert framing.held_back(b"ok\r\n" + tail, TOK) == cut


@pytest.mark.parametrize("line,message", [
    ("reboot: Power down", "the node powered off while running the command"),
    ("reboot: System halted", "the node halted (powered off) while running the command"),
    ("System Halted, OK to turn off power", "the node halted (powered off) while running"),
    ("reboot: Restarting system", "the node rebooted while running the command"),
    ("Kernel panic - not syncing: Attempted to kill init!",
     "the kernel panicked while running the command: Kernel panic - not syncing: Attempted"),
    ("U-Boot 2023.01 (Nov 14 2023 - 22:13:20 +0000)",
     "the node restarted into U-Boot while running the command"),
])
def test_the_node_leaving_linux_ends_the_command(tty_node, line, message):
    # The node's shell stands in for its kernel: the line arrives, the command never ends.
    parts: list[bytes] = []
    with pytest.raises(nodeshell.NodeLeft, match=re.escape(message)) as e:
        tty_node.run_streaming(f"echo before; printf '%s\\n' '{line}'; sleep 600", parts.append,
                               timeout=60)
    assert e.value.exit_code == 125
    assert b"".join(parts) == b"before\n"  # the kernel's line is not the command's output


def test_the_console_closing_ends_the_command(tty_node):
    # $$ in the subshell is the console's shell itself: the "node" goes away under the command.
    with pytest.raises(nodeshell.NodeLeft, match="the node stopped while running the command: "
                                            "its console closed"):
        tty_node.run("kill -9 $$; sleep 600", timeout=60)


# --- QEMU's own reason, the console log, the appliance -------------------------------------

FAKE_QEMU = """#!{python}
import socket, sys
path = next(a for a in sys.argv if a.startswith("socket,")).split("path=")[1].split(",")[0]
srv = socket.socket(socket.AF_UNIX)
srv.bind(path)
srv.listen(1)
conn, _ = srv.accept()  # QEMU waits for its console, then sets up the machine
print("qemu-system-ppc: -machine x: warning: an old warning", file=sys.stderr)
print("qemu-system-ppc: cannot set up guest memory 'mpc8544ds.ram': Cannot allocate memory",
      file=sys.stderr)
print("qemu-system-ppc: warning: a later warning", file=sys.stderr)
print("qemu-system-ppc: -chardev socket: info: QEMU waiting for connection", file=sys.stderr)
sys.exit(1)
"""


def test_a_qemu_that_exits_says_why(tmp_path):
    from kh.errors import BootError
    from kh.hw import board, qemu, uboot
    fake = tmp_path / "fake-qemu"
    fake.write_text(FAKE_QEMU.format(python=sys.executable))
    fake.chmod(0o755)
    spec = board.NodeSpec(name="kh-boot", bios=tmp_path / "u-boot.elf",
                          console=tmp_path / "console.sock", qemu=str(fake))
    log = tmp_path / "console.log"
    with pytest.raises(BootError) as e, \
            qemu.running(spec, console_log=log, workdir=tmp_path) as node:
        node.console.expect(uboot.UBOOT_PROMPT, 60, stage="U-Boot prompt")
    assert str(e.value) == (
        "kh-boot: console closed while waiting for U-Boot prompt: QEMU exited with status 1: "
        "qemu-system-ppc: cannot set up guest memory 'mpc8544ds.ram': Cannot allocate memory "
        f"(console log: {log})")


def test_each_run_has_its_own_console_log_and_old_ones_go(tmp_path):
    from kh.settings import Paths
    p = Paths(repo=tmp_path, cache=tmp_path / "cache", out=tmp_path, runtime=tmp_path)
    logs = [boot.default_console_log(p, keep=3) for _ in range(5)]
    assert len(set(logs)) == 5
    for i, log in enumerate(logs):
        log.write_text(f"run {i}\n")
        os.utime(log, (i, i))
    logs[0].with_name(logs[0].name + ".1").write_text("rotated part of run 0\n")
    newest = boot.default_console_log(p, keep=3)
    left = sorted((p.cache / "logs" / "kh-boot").iterdir())
    assert left == sorted([logs[3], logs[4], newest])


def test_an_unknown_appliance_names_the_known_ones():
    from kh.settings import paths
    with pytest.raises(UsageError) as e:
        boot.default_config(paths(), appliance="nosuch")
    assert e.value.message == "no appliance named 'nosuch'"
    assert e.value.hint is not None and e.value.hint.startswith("known appliances: ")
    assert "shell" in e.value.hint.split(": ")[1].split(", ")
    r = kh_boot("--appliance", "nosuch", "--", "true")
    assert r.returncode == 2 and r.stderr == f"kh: {e.value}\n"
