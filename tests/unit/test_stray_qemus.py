"""Issue 10, item 5: no node QEMU outlives `kh clean`, nor a khd's shutdown unknown to it.

Seen in session 5: after integration tests' `control.clean` had returned, node QEMUs of their
khds (``kt8482-node2``, ``khc-node1``) were still running. The windows, each reproduced here
with real processes carrying a node tag (this run's own prefix) and no guest:

- `kh clean` looked for tagged processes with a check that compared the process state (R, S)
  of two reads, so a busy QEMU was passed over whenever its state changed in between;
- a khd killed while it had forked a QEMU that had not yet exec'd: the child carries khd's
  command line until its exec and the node tag only after, so a clean that waited for the khd
  it had seen, then looked once for tags, missed it;
- khd's shutdown sent SIGTERM to the QEMUs of starts under way and did not wait: one that
  ignored it (or whose start was held up) kept running after khd;
- a start that reached the U-Boot prompt while khd stopped became a node whose QEMU khd had
  just told to exit (and the start's console writer thread was never stopped).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kh.errors import KhTimeout
from kh.service import config, control, nodes, procid
from kh.service.config import ServiceConfig
from kh.service.nodes import NodeManager, RunningNode, StartAborted, StartFailed
from tests.unit.fakenode import wait_for

PREFIX = f"ks{os.getpid() % 10000}"  # this run's own: no other run's process ever matches


def tag(number: int) -> str:
    return f"{PREFIX}-node{number}"


def tagged_pids() -> list[int]:
    return [i.pid for i in procid.tagged(PREFIX)]


@pytest.fixture
def cfg(tmp_path: Path) -> Iterator[ServiceConfig]:
    c = ServiceConfig(state_dir=tmp_path / "state", images=tmp_path, nodes=2, prefix=PREFIX)
    yield c
    for i in procid.tagged(PREFIX):  # whatever a failing test left: never another run's
        procid.send(i, signal.SIGKILL)


def sleeper(name: str) -> subprocess.Popen[bytes]:
    """A real `sleep` whose argv[0] is QEMU's -name argument for ``name``, in a session of its
    own as khd starts QEMUs."""
    p = subprocess.Popen([f"{name},process={name}", "60"], executable="sleep",
                         start_new_session=True)
    assert wait_for(lambda: procid.identify(p.pid, name) is not None, 10)
    return p


def test_clean_stops_a_qemu_whose_state_changes_between_two_reads(cfg, monkeypatch):
    """A busy QEMU is R one moment and S the next; whether it is a node's is decided by its
    PID, start time and tag only."""
    p = sleeper(tag(1))
    real = procid.stat
    flips = [0]

    def stat(pid: int) -> tuple[str, int] | None:
        got = real(pid)
        if pid != p.pid or got is None or got[0] == "Z":
            return got
        flips[0] += 1
        return ("R" if flips[0] % 2 else "S", got[1])  # as a running TCG QEMU's main thread

    monkeypatch.setattr(procid, "stat", stat)
    try:
        done = control.clean(cfg)
        assert f"stopped node QEMU {p.pid}" in done
        assert p.wait(5) == -signal.SIGTERM
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()


# A stand-in khd: its command line is khd's for ``cfg`` (what khd_pids looks for). On SIGTERM
# it forks a child, as a pool thread of a khd does for a QEMU, and exits at once; the child
# stays between fork and exec (khd's command line, no tag) for a while, not ending on SIGTERM
# (in a real khd's child only Python's flag-setting handler is there), then execs a tagged
# QEMU stand-in.
FORKING_KHD = textwrap.dedent("""\
    import os, signal, sys, time
    def fork_qemu(*_):
        if os.fork() == 0:
            signal.signal(signal.SIGTERM, lambda *_: None)
            time.sleep(float(sys.argv[2]))
            os.execv("/bin/sleep", [sys.argv[1] + ",process=" + sys.argv[1], "60"])
        os._exit(0)
    signal.signal(signal.SIGTERM, fork_qemu)
    print("ready", flush=True)
    while True:
        time.sleep(1)
