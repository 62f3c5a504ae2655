"""The ssh server's door and its watch: who gets in, how many at once, for how long, and the end
of what a grant no longer allows.

One *lobby* thread accepts every connection and holds it, threadless, until the client has sent
its identification line and begun its key exchange: kh's own identification goes out at once,
the client's is read here, and only then does a paramiko Transport (a thread) take over. A TCP
connection that sends nothing, or only its identification, costs a file descriptor and no
thread. Logins under way are capped per source address and in all, key exchanges in progress
(threads) too, and every login must succeed within `Limits.login_timeout` of its TCP accept.

One *watcher* thread looks at every connection every `Limits.watch_interval` seconds: a login
past its time is closed; a logged-in connection whose grant no longer holds (released,
revoked, principal removed) has each session told why on stderr and ended, then is closed; a
session that reaches a node which left the allocation is ended the same way. A session whose
command ends (e.g. after draining its input) asks once more first (`channel_done`), so one
that lost its grant between two looks ends with the reason too, not with exit status 0.
The limits and their reasons are in docs/control-channel.md ("Limits").
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable

import paramiko

from kh.admission import source_of_peer
from kh.cc.conns import Chan, Conn, Session, end_session
from kh.cc.limits import Limits
from kh.service.access import ChannelAccess, Grant, Standing

log = logging.getLogger("kh.sshd")
MAX_IDENT = 255  # RFC 4253 4.2: the identification line, CR LF included
OPENED: int = paramiko.OPEN_SUCCEEDED
PROHIBITED: int = paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
SHORTAGE: int = paramiko.OPEN_FAILED_RESOURCE_SHORTAGE


class Gate:
    """The door and the watch of the module's docstring: every connection (``Conn``) from its
    accept to its close, its login, channels and sessions. Its lobby and watcher threads start
    here and end at ``close``."""

    def __init__(self, access: ChannelAccess, limits: Limits,
                 handover: Callable[[Conn], paramiko.Transport], ident: bytes) -> None:
        self.access = access
        self.limits = limits
        self.handover = handover  # starts a Transport on a connection the lobby let through
        self.ident = ident  # our identification line, CR LF included
        self.lock = threading.Lock()
        self.conns: set[Conn] = set()
        self._new: list[socket.socket] = []
        self._listeners: list[socket.socket] = []
        self._sel = selectors.DefaultSelector()
        self._closed = threading.Event()
        self._threads = [threading.Thread(target=self._lobby, daemon=True, name="sshd-lobby"),
                         threading.Thread(target=self._watcher, daemon=True, name="sshd-watch")]
        for t in self._threads:
            t.start()

    def listen(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        with self.lock:
            self._new.append(sock)

    def close(self) -> None:
        self._closed.set()
        with self.lock:
            listeners, self._listeners = self._listeners + self._new, []
            conns = list(self.conns)
        for s in listeners:
            s.close()
        for c in conns:
            self._drop(c)

    # -- the lobby ---------------------------------------------------------------------------
    def _lobby(self) -> None:
        while not self._closed.is_set():
            with self.lock:
                new, self._new = self._new, []
            for s in new:
                self._listeners.append(s)
                self._sel.register(s, selectors.EVENT_READ, None)
            for key, _ in self._sel.select(0.25):
                if key.data is None:
                    self._accept(key.fileobj)  # type: ignore[arg-type]
                else:
                    self._read_ident(key.data)
            self._let_in(time.monotonic())
        self._sel.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, addr = listener.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if listener.fileno() < 0:  # closed: khd is stopping
                    self._sel.unregister(listener)
                else:  # out of file descriptors, say: the connection waits in the backlog
                    log.warning("ssh: cannot accept a connection: %s", e)
                    self._closed.wait(0.1)
                return
            source = source_of_peer(sock, str(addr[0]))  # a local user by uid
            lim = self.limits
            with self.lock:  # (a transport that ended is not counted, reaped or not)
                waiting = [c for c in self.conns if c.grant is None and (
                    c.transport is None or c.transport.is_active())]
                why = None
                if len(waiting) >= lim.logins:
                    why = "too many ssh logins under way"
                elif sum(c.source == source for c in waiting) >= lim.logins_per_source:
                    why = f"too many ssh logins under way from {source}"
                else:
                    conn = Conn(sock, source, time.monotonic() + lim.login_timeout)
                    self.conns.add(conn)
            sock.setblocking(False)
            if why is not None:
                log.info("refused a connection: %s", why)
                try:  # lines before the identification are allowed, and shown by some clients
                    sock.send(f"kh: {why}, try again later\r\n".encode())
                except OSError:
                    pass
                sock.close()
                continue
            try:
                sock.send(self.ident)
                self._sel.register(sock, selectors.EVENT_READ, conn)
            except (OSError, ValueError):  # ValueError: close() closed it meanwhile
                self._drop(conn)

    def _read_ident(self, conn: Conn) -> None:
        """The client's identification line, read here byte-exact (so nothing of its key
        exchange is consumed); then, once more arrives, its key exchange has begun."""
        try:
            peek = conn.sock.recv(MAX_IDENT, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            peek = b""
        if not peek:
            self._drop(conn)
            return
        if conn.ident_at is not None:
            conn.ready = True
            self._sel.unregister(conn.sock)
            return
        end = peek.find(b"\n")
        conn.ident += conn.sock.recv(len(peek) if end < 0 else end + 1)
        if len(conn.ident) > MAX_IDENT or not b"SSH-".startswith(conn.ident[:4]):
            log.info("dropped a connection from %s: not an ssh client", conn.source)
            self._drop(conn)
        elif conn.ident.endswith(b"\n"):
            conn.ident_at = time.monotonic()

    def _let_in(self, now: float) -> None:
        """Expire logins past their time; hand the ready ones to a Transport while there is
        room for another key exchange (clients that sent no key exchange after ident_wait
        only into a few places of their own, so they cannot crowd out the others)."""
        lim = self.limits
        with self.lock:
            lobby = [c for c in self.conns if c.transport is None and not c.closed]
            busy = [c for c in self.conns if c.transport is not None and c.grant is None
                    and not c.closed]
        for c in lobby:
            if now > c.deadline:
                self._drop(c)
        for c in sorted(lobby, key=lambda c: c.deadline):
            if c.closed or len(busy) >= lim.handshakes:
                continue
            slow = not c.ready and c.ident_at is not None and now - c.ident_at > lim.ident_wait
            if not (c.ready or slow):
                continue
            peers = [b for b in busy if b.source == c.source and b.slow == slow]
            if slow and (sum(b.slow for b in busy) >= lim.slow_handshakes
                         or len(peers) >= lim.slow_per_source):
                continue
            if not slow and len(peers) >= lim.handshakes_per_source:
                continue
            if slow:
                self._sel.unregister(c.sock)
            c.slow = slow
            try:
                c.sock.setblocking(True)
                c.transport = self.handover(c)
            except (OSError, EOFError, paramiko.SSHException) as e:
                log.info("ssh connection from %s failed: %s", c.source, e)
                self._drop(c)
                continue
            busy.append(c)

    def _drop(self, conn: Conn) -> None:
        with self.lock:
            if conn.closed:
                return
            conn.closed = True
            self.conns.discard(conn)
        if conn.transport is not None:
            conn.transport.close()
            return
        try:
            self._sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    # -- logins and channels (called on the connection's Transport thread) -------------------
    def admit(self, conn: Conn, grant: Grant) -> bool:
        """A login succeeded: take it, unless that many connections are logged in already."""
        lim = self.limits
        with self.lock:
            logged = [c for c in self.conns if c.grant is not None and not c.closed]
            mine = sum(c.grant is not None and c.grant.principal == grant.principal
                       for c in logged)
            if len(logged) < lim.connections and mine < lim.connections_per_principal:
                conn.grant = grant
                return True
        log.info("refused a login of %s: %d connections logged in, %d of them its own",
                 grant.describe(), len(logged), mine)
        return False

    def refused(self, conn: Conn) -> None:
        """A login failed; past ``auth_tries`` the connection is closed."""
        conn.failures += 1
        if self.spent(conn):
            conn.doomed = "too many failed logins"
            if conn.transport is not None:  # at once, on its own thread: nothing more is read
                conn.transport.close()

    def spent(self, conn: Conn) -> bool:
        """True once the connection used up its failed logins (no credential is checked)."""
        return conn.failures >= self.limits.auth_tries

    def open_channel(self, conn: Conn, chanid: int) -> int:
        """A paramiko OPEN_* answer for a new session channel, asked of the grant *now*."""
        grant = conn.grant
        if grant is None:
            return PROHIBITED
        reason = self.access.standing([grant])[grant].reason
        if reason is not None:
            conn.doomed = reason
            return PROHIBITED
        lim = self.limits
        with self.lock:
            live = [c for c in self.conns if c.grant is not None and not c.closed]
            total = sum(len(c.channels) for c in live)
            principal = sum(len(c.channels) for c in live
                            if c.grant is not None and c.grant.principal == grant.principal)
            alloc = 0 if grant.alloc is None else sum(  # API logins have no allocation
                len(c.channels) for c in live
                if c.grant is not None and c.grant.alloc == grant.alloc)
            if len(conn.channels) >= lim.channels_per_connection or total >= lim.sessions \
                    or principal >= lim.sessions_per_principal \
                    or alloc >= lim.sessions_per_allocation:
                log.info("refused a channel of %s: %d on its connection, %d its principal's, "
                         "%d its allocation's, %d in all", grant.describe(),
                         len(conn.channels), principal, alloc, total)
                return SHORTAGE
            conn.channels[chanid] = Chan(time.monotonic())
        return OPENED

    def start_session(self, conn: Conn, channel: paramiko.Channel) -> Session | None:
        """A shell or exec request: the session, if the grant still holds *now* and the
        channel has none yet."""
        grant = conn.grant
        with self.lock:
            entry = conn.channels.get(channel.get_id())
        if grant is None or entry is None or entry.session is not None:
            return None
        st = self.access.standing([grant])[grant]
        if st.reason is not None:
            conn.doomed = st.reason
            return None
        entry.channel = channel
        entry.session = Session(channel, st.nodes)
        return entry.session

    def channel_done(self, conn: Conn, chanid: int) -> None:
        """A session's command is over (on its thread, before its exit status goes out): forget
        the channel; a session whose grant stopped holding meanwhile is ended as the watcher
        would end it (reason, exit status 1), never with the command's own status."""
        with self.lock:
            entry = conn.channels.pop(chanid, None)
        s = entry.session if entry is not None else None
        grant = conn.grant
        if s is None or s.ended is not None or grant is None:
            return
        reason = conn.doomed or self._lost(s, grant, self.access.standing([grant])[grant])
        if reason is not None:
            log.info("ended a session of %s at its end: %s", grant.describe(), reason)
            end_session(s, reason)

    # -- the watcher -------------------------------------------------------------------------
    def _watcher(self) -> None:
        while not self._closed.wait(self.limits.watch_interval):
            try:
                self.watch(time.monotonic())
            except Exception:  # the watch must go on whatever one look met
                log.exception("the ssh watcher's look failed")

    def watch(self, now: float) -> None:
        """One look at every connection (see the module's docstring)."""
        with self.lock:
            conns = [c for c in self.conns if c.transport is not None and not c.closed]
        logged: list[Conn] = []
        for c in conns:
            t = c.transport
            assert t is not None
            if not t.is_active():
                self._drop(c)
            elif c.grant is None:
                if now > c.deadline or c.doomed:
                    log.info("closed a login from %s: %s", c.source,
                             c.doomed or "no login within the time allowed")
                    self._drop(c)
            else:
                self._collect(c, t, now)
                logged.append(c)
        grants = {c.grant for c in logged if c.grant is not None}
        standing = self.access.standing(grants) if grants else {}
        for c in logged:
            assert c.grant is not None
            st = standing[c.grant]
            reason = c.doomed or st.reason
            with self.lock:
                sessions = [e.session for e in c.channels.values() if e.session is not None]
            if reason is not None:
                log.info("ended %s: %s", c.grant.describe(), reason)
                for s in sessions:
                    end_session(s, reason)
                self._drop(c)
                continue
            for s in sessions:
                why = self._lost(s, c.grant, st)
                if why is not None:
                    end_session(s, why)

    @staticmethod
    def _lost(s: Session, grant: Grant, st: Standing) -> str | None:
        """Why session ``s`` of ``grant`` may not go on, given the grant's standing ``st``:
        the grant's own reason, or a node the session reaches that left the allocation."""
        if st.reason is not None:
            return st.reason
        lost = sorted(s.nodes - st.nodes)
        return f"node {lost[0]} left allocation {grant.alloc}" if lost else None

    def _collect(self, c: Conn, t: paramiko.Transport, now: float) -> None:
        """Take the transport's newly opened channels (paramiko queues each one until
        accepted), and close those that got no command in time or were closed unused."""
        while (ch := t.accept(0)) is not None:
            with self.lock:
                entry = c.channels.get(ch.get_id())
            if entry is None:
                ch.close()
            elif entry.channel is None:
                entry.channel = ch
        with self.lock:
            idle = [(i, e) for i, e in c.channels.items() if e.session is None
                    and (now - e.opened > self.limits.request_wait
                         or (e.channel is not None and e.channel.closed))]
            for i, _ in idle:
                del c.channels[i]
        for _, e in idle:
            if e.channel is not None:
                e.channel.close()
