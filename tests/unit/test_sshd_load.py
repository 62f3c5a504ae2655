"""`load ADDR` streams into the nodes' memory as the bytes arrive (kh.cc.commands): pieces at
increasing offsets, at most one piece held, the size and CRC-32 per node at the end."""

from __future__ import annotations

import random
import tracemalloc
import zlib
from collections.abc import Iterator

import paramiko
import pytest

from kh.cc.commands import PIECE, parse_addr, stream
from kh.cc.conns import Session
from kh.hw import memload
from kh.service.access import RamFile
from tests.unit.sshd_fakes import FakeAccess, FakeRam, Running, connect, serve, wait_until

MIB = 1 << 20


def chunks(total: int, seed: int) -> Iterator[bytes]:
    """``total`` pseudo-random bytes in pieces of uneven size, made as they are asked for."""
    rnd = random.Random(seed)
    sent = 0
    while sent < total:
        n = min(total - sent, rnd.randrange(1, 300_000))
        yield rnd.randbytes(n)
        sent += n


class StreamChan:
    """The part of a paramiko Channel stream uses: recv(n) from a generator."""

    def __init__(self, source: Iterator[bytes]) -> None:
        self.source = source
        self.rest = b""
        self.asked: list[int] = []

    def recv(self, n: int) -> bytes:
        self.asked.append(n)
        if not self.rest:
            self.rest = next(self.source, b"")
        out, self.rest = self.rest[:n], self.rest[n:]
        return out

    def sendall_stderr(self, data: bytes) -> None:
        raise AssertionError(data)


def test_a_load_is_written_piece_by_piece_with_bounded_memory():
    """Finding 3: a load was held whole in khd's memory (up to 256 MiB per session)."""
    total, addr = 64 * MIB + 12345, 0x1001
    rams = {1: FakeRam(addr + total), 2: FakeRam(addr + total)}
    chan = StreamChan(chunks(total, seed=1))
    s = Session(chan, frozenset({1, 2}))  # type: ignore[arg-type]
    tracemalloc.start()
    try:
        size, crc = stream(chan, s, addr, addr + total, dict(rams), {})  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * PIECE  # a piece, its copy, and one chunk of the stream
    want = b"".join(chunks(total, seed=1))
    assert (size, crc) == (total, zlib.crc32(want))
    for ram in rams.values():
        assert ram.mem[addr:] == want and not any(ram.mem[:addr])
        offsets = [o for o, _ in ram.writes]
        assert offsets[0] == addr and offsets == sorted(offsets)
        assert all(o + n == nxt for (o, n), nxt in zip(ram.writes[:-1], offsets[1:], strict=True))
        assert max(n for _, n in ram.writes) <= PIECE
    assert max(chan.asked) <= PIECE


@pytest.fixture
def srv() -> Iterator[Running]:
    access = FakeAccess(limit=16 * MIB)
    access.add("alice", "apw", 1, [1, 2, 3])
    access.rams = {1: FakeRam(32 * MIB), 2: FakeRam(32 * MIB)}  # node 3 is not running
    with serve(access) as running:
        yield running


def load(c: paramiko.SSHClient, command: str, data: Iterator[bytes]
         ) -> tuple[int, bytes, bytes]:
    t = c.get_transport()
    assert t is not None
    ch = t.open_session()
    ch.exec_command(command)
    for piece in data:
        ch.sendall(piece)
    ch.shutdown_write()
    out, err = ch.makefile().read(), ch.makefile_stderr().read()
    return ch.recv_exit_status(), out, err


def test_load_answers_per_node_and_streams_through_ssh(srv):
    c = connect(srv.port, "con1", "apw")
    try:
        total = 12 * MIB + 7
        tracemalloc.start()
        try:
            status, out, err = load(c, "load 0x10000", chunks(total, seed=2))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        want = b"".join(chunks(total, seed=2))
        crc = zlib.crc32(want)
        assert out.decode().splitlines() == [
            f"node 1: {total} bytes at 0x00010000 crc32 {crc:08x}",
            f"node 2: {total} bytes at 0x00010000 crc32 {crc:08x}",
            "node 3: load failed: the node is not running"]
        assert status == 1 and err == b""
        for n in (1, 2):
            ram = srv.access.rams[n]
            assert ram.mem[0x10000:0x10000 + total] == want and ram.closed
        # client and server together, in this process: far below the 12 MiB load
        assert peak < 8 * MIB
    finally:
        c.close()


