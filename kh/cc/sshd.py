"""The control channel's ssh server (paramiko), run by khd.

User ``con<ID>`` is allocation ID; ``con<ID>.<N>`` is node N of it alone. Authentication: the
owning principal's credential as password, or a public key the principal registered (for
itself, or for this allocation only: that is how a channel is handed to another party).
User ``api+PRINCIPAL`` (a token of PRINCIPAL's, or its credential, as password) asks the
service's API instead: in-node tools send their secrets this way, to the host key their node
pinned, never in clear (kh.service.chanapi lists the commands).
The server holds no rights of its own: a login is a Grant, and every use of it (a channel
opened, a command started, a node's memory written, the watcher's look twice a second) asks
kh.service.access.ChannelAccess whether it still holds and what it reaches now. Connections
and logins are bounded by kh.cc.gate. What a session may ask for is in
docs/control-channel.md.
"""

from __future__ import annotations

import base64
import logging
import re
import socket
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import paramiko
from paramiko.packet import Packetizer

from kh.admission import USER_RE as PRINCIPAL_RE
from kh.cc.channel import Output
from kh.cc.gate import Conn, Gate, Session, end_session
from kh.cc.limits import Limits
from kh.errors import KhError, UsageError
from kh.service.access import ChannelAccess, Grant, Ram, Reach, Revoked

log = logging.getLogger("kh.sshd")
# One spelling per channel: ids and node numbers start at 1 and have no leading zero (con016
# is nobody, not another name for con16).
NUMBER = r"[1-9][0-9]{0,8}"
USER_RE = re.compile(rf"con({NUMBER})(?:\.({NUMBER}))?", re.ASCII)
# `load ADDR`: ASCII hex only (int() would also take "-1", "0x_1" and other scripts' digits)
ADDR_RE = re.compile(r"(?:0[xX])?[0-9a-fA-F]{1,16}", re.ASCII)
QUIET = 1.0  # after the client's EOF, wait for this much silence before closing
MAX_DRAIN = 30.0
PIECE = 1 << 20  # bytes of a load written to the nodes at a time: its memory in khd
# The identification kh sends, from the lobby (paramiko's own, so nothing changes for clients).
IDENT = f"SSH-2.0-paramiko_{paramiko.__version__}"


def parse_user(username: str) -> tuple[int, int | None] | None:
    """``con<ID>`` → (ID, None), ``con<ID>.<N>`` → (ID, N), anything else None (numbers in
    ASCII digits, without a leading zero)."""
    m = USER_RE.fullmatch(username)
    if not m:
        return None
    return int(m[1]), int(m[2]) if m[2] else None


