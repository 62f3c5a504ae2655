"""Issue 10: khd signalled stored PIDs after a restart without checking them (a recycled PID
could be killed). A node's QEMU is now known by (PID, start time, tag), checked before every
signal; these tests use real `sleep` children that carry a node tag as their argv[0]."""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kh.service import procid, qemunode
from kh.service.config import ServiceConfig
from kh.service.procid import ProcId

PREFIX = f"ku{os.getpid() % 10000}"  # this test run's own: other runs' processes never match


def tag(number: int, prefix: str = PREFIX) -> str:
    return f"{prefix}-node{number}"


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait()


def sleeper(started: list[subprocess.Popen[bytes]], name: str | None) -> subprocess.Popen[bytes]:
    """A real `sleep` child whose argv[0] is QEMU's -name argument for ``name`` (None: an
    untagged sleep), in a session of its own as khd starts QEMUs."""
    argv0 = f"{name},process={name}" if name else "sleep"
    p = subprocess.Popen([argv0, "60"], executable="sleep", start_new_session=True)
    started.append(p)
    while (Path(f"/proc/{p.pid}/cmdline").read_bytes().split(b"\0")[0] != argv0.encode()):
        time.sleep(0.005)  # exec shows the new command line a moment after fork
    return p


def alive(p: subprocess.Popen[bytes]) -> bool:
    """Not yet reaped: the signal, if one was sent, has been delivered by then."""
    try:
        p.wait(0.5)
    except subprocess.TimeoutExpired:
        return True
    return False


def test_parse_stat_counts_fields_after_the_last_parenthesis():
    text = "123 (a) b (c) d) S 1 123 123 0 -1 4194560 " + " ".join(["0"] * 12) + " 98765 rest"
    assert procid.parse_stat(text) == ("S", 98765)


def test_tags_in_takes_whole_node_tags_of_one_prefix():
    args = [b"qemu-system-ppc", b"-name", b"kh-node3,process=kh-node3", b"-m"]
    assert procid.tags_in(args, "kh") == ["kh-node3"]
    assert procid.tags_in(args, "k") == []  # another prefix
    assert procid.tags_in(args, "khx") == []
    assert procid.tags_in(args) == ["kh-node3"]
    assert procid.tags_in([b"kh-node3"], "kh") == []  # the tag as QEMU's -name carries it
    assert procid.tags_in([b"x,process=kh-node3,debug-threads=on"], "kh") == ["kh-node3"]


def test_identity_is_pid_start_time_and_tag(sleepers):
    p = sleeper(sleepers, tag(1))
    ident = procid.identify(p.pid, tag(1))
    assert ident is not None and ident.pid == p.pid
    assert ident.start == procid.parse_stat(Path(f"/proc/{p.pid}/stat").read_text())[1]
    assert procid.identify(p.pid, tag(2)) is None
    assert procid.mismatch(ident) is None


def test_a_process_whose_start_time_differs_is_never_signalled(sleepers, caplog):
    p = sleeper(sleepers, tag(1))
    ident = procid.identify(p.pid, tag(1))
    assert ident is not None
    other = ProcId(ident.pid, ident.start + 1, ident.tag)  # the PID's earlier owner
    with caplog.at_level(logging.WARNING, "kh.procid"):
        assert procid.stop([other], grace=0.2) == []
    assert alive(p)
    assert "not signalling" in caplog.text and "started at tick" in caplog.text
    assert procid.stop([ident], grace=2) == [ident]
    assert not alive(p)


def test_a_process_without_the_tag_is_never_signalled(sleepers):
    p = sleeper(sleepers, None)
    start = procid.parse_stat(Path(f"/proc/{p.pid}/stat").read_text())[1]
    assert procid.stop([ProcId(p.pid, start, tag(1))], grace=0.2) == []
    assert alive(p)


def test_the_recorded_start_time_decides_before_a_kill(sleepers, tmp_path, caplog):
    """khd's path after a restart: the state names node 4's PID; its run directory the start
    time recorded at spawn. Changed, the process is not killed; as recorded, it is."""
    cfg = ServiceConfig(state_dir=tmp_path / "state", images=tmp_path, prefix=PREFIX)
    cfg.node_dir(4).mkdir(parents=True)
    record = cfg.node_dir(4) / qemunode.IDENT_FILE
    p = sleeper(sleepers, qemunode.node_tag(cfg, 4))
    ident = procid.identify(p.pid, qemunode.node_tag(cfg, 4))
    assert ident is not None
    procid.save(record, ProcId(p.pid, ident.start - 7, ident.tag))
    with caplog.at_level(logging.WARNING, "kh.procid"):
        assert qemunode.recorded(cfg, 4, p.pid) is None
        assert qemunode.kill_recorded(cfg, 4, p.pid) is False
    assert alive(p)
    assert "not its process any more" in caplog.text
    procid.save(record, ProcId(p.pid + 1, ident.start, ident.tag))  # another PID recorded
    assert qemunode.kill_recorded(cfg, 4, p.pid) is False
    assert alive(p)
    procid.save(record, ident)
    assert qemunode.recorded(cfg, 4, p.pid) == ident
    assert qemunode.kill_recorded(cfg, 4, p.pid) is True
    assert not alive(p)
    assert qemunode.recorded(cfg, 4, p.pid) is None  # gone (reaped): nothing to signal


def test_a_zombie_is_gone(sleepers):
    p = sleeper(sleepers, tag(5))
    ident = procid.identify(p.pid, tag(5))
    assert ident is not None
    os.kill(p.pid, 9)
    while procid.stat(p.pid) is not None and procid.stat(p.pid)[0] != "Z":  # type: ignore
        time.sleep(0.005)
    assert procid.mismatch(ident) is not None and not procid.is_alive(ident)
    assert procid.identify(p.pid, tag(5)) is None


def test_tagged_finds_this_prefix_only(sleepers):
    mine = sleeper(sleepers, tag(7))
    sleeper(sleepers, tag(7, prefix=PREFIX + "x"))
    found = procid.tagged(PREFIX)
    assert [(i.pid, i.tag) for i in found] == [(mine.pid, tag(7))]


def test_the_record_is_written_whole(tmp_path):
    path = tmp_path / "qemu.id"
    assert procid.load(path) is None
    procid.save(path, ProcId(42, 1234, "kh-node1"))
    assert procid.load(path) == (42, 1234)
    assert [p.name for p in tmp_path.iterdir()] == ["qemu.id"]
    path.write_text("garbage")
    assert procid.load(path) is None