def test_load_refusals(srv):
    c = connect(srv.port, "con1.1", "apw")
    try:
        status, out, err = load(c, "load 0x1000000", iter([b"x" * 10]))
        assert status == 2 and out == b"" and b"beyond the nodes' free memory" in err
        assert not any(srv.access.rams[1].mem)  # refused before a byte was read
        status, out, err = load(c, "load 0xf00000", chunks(2 * MIB, seed=3))  # crosses 16 MiB
        assert status == 2 and b"the first 1048576 bytes were written" in err
        assert srv.access.rams[1].writes == [(0xF00000, MIB)]
        status, out, err = load(c, "load xyz", iter([]))
        assert status == 2 and b"hex address" in err
        status, out, _ = load(c, "load 0x2000", iter([]))  # an empty load, on node 1 alone
        assert status == 0 and out == f"node 1: 0 bytes at 0x00002000 crc32 {0:08x}\n".encode()
    finally:
        c.close()


def test_a_release_during_a_load_ends_it_and_writes_no_more(srv):
    c = connect(srv.port, "con1", "apw")
    try:
        t = c.get_transport()
        assert t is not None
        ch = t.open_session()
        ch.exec_command("load 0x0")
        ch.sendall(b"a" * (3 * MIB))
        wait_until(lambda: len(srv.access.rams[1].writes) == 3)
        srv.access.allocs[1].released = True
        wait_until(ch.exit_status_ready)
        assert ch.recv_exit_status() == 1
        assert ch.makefile_stderr().read() == \
            b"kh: allocation 1 was released; this session ends\n"
        assert ch.makefile().read() == b""  # no per-node answer
        try:
            ch.sendall(b"b" * MIB)
        except (OSError, EOFError, paramiko.SSHException):
            pass
        assert b"b" not in srv.access.rams[1].mem
    finally:
        c.close()


def test_ram_file_writes_at_offsets_and_refuses_outside(tmp_path):
    path = tmp_path / "ram"
    path.write_bytes(b"\xaa" * MIB)
    ram = RamFile(path)
    try:
        ram.write(0x12345, b"abc")
        ram.write(MIB - 2, b"yz")
        with pytest.raises(memload.LoadError, match="outside"):
            ram.write(MIB - 1, b"12")
    finally:
        ram.close()
    data = path.read_bytes()
    assert data[0x12345:0x12348] == b"abc" and data[-2:] == b"yz" and len(data) == MIB
    assert data.count(b"\xaa") == MIB - 5
    with pytest.raises(memload.LoadError, match="cannot open"):
        RamFile(tmp_path / "missing")


def test_ram_opened_once_stays_with_its_file(tmp_path):
    """The open RAM stays bound to what was opened: a new file under the same name (a fresh
    QEMU under the node's number) gets nothing."""
    path = tmp_path / "ram"
    path.write_bytes(bytes(4096))
    ram = RamFile(path)
    path.unlink()
    path.write_bytes(bytes(4096))
    ram.write(0, b"old")
    ram.close()
    assert path.read_bytes() == bytes(4096)


@pytest.mark.parametrize("text,want", [
    ("0x10000", 0x10000), ("10000", 0x10000), ("0XfF", 0xFF), ("ffffffffffffffff", 2**64 - 1),
    ("0x\u0661", None), ("\u0661", None), ("-1", None), ("0x-1", None), ("+1", None),
    ("0x_1", None), ("1_0", None), ("0x", None), ("", None), (" 1", None), ("1\n", None),
    ("0x" + "1" * 17, None), ("\uff11", None),
])
def test_load_addresses_are_ascii_hex_only(text, want):
    """Issue 10: int(x, 16) took `٠x١` (Arabic-Indic digits) as 1 and `-1` as -1."""
    assert parse_addr(text) == want


def test_load_refuses_a_non_ascii_or_signed_address_with_status_2(srv):
    c = connect(srv.port, "con1.1", "apw")
    try:
        for addr in ("0x\u0661", "-1", "0x-1"):
            status, out, err = load(c, f"load {addr}", iter([b"x"]))
            assert status == 2 and out == b"", (addr, err)
            assert err.startswith(b"kh: load takes a hex address") and err.count(b"\n") == 1
            assert b"beyond" not in err
        assert not srv.access.rams[1].writes
    finally:
        c.close()
