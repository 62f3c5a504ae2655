"""kh.proc.spawn: a child that must not outlive kh, even a SIGKILLed kh."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# A stand-in for `kh boot`: spawns `sleep` the way kh spawns QEMU, says its PID, waits.
PARENT = """
import sys
from kh import proc
with proc.spawn(["sleep", "600"], die_with_parent=sys.argv[1] == "1") as p:
    print(p.pid, flush=True)
    sys.stdin.read()
"""


def state(pid: int) -> str:
    """The process's state letter, or "" once it is gone (a dead orphan may stay a zombie
    here: this machine's PID 1 does not reap)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        # The process can be reaped between opening its stat file and reading it.
        return ""


@pytest.mark.parametrize("die_with_parent", [True, False])
def test_child_dies_with_a_sigkilled_parent_only_when_asked(die_with_parent):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, "1" if die_with_parent else "0"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert state(child) in ("S", "R")
        parent.kill()
        parent.wait()
        # The kernel signals the child as the parent exits; a child that was not asked to die
        # is given a while to show it does not.
        deadline = time.monotonic() + (30 if die_with_parent else 2)
        while state(child) not in ("", "Z", "X") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (state(child) in ("", "Z", "X")) == die_with_parent
    finally:
        parent.kill()
        parent.wait()
        if child and state(child) not in ("", "Z", "X"):
            os.kill(child, signal.SIGKILL)