""")


def test_clean_stops_the_qemu_a_dying_khd_had_forked_but_not_yet_execd(cfg):
    khd = subprocess.Popen([sys.executable, "-c", FORKING_KHD, tag(2), "1.0", "-m",
                            "kh.service.daemon", "--foreground", *config.to_argv(cfg)],
                           start_new_session=True, stdout=subprocess.PIPE)
    try:
        assert khd.stdout is not None and khd.stdout.readline() == b"ready\n"
        assert khd.pid in control.khd_pids(cfg)
        done = control.clean(cfg)
        assert done[0] == f"stopped khd {khd.pid}"
        # the child, once a khd process itself, is now a QEMU and was stopped as one
        assert [d for d in done if d.startswith("stopped node QEMU ")], done
        assert not wait_for(lambda: bool(tagged_pids()), 2.0)  # none comes up later either
    finally:
        if khd.poll() is None:
            khd.kill()
        khd.communicate()


@pytest.fixture
def manager(cfg: ServiceConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
            ) -> Iterator[NodeManager]:
    """A NodeManager whose nodes' "QEMU" is a Python script that ignores SIGTERM (run
    directly: no fabric namespace, taps or cgroups, so nothing of the host is touched)."""
    qemu = tmp_path / "qemu-ignores-sigterm"
    qemu.write_text(f"#!{sys.executable}\nimport signal, sys, time\n"
                    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                    "print('ignoring SIGTERM', file=sys.stderr, flush=True)\ntime.sleep(600)\n")
    qemu.chmod(0o755)
    monkeypatch.setattr(nodes.nsutil, "enter_argv", lambda name: [])
    monkeypatch.setattr(nodes.cgroup, "detect", lambda: None)
    c = ServiceConfig(**{**vars(cfg), "qemu": str(qemu)})
    fabric: Any = type("NoFabric", (), {"ensure_tap": lambda *a: "tap",
                                        "attach": lambda *a: None})()
    yield NodeManager(c, fabric)


def start_in_thread(manager: NodeManager, number: int, **kw: Any
                    ) -> tuple[threading.Thread, list[object]]:
    """NodeManager.start in a thread of its own (as the pool runs it); what it returned or
    raised lands in the list."""
    result: list[object] = []

    def run() -> None:
        try:
            result.append(manager.start(number, **kw))
        except BaseException as e:
            result.append(e)

    t = threading.Thread(target=run, name=f"start{number}")
    t.start()
    return t, result


def test_khd_stopping_waits_for_starts_and_leaves_no_qemu(manager, monkeypatch):
    """A start held up (here in on_spawn, as by a busy store) whose QEMU does not end on
    SIGTERM: abort_starts returns only once that QEMU is gone."""
    monkeypatch.setattr(nodes, "ABORT_WAIT", 0.5, raising=False)
    spawned, release = threading.Event(), threading.Event()

    def held_up(pid: int) -> None:
        spawned.set()
        release.wait(30)

    t, result = start_in_thread(manager, 3, on_spawn=held_up)
    try:
        assert spawned.wait(10)
        assert wait_for(lambda: "ignoring SIGTERM" in nodes.read_log(
            manager.cfg.qemu_log(3)), 10)
        assert tagged_pids()
        manager.abort_starts()
        assert tagged_pids() == []  # not some time later: now
    finally:
        release.set()
        t.join(30)
    assert isinstance(result[0], StartAborted)
    assert 3 not in manager.running


class PromptConsole:
    """A console whose U-Boot prompt comes just as khd begins to stop."""

    def __init__(self, at_prompt: threading.Event, manager: NodeManager) -> None:
        self.at_prompt = at_prompt
        self.manager = manager

    def mark(self) -> int:
        return 0

    def expect(self, *args: Any, **kw: Any) -> None:
        self.at_prompt.set()
        wait_for(lambda: self.manager._closing, 10)  # abort_starts has begun: the prompt

    def close(self) -> None:
        pass


def test_a_start_that_reaches_the_prompt_as_khd_stops_is_ended(manager, monkeypatch):
    at_prompt = threading.Event()
    monkeypatch.setattr(nodes, "ABORT_WAIT", 10.0, raising=False)

    def attach(number: int, **kw: Any) -> tuple[Any, Any]:
        return PromptConsole(at_prompt, manager), type("NoMux", (), {"close": lambda s: None})()

    monkeypatch.setattr(manager, "_attach_console", attach)
    monkeypatch.setattr(manager, "_wait_qmp", lambda spec, popen: None)
    monkeypatch.setattr(RunningNode, "qmp", lambda self, spec, command, **a: None)
    monkeypatch.setattr(nodes.memload, "load_files", lambda pid, loads: None)  # no RAM file
    t, result = start_in_thread(manager, 4)
    try:
        assert at_prompt.wait(10)
        assert wait_for(lambda: "ignoring SIGTERM" in nodes.read_log(
            manager.cfg.qemu_log(4)), 10)
        manager.abort_starts()
    finally:
        t.join(30)
    # not a node whose QEMU khd had just ended (or, ignoring SIGTERM, kept unknown): aborted
    assert isinstance(result[0], StartAborted), result
    assert 4 not in manager.running
    assert tagged_pids() == []
    # its console writer's thread ends too (it is told to; it ends on its own time)
    assert wait_for(lambda: not [th for th in threading.enumerate() if th.name == "writer-4"],
                    10)


def test_no_start_after_khd_began_to_stop(manager):
    manager.abort_starts()
    with pytest.raises(StartAborted):
        manager.start(5)
    assert tagged_pids() == []
    assert not manager.cfg.qemu_log(5).exists()  # not even tried


def test_a_failed_start_leaves_no_console_writer_thread(manager, monkeypatch):
    """Each start that failed after its console was up (no QMP socket, no U-Boot prompt) left
    one thread behind in khd, waiting forever for input to a node that never was."""
    def attach(number: int, **kw: Any) -> tuple[Any, Any]:
        return PromptConsole(threading.Event(), manager), \
            type("NoMux", (), {"close": lambda s: None})()

    def no_qmp(spec: Any, popen: Any) -> None:
        raise KhTimeout(f"{spec.name}: no QMP socket within 10 s")

    monkeypatch.setattr(manager, "_attach_console", attach)
    monkeypatch.setattr(manager, "_wait_qmp", no_qmp)
    with pytest.raises(StartFailed, match="no QMP socket"):
        manager.start(6)
    assert tagged_pids() == []
    assert wait_for(lambda: not [th for th in threading.enumerate() if th.name == "writer-6"],
                    10)
