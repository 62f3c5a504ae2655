"""What a ``con<ID>`` session of the control channel runs, once kh.cc.sshd has started it.

``raw`` (or no command) and ``tagged`` broadcast the client's input to the nodes' consoles and
show their output; ``send`` only delivers input; ``load ADDR`` streams bytes into the nodes'
memory; ``nodes`` lists the live ones. Each asks kh.service.access.ChannelAccess what the
grant reaches; docs/control-channel.md says what each command does.
"""

from __future__ import annotations

import re
import time
import zlib

import paramiko

from kh.cc.channel import Output
from kh.cc.conns import Session
from kh.errors import KhError
from kh.service.access import ChannelAccess, Grant, Ram, Reach, Revoked

# `load ADDR`: ASCII hex only (int() would also take "-1", "0x_1" and other scripts' digits)
ADDR_RE = re.compile(r"(?:0[xX])?[0-9a-fA-F]{1,16}", re.ASCII)
QUIET = 1.0  # after the client's EOF, wait for this much silence before closing
MAX_DRAIN = 30.0
PIECE = 1 << 20  # bytes of a load written to the nodes at a time: its memory in khd


def run(access: ChannelAccess, chan: paramiko.Channel, s: Session, grant: Grant,
        command: str) -> int:
    """A ``con<ID>`` session's ``command`` on ``chan`` → its exit status (2: a command or
    argument kh does not know, said on stderr). ``s.nodes`` becomes what the grant reaches now.
    Raises Revoked when the grant stops holding."""
    reach = access.reach(grant)
    s.nodes = frozenset(reach.members)
    words = re.split(r"[ \t]+", command)  # ASCII blanks only, as ADDR_RE's digits
    if command in ("", "raw"):
        return broadcast(chan, grant, reach, tagged=False)
    if command == "tagged":
        return broadcast(chan, grant, reach, tagged=True)
    if command == "send":
        return send(chan, grant, reach)
    if words and words[0] == "load" and len(words) == 2:
        return load(access, chan, s, grant, reach, words[1])
    if command == "nodes":
        chan.sendall(" ".join(map(str, reach.live)).encode() + b"\n")
        return 0
    chan.sendall_stderr(f"kh: unknown channel command {command[:80]!r} (try: raw, "
                        "tagged, send, load ADDR, nodes)\n".encode())
    return 2


def broadcast(chan: paramiko.Channel, grant: Grant, reach: Reach, *, tagged: bool) -> int:
    """``raw``/``tagged``: the client's input to the nodes the grant reaches, their output
    (with each line's node, ``tagged``) to the client, until its EOF and then QUIET seconds of
    silence (MAX_DRAIN at most) → 0."""
    hub = reach.hub
    consoles = reach.consoles
    nodes = None if grant.node is None else [grant.node]

    def sink(data: bytes) -> None:
        try:
            chan.sendall(data)
        except (OSError, EOFError, paramiko.SSHException):
            pass

    out = Output(consoles, sink, tagged=tagged)
    try:
        while True:
            data = chan.recv(65536)
            if not data:
                break
            hub.write(data, nodes)
        # The client sent EOF (a script's stdin ended): show the nodes' answers until
        # they have been quiet for a while.
        for n, w in hub.writers.items():
            if nodes is None or n in nodes:
                w.drain(MAX_DRAIN)
        deadline = time.monotonic() + MAX_DRAIN
        while out.quiet_for() < QUIET and time.monotonic() < deadline and not chan.closed:
            time.sleep(0.05)
        return 0
    finally:
        out.close()


