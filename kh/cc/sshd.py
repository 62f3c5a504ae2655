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
and logins are bounded by kh.cc.gate; what a session runs is kh.cc.commands, and what it may
ask for is in docs/control-channel.md. Host and public keys: kh.cc.keys.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Callable

import paramiko
from paramiko.packet import Packetizer

from kh.admission import USER_RE as PRINCIPAL_RE
from kh.cc import commands
from kh.cc.conns import Conn, Session, end_session
from kh.cc.gate import Gate
from kh.cc.keys import parse_public_key as parse_public_key  # kh.service.core's name for it
from kh.cc.limits import Limits
from kh.service.access import ChannelAccess, Grant, Revoked

log = logging.getLogger("kh.sshd")
# One spelling per channel: ids and node numbers start at 1 and have no leading zero (con016
# is nobody, not another name for con16).
NUMBER = r"[1-9][0-9]{0,8}"
USER_RE = re.compile(rf"con({NUMBER})(?:\.({NUMBER}))?", re.ASCII)
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
                status = commands.run(self.access, chan, s, grant, command)
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
