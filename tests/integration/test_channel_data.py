"""The channel's data path with a real node (issue 10, findings 5 and 6): an ssh session that
never reads loses only its own output, with a note, while another session and the node's log
get every byte; a khd restart leaves a gap line in the node's log.

A khd of its own with two nodes (``KH_TEST_PREFIX`` picks its name prefix)."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator

import paramiko
import pytest

from kh.service import control
from kh.service.config import ServiceConfig
from tests.integration.conftest import (
    allocate,
    credfile,
    kh,
    release,
    running_khd,
    wait_free,
)

pytestmark = pytest.mark.guest
NOTE = re.compile(rb"\r\n\[kh: (\d+) bytes of node (\d+)'s output dropped: "
                  rb"this session did not read\]\r\n")
MD_LINES = 0x18000  # `md.l 0 60000`: 96 Ki lines of about 67 bytes, 6.5 MB of output


@pytest.fixture(scope="module")
def khd(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
        kh_paths) -> Iterator[ServiceConfig]:  # type: ignore[no-untyped-def]
    prefix = os.environ.get("KH_TEST_PREFIX") or f"kd{os.getpid() % 10000}"
    with running_khd(request, tmp_path_factory.mktemp("khd") / "state", kh_paths,
                     keep_as="khd-logs-channel-data", nodes=2, prefix=prefix) as cfg:
        yield cfg


class Session:
    """A raw channel session over a connection of its own (paramiko)."""

    def __init__(self, cfg: ServiceConfig, alloc: int, cred: str) -> None:
        self.client = paramiko.SSHClient()
        self.client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        self.client.connect("127.0.0.1", port=cfg.ssh_port, username=f"con{alloc}",
                            password=cred, look_for_keys=False, allow_agent=False, timeout=30)
        transport = self.client.get_transport()
        assert transport is not None
        self.chan = transport.open_session()
        self.chan.exec_command("raw")
        self.data = bytearray()
        self.lock = threading.Lock()
        self._reader: threading.Thread | None = None

    def start_reading(self) -> None:
        def read() -> None:
            while True:
                chunk = self.chan.recv(65536)
                if not chunk:
                    return
                with self.lock:
                    self.data += chunk

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()

    def text(self) -> bytes:
        with self.lock:
            return bytes(self.data)

    def wait_for(self, rx: bytes, timeout: float = 120, after: int = 0) -> re.Match[bytes]:
        deadline = time.monotonic() + timeout
        while True:
            m = re.compile(rx).search(self.text(), after)
            if m:
                return m
            assert time.monotonic() < deadline, (rx, self.text()[-500:])
            time.sleep(0.1)

    def settle(self, quiet: float = 1.0, timeout: float = 60) -> None:
        """Wait until nothing more arrives for ``quiet`` seconds."""
        deadline = time.monotonic() + timeout
        size = -1
        while size != len(self.text()):
            assert time.monotonic() < deadline
            size = len(self.text())
            time.sleep(quiet)

    def close(self) -> None:
        self.client.close()


def md_addresses(stream: bytes) -> list[int]:
    return [int(a, 16) for a in re.findall(rb"^([0-9a-f]{8}): ", stream, re.MULTILINE)]


def test_a_session_that_never_reads_loses_only_its_own_output(khd):
    wait_free(khd, 1)
    alloc, (node,), _ = allocate(khd, "-c", credfile("dcred"), "dora")
    reader = stalled = None
    try:
        reader = Session(khd, alloc, "dcred")
        reader.start_reading()
        reader.chan.sendall(b"echo reader-here\n")
        reader.wait_for(rb"\nreader-here\r?\n")
        stalled = Session(khd, alloc, "dcred")  # never reads until the node is done
        stalled.chan.sendall(b"echo stalled-here\n")  # its session listens before this runs
        start = reader.wait_for(rb"\nstalled-here\r?\n").end()
        reader.chan.sendall(b"md.l 0 %x\n" % (MD_LINES * 4))
        end = reader.wait_for(rb"\n%08x: [^\n]*\n=> " % ((MD_LINES - 1) * 16), 600, start)
        reader.chan.sendall(b"echo node-done\n")
        reader.wait_for(rb"\nnode-done\r?\n", after=end.end())
        # Every line reached the reading session and the log while the other did not read.
        assert md_addresses(reader.text()) == [16 * i for i in range(MD_LINES)]
        r = kh(khd, "logs", str(node))
        assert r.returncode == 0
        assert "node-done" in r.stdout and f"{(MD_LINES - 1) * 16:08x}: " in r.stdout
        # The stalled session reads at last: what it got, a note of what it lost, and what
        # the node says from now on.
        stalled.start_reading()
        stalled.wait_for(rb"\nnode-done\r?\n|" + NOTE.pattern + rb"$")
        stalled.settle()  # it has read all it held
        reader.chan.sendall(b"echo after-reading\n")
        stalled.wait_for(rb"\nafter-reading\r?\n=> ")
        reader.wait_for(rb"\nafter-reading\r?\n=> ")
        # Its stream is the other's, from where it began listening, with stretches cut out
        # (it read a little between losses as ssh's window opened), each in a note's place.
        got, full = stalled.text(), reader.text()
        pos = full.find(got[:200])
        assert pos >= 0
        lost = last = 0
        for m in NOTE.finditer(got):
            piece = got[last:m.start()]
            assert full[pos:pos + len(piece)] == piece, (pos, piece[:100])
            assert int(m.group(2)) == node
            pos += len(piece) + int(m.group(1))
            lost += int(m.group(1))
            last = m.end()
        assert full[pos:] == got[last:]
        assert lost > 1 << 20  # it could not have held all of it
    finally:
        for s in (reader, stalled):
            if s is not None:
                s.close()
        release(khd, "dora", "dcred", alloc)


def test_a_khd_restart_leaves_a_gap_line_in_the_log(khd):
    wait_free(khd, 1)
    alloc, (node,), _ = allocate(khd, "-c", credfile("gcred"), "gil")
    try:
        control.stop(khd)
        control.start(khd)
        log = (khd.logs / f"node{node}.log").read_text()
        m = re.search(r"\[kh: console not read from (\S+) to (\S+) \(khd was not running\); "
                      r"output in that time may be lost\]", log)
        assert m, log[-500:]
        assert m.group(1) <= m.group(2)  # ISO times in UTC compare as text
    finally:
        release(khd, "gil", "gcred", alloc)