def send(chan: paramiko.Channel, grant: Grant, reach: Reach) -> int:
    """``send``: like ``raw`` for input, but no output, and it ends as soon as every byte
    has reached every node's console (khdo write: booting nodes are never quiet, and 64
    of them kept a raw session open 12 s). Status 1, naming each node, when a node did
    not take its bytes within MAX_DRAIN seconds."""
    hub = reach.hub
    nodes = None if grant.node is None else [grant.node]
    while True:
        data = chan.recv(65536)
        if not data:
            break
        hub.write(data, nodes)
    deadline = time.monotonic() + MAX_DRAIN
    late = [n for n, w in hub.writers.items() if (nodes is None or n in nodes) and
            not w.drain(max(0.0, deadline - time.monotonic()))]
    for n in late:
        chan.sendall_stderr(f"kh: node {n} did not take its input within "
                            f"{MAX_DRAIN:g} s\n".encode())
    return 1 if late else 0


def load(access: ChannelAccess, chan: paramiko.Channel, s: Session, grant: Grant,
         reach: Reach, addr_text: str) -> int:
    """``load ADDR``: the stream goes to every node's memory piece by piece as it arrives
    (at most PIECE bytes held), then one line per node with the size and CRC-32."""
    addr = parse_addr(addr_text)
    if addr is None:
        chan.sendall_stderr(f"kh: load takes a hex address, e.g. load 0x8000000, not "
                            f"{addr_text[:40]!r}\n".encode("utf-8", "backslashreplace"))
        return 2
    limit = access.mem_limit()
    if not 0 <= addr < limit:
        chan.sendall_stderr(f"kh: 0x{addr:x} is beyond the nodes' free memory (a load must "
                            f"end below 0x{limit:x})\n".encode())
        return 2
    for n in reach.members:  # what was typed before the load reaches the node first
        w = reach.hub.writers.get(n)
        if w is not None:
            w.drain(60)
    rams: dict[int, Ram] = {}
    failed: dict[int, str] = {}
    try:
        for n in reach.members:
            try:
                rams[n] = access.open_ram(grant, n)
            except Revoked:
                raise
            except KhError as e:
                failed[n] = str(e)
        size, crc = stream(chan, s, addr, limit, rams, failed)
    finally:
        for ram in rams.values():
            ram.close()
    if size < 0:
        return 2
    if s.ended is not None:
        return 1
    for n in reach.members:
        if n in failed:
            chan.sendall(f"node {n}: load failed: {failed[n]}\n".encode())
        else:
            chan.sendall(f"node {n}: {size} bytes at 0x{addr:08x} crc32 {crc:08x}\n"
                         .encode())
    return 1 if failed else 0


def stream(chan: paramiko.Channel, s: Session, addr: int, limit: int,
           rams: dict[int, Ram], failed: dict[int, str]) -> tuple[int, int]:
    """Copy the channel's bytes into ``rams`` until EOF → (size, crc32); a node whose
    write fails moves to ``failed``. (-1, 0) when the stream crossed ``limit`` (said on
    stderr; what came before it was written)."""
    size = crc = 0
    buf = bytearray()
    while s.ended is None:
        data = chan.recv(PIECE - len(buf))
        buf += data
        if data and len(buf) < PIECE:
            continue
        if buf:
            if addr + size + len(buf) > limit:
                chan.sendall_stderr(
                    f"kh: 0x{addr:x}+{size + len(buf)}... is beyond the nodes' free memory "
                    f"(a load must end below 0x{limit:x}); the first {size} bytes were "
                    "written\n".encode())
                return -1, 0
            piece = bytes(buf)
            buf.clear()
            crc = zlib.crc32(piece, crc)
            for n, ram in list(rams.items()):
                try:
                    ram.write(addr + size, piece)
                except KhError as e:
                    failed[n] = str(e)
                    rams.pop(n).close()
            size += len(piece)
        if not data:
            break
    return size, crc & 0xFFFFFFFF



def parse_addr(text: str) -> int | None:
    """A channel command's address: 1 to 16 ASCII hex digits, optionally after 0x; None for
    anything else (a sign, an underscore, another script's digits)."""
    return int(text, 16) if ADDR_RE.fullmatch(text) else None