class _Lobbied(Packetizer):
    """The lobby (kh.cc.gate) already sent our identification and read the client's: the first
    write (ours) is not sent again, and the first line read is the client's, as read there.

    It also counts the transport thread's turns (one per message read), so that a session can
    wait for the reply to its own exec/shell request to go out first: paramiko sends it only
    after our check returns, and a client that sees the channel closed before the reply (a
    quick command) takes the request as failed."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.client_ident = ""
        self._ident_sent = False
        self._turn = threading.Condition()
        self.turns = 0

    def write_all(self, out: bytes) -> None:
        if not self._ident_sent:
            self._ident_sent = True
            if out == (IDENT + "\r\n").encode():
                return
        super().write_all(out)

    def readline(self, timeout: float) -> str:
        if self.client_ident:
            line, self.client_ident = self.client_ident, ""
            return line
        return str(super().readline(timeout))

    def read_message(self) -> tuple[int, paramiko.Message]:
        with self._turn:
            self.turns += 1
            self._turn.notify_all()
        return super().read_message()  # type: ignore[no-any-return]

    def past(self, turn: int, timeout: float = 5.0) -> None:
        """Wait until the transport thread has finished its turn ``turn`` (its replies sent)."""
        with self._turn:
            self._turn.wait_for(lambda: self.turns > turn, timeout)


class _Iface(paramiko.ServerInterface):
    """One connection's answers to paramiko: logins and channel requests, each asked of the
    service at that moment."""

    def __init__(self, server: SshServer, conn: Conn) -> None:
        self.server = server
        self.conn = conn
        self.api_refused = False

    def get_allowed_auths(self, username: str) -> str:
        if username.startswith("api+"):
            # a program's one secret: once refused, no method is left, so dbclient (which
            # tries its DROPBEAR_PASSWORD again while password is offered) stops at one
            return "" if self.api_refused else "password"
        return "password,publickey"

    def _login(self, grant: Grant | None) -> int:
        """The answer to a login that found ``grant`` (None: refused)."""
        if grant is None or not self.server.gate.admit(self.conn, grant):
            self.server.gate.refused(self.conn)
            return paramiko.AUTH_FAILED
        return paramiko.AUTH_SUCCESSFUL

    def _target(self, username: str) -> tuple[int, int | None] | None:
        """Whom a login asks for; None once the connection used up its failed logins."""
        return None if self.server.gate.spent(self.conn) else parse_user(username)

    def check_auth_password(self, username: str, password: str) -> int:
        if username.startswith("api+"):
            name = username[4:]
            grant = None if self.api_refused or self.server.gate.spent(self.conn) or \
                not PRINCIPAL_RE.fullmatch(name) else \
                self.server.access.login_api(name, password, self.conn.source)
            self.api_refused = grant is None
            return self._login(grant)
        target = self._target(username)
        grant = None if target is None else self.server.access.login_password(
            *target, password, self.conn.source)
        return self._login(grant)

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        target = self._target(username)
        grant = None if target is None else self.server.access.login_key(
            *target, f"{key.get_name()} {key.get_base64()}")
        return self._login(grant)

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind != "session":
            return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        return self.server.gate.open_channel(self.conn, chanid)

    def check_channel_pty_request(self, *args: object) -> bool:
        return True

    def check_channel_window_change_request(self, *args: object) -> bool:
        return True

    def check_channel_env_request(self, *args: object) -> bool:
        return True

    def check_channel_shell_request(self, channel: paramiko.Channel) -> bool:
        return self._start(channel, "")

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        return self._start(channel, command.decode("utf-8", "replace").strip(" \t\r\n"))

    def _start(self, channel: paramiko.Channel, command: str) -> bool:
        s = self.server.gate.start_session(self.conn, channel)
        if s is None:
            return False
        packetizer = channel.get_transport().packetizer
        turn = packetizer.turns  # this request's turn: the session waits until it is over
        threading.Thread(target=self.server.session, args=(self.conn, s, command,
                                                           lambda: packetizer.past(turn)),
                         daemon=True, name="sshd-session").start()
        return True


class SshServer:
    def __init__(self, access: ChannelAccess, host_key: paramiko.PKey,
                 limits: Limits | None = None) -> None:
        self.access = access
        self.host_key = host_key
        # paramiko logs each client's protocol error at ERROR, with a traceback: anyone who
        # can connect could fill khd's log with them. kh logs what it decides (kh.sshd).
        logging.getLogger("paramiko").setLevel(logging.CRITICAL)
        self.gate = Gate(access, limits or Limits(), self._handover,
                         (IDENT + "\r\n").encode())

    def listen(self, sock: socket.socket) -> None:
        """Serve connections on the listening ``sock`` (the lobby accepts them)."""
        self.gate.listen(sock)

    def close(self) -> None:
        self.gate.close()

    def _handover(self, conn: Conn) -> paramiko.Transport:
        """A Transport (a thread) for a connection the lobby let through."""
        t = paramiko.Transport(conn.sock, packetizer_class=_Lobbied)
        t.local_version = IDENT
        assert isinstance(t.packetizer, _Lobbied)
        t.packetizer.client_ident = conn.ident.decode("utf-8", "replace").rstrip("\r\n")
        t.banner_timeout = t.handshake_timeout = max(1.0, conn.deadline - time.monotonic())
        t.add_server_key(self.host_key)
        t.start_server(event=threading.Event(), server=_Iface(self, conn))
        return t

    # -- sessions ----------------------------------------------------------------------------
    def session(self, conn: Conn, s: Session, command: str,
                replied: Callable[[], None] = lambda: None) -> None:
        """Run ``command`` on the session's channel, once ``replied`` returns (the request's
        answer went out), and end it with its exit status (unless the watcher ended it)."""
        chan = s.channel
        grant = conn.grant
        assert grant is not None
        status = 1
        replied()
        try:
            if grant.alloc is None:  # an API login: the service's answer, nothing of a node
                answer = self.access.api(grant, command, conn.source)
                chan.sendall(answer.out.encode())
                chan.sendall_stderr(answer.err.encode())
                status = answer.status
            else:
                status = self._command(chan, s, grant, command)
        except Revoked as e:
            end_session(s, e.message)
        except (OSError, EOFError, paramiko.SSHException) as e:
            log.info("session of %s ended: %s", grant.describe(), e)
        except Exception as e:  # a bug ends this session with its reason, never the thread
            log.exception("session of %s failed", grant.describe())
            end_session(s, f"khd's session failed ({type(e).__name__}); see khd's log")
        finally:
            self.gate.channel_done(conn, chan.get_id())
        if s.ended is not None:
            return
        try:
            chan.send_exit_status(status)
            chan.shutdown_write()
            chan.close()
        except (OSError, EOFError, paramiko.SSHException):
            pass

    def _command(self, chan: paramiko.Channel, s: Session, grant: Grant, command: str) -> int:
        """A ``con<ID>`` session's command → its exit status."""
        reach = self.access.reach(grant)
        s.nodes = frozenset(reach.members)
        words = re.split(r"[ \t]+", command)  # ASCII blanks only, as ADDR_RE's digits
        if command in ("", "raw"):
            return self._broadcast(chan, grant, reach, tagged=False)
        if command == "tagged":
            return self._broadcast(chan, grant, reach, tagged=True)
        if command == "send":
            return self._send(chan, grant, reach)
        if words and words[0] == "load" and len(words) == 2:
            return self._load(chan, s, grant, reach, words[1])
        if command == "nodes":
            chan.sendall(" ".join(map(str, reach.live)).encode() + b"\n")
            return 0
        chan.sendall_stderr(f"kh: unknown channel command {command[:80]!r} (try: raw, "
                            "tagged, send, load ADDR, nodes)\n".encode())
        return 2

    def _broadcast(self, chan: paramiko.Channel, grant: Grant, reach: Reach, *,
                   tagged: bool) -> int:
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

    def _send(self, chan: paramiko.Channel, grant: Grant, reach: Reach) -> int:
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

    def _load(self, chan: paramiko.Channel, s: Session, grant: Grant, reach: Reach,
              addr_text: str) -> int:
        """``load ADDR``: the stream goes to every node's memory piece by piece as it arrives
        (at most PIECE bytes held), then one line per node with the size and CRC-32."""
        addr = parse_addr(addr_text)
        if addr is None:
            chan.sendall_stderr(f"kh: load takes a hex address, e.g. load 0x8000000, not "
                                f"{addr_text[:40]!r}\n".encode("utf-8", "backslashreplace"))
            return 2
        limit = self.access.mem_limit()
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
                    rams[n] = self.access.open_ram(grant, n)
                except Revoked:
                    raise
                except KhError as e:
                    failed[n] = str(e)
            size, crc = self._stream(chan, s, addr, limit, rams, failed)
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

    def _stream(self, chan: paramiko.Channel, s: Session, addr: int, limit: int,
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


def host_key(path: Path) -> paramiko.PKey:
    """khd's ssh host key, made on first start and kept in the state directory."""
    if path.exists():
        return paramiko.RSAKey.from_private_key_file(str(path))
    key = paramiko.RSAKey.generate(2048)
    path.parent.mkdir(parents=True, exist_ok=True)
    key.write_private_key_file(str(path))
    path.chmod(0o600)
    return key


def parse_public_key(text: str) -> tuple[str, str]:
    """An OpenSSH public key line (``type base64 [comment]``, one line of printable ASCII) →
    (normalised "type base64", comment). The base64 is strict, its blob names the same type
    (its first SSH string) and paramiko loads it as a key of that type.

    Raises UsageError (the caller's input: HTTP 400) for anything else."""
    hint = "pass the .pub file's one line, e.g. ssh-ed25519 AAAA... me@host"
    line = text.strip()
    if not line.isascii() or not line.isprintable():
        raise UsageError("not an OpenSSH public key (not one line of printable ASCII)", hint)
    parts = line.split()
    if len(parts) < 2:
        raise UsageError("not an OpenSSH public key (no type and key)", hint)
    kind, b64 = parts[0], parts[1]
    try:
        blob = base64.b64decode(b64, validate=True)
    except ValueError:
        raise UsageError("not an OpenSSH public key (bad base64)", hint) from None
    n = int.from_bytes(blob[:4], "big") if len(blob) >= 4 else -1
    if n < 0 or blob[4:4 + n] != kind.encode():
        raise UsageError(f"not an OpenSSH public key (its data is not a {kind[:40]!r} key)",
                         hint)
    try:
        key = paramiko.PKey.from_type_string(kind, blob)
        loaded = key.get_name() == kind and key.asbytes() == blob
    except Exception:  # paramiko's parsers raise many kinds on malformed key material
        loaded = False
    if not loaded:  # unknown type, a certificate, or key material cut short or with a tail
        raise UsageError(f"not an OpenSSH public key (not a {kind[:40]!r} key kh can use)",
                         "ssh-ed25519, ssh-rsa or ecdsa-sha2-nistp256/384/521")
    # as the server names a key at login (its canonical base64), so that the two compare equal
    return f"{kind} {base64.b64encode(blob).decode()}", " ".join(parts[2:])
