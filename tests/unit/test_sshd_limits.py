"""The ssh server is bounded (kh.cc.gate): logins under way cost no thread until the client
begins its key exchange, are capped per source and in all, and end at the login timeout;
logged-in connections, channels and sessions are capped too."""

from __future__ import annotations

import os
import socket
import threading
from contextlib import AbstractContextManager

import paramiko
import pytest

from kh.cc import gate
from kh.cc.limits import Limits
from tests.unit.as_user import NOBODY, connect_as
from tests.unit.sshd_fakes import FakeAccess, Running, connect, serve, tcp, wait_until


def server_threads() -> int:
    """Threads the ssh server runs for connections: its paramiko Transports."""
    return sum(isinstance(t, paramiko.Transport) and t.server_mode
               for t in threading.enumerate())


def read_line(s: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def closed(s: socket.socket) -> bool:
    """Read until the server closes (True), or the socket's timeout passes (False)."""
    try:
        while s.recv(4096):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


@pytest.fixture
def access() -> FakeAccess:
    a = FakeAccess()
    a.add("alice", "apw", 1, [1, 2])
    a.add("bob", "bpw", 2, [3])
    return a


@pytest.fixture
def hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let 127.0.0.N stand for distinct hosts: khd counts a local user as one source whatever
    its loopback address (see test_a_local_user_is_one_source_whatever_its_address), so a test
    of what one host may not take from another counts each address as its own source here, as
    a fabric address is."""
    monkeypatch.setattr(gate, "source_of_peer", lambda sock, address: address)


def running(access: FakeAccess, **limits: float) -> AbstractContextManager[Running]:
    return serve(access, Limits(watch_interval=0.1, **limits))  # type: ignore[arg-type]


def test_half_open_logins_cost_no_thread_are_capped_per_source_and_end_in_time(access, hosts):
    """Finding 4: 20 unauthenticated ssh connections held a thread each, forever."""
    with running(access, login_timeout=3.0, logins_per_source=50) as srv:
        threads = threading.active_count()
        held = [tcp(srv.port) for _ in range(50)]
        over = [tcp(srv.port) for _ in range(5)]
        for s in held:
            assert read_line(s).startswith(b"SSH-2.0-")
        for s in over:  # the 51st and later from this source: refused at once
            assert read_line(s) == b"kh: too many ssh logins under way from 127.0.0.1, " \
                                   b"try again later\r\n"
            assert closed(s)
        assert threading.active_count() <= threads + 2
        assert server_threads() == 0
        # another source still gets in, and logs in
        c = connect(srv.port, "con2", "bpw", source="127.0.0.5")
        c.close()
        for s in held:  # ... and the half-open ones end at the login timeout
            s.settimeout(30)
            assert closed(s)
            s.close()
        wait_until(lambda: not srv.server.gate.conns)


def test_clients_that_only_identify_take_few_threads(access, hosts):
    with running(access, login_timeout=3.0, ident_wait=0.2, slow_handshakes=3,
                 slow_per_source=2) as srv:
        socks = [tcp(srv.port, "127.0.0.2") for _ in range(10)]
        socks += [tcp(srv.port, "127.0.0.3") for _ in range(10)]
        for s in socks:
            s.sendall(b"SSH-2.0-HalfOpen_1.0\r\n")
        wait_until(lambda: server_threads() >= 3)
        # still only three after they had all the time they could use
        wait_until(lambda: all(c.transport is None or not c.transport.is_active()
                               or c.slow for c in srv.server.gate.conns))
        assert server_threads() <= 3
        c = connect(srv.port, "con1", "apw")  # a real client is not held up by them
        c.close()
        for s in socks:
            s.settimeout(30)
            assert closed(s)
            s.close()


def test_key_exchanges_in_progress_are_bounded_per_source(access, hosts):
    with running(access, login_timeout=3.0, handshakes_per_source=4) as srv:
        clients = []
        for _ in range(12):
            t = paramiko.Transport(tcp(srv.port, "127.0.0.4"))
            t.start_client(event=threading.Event())  # key exchange, then never a login
            clients.append(t)
        wait_until(lambda: server_threads() >= 4)
        assert server_threads() <= 4
        c = connect(srv.port, "con1", "apw")  # another source is not held up
        c.close()
        wait_until(lambda: not any(t.is_active() for t in clients), timeout=60)
        for t in clients:
            t.close()


def test_a_local_user_is_one_source_whatever_its_address(access):
    """A local attacker multiplied its budget by its address: the ssh side counted 127.0.0.2
    as a source of its own. And then all of loopback was one source, so one local user's
    half-open logins held every other local user out: now a source is the user (kh.peer)."""
    me = f"loopback:uid={os.geteuid()}"
    with running(access, login_timeout=5.0, logins_per_source=3) as srv:
        held = [tcp(srv.port, "127.0.0.1") for _ in range(3)]
        for s in held:
            assert read_line(s).startswith(b"SSH-2.0-")
        other = tcp(srv.port, "127.0.0.2")
        assert read_line(other) == f"kh: too many ssh logins under way from {me}, " \
                                   "try again later\r\n".encode()
        assert closed(other)
        other.close()
        if os.geteuid() == 0:  # another local user is not held out
            with connect_as(NOBODY, ("127.0.0.1", srv.port), "127.0.0.2") as s:
                assert read_line(s).startswith(b"SSH-2.0-")
        for s in held:
            s.close()
        wait_until(lambda: not srv.server.gate.conns)
        with pytest.raises(paramiko.AuthenticationException):
            connect(srv.port, "con1", "wrong", source="127.0.0.3")
        assert access.sources == [me]  # and so are refused credentials limited


def test_a_login_not_done_in_time_is_closed(access):
    with running(access, login_timeout=1.0) as srv:
        t = paramiko.Transport(tcp(srv.port))
        t.start_client(timeout=10)
        assert t.is_active() and not t.is_authenticated()
        wait_until(lambda: not t.is_active())
        t.close()


def test_failed_logins_close_the_connection_after_a_few(access):
    with running(access, auth_tries=3) as srv:
        t = paramiko.Transport(tcp(srv.port))
        t.start_client(timeout=10)
        for _ in range(5):
            try:
                t.auth_password("con1", "wrong")
            except paramiko.AuthenticationException:
                pass
            except (paramiko.SSHException, EOFError):
                break
        wait_until(lambda: not t.is_active())
        assert len(access.sources) == 3  # credentials checked
        t.close()


def test_connections_per_principal(access):
    with running(access, connections_per_principal=2) as srv:
        a, b = connect(srv.port, "con1", "apw"), connect(srv.port, "con1.1", "apw")
        with pytest.raises(paramiko.AuthenticationException):
            connect(srv.port, "con1", "apw")
        other = connect(srv.port, "con2", "bpw")  # another principal is not counted
        a.close()
        wait_until(lambda: sum(c.grant is not None for c in srv.server.gate.conns) == 2)
        connect(srv.port, "con1", "apw").close()
        b.close()
        other.close()


def open_session(c: paramiko.SSHClient) -> paramiko.Channel:
    t = c.get_transport()
    assert t is not None
    return t.open_session(timeout=5)


def test_channels_per_connection_and_sessions_per_allocation(access):
    with running(access, channels_per_connection=2, sessions_per_allocation=3) as srv:
        c = connect(srv.port, "con1", "apw")
        chans = [open_session(c), open_session(c)]
        with pytest.raises(paramiko.ChannelException) as e:
            open_session(c)
        assert e.value.code == paramiko.OPEN_FAILED_RESOURCE_SHORTAGE
        d = connect(srv.port, "con1.2", "apw")
        chans.append(open_session(d))
        with pytest.raises(paramiko.ChannelException):  # the allocation's fourth
            open_session(d)
        other = connect(srv.port, "con2", "bpw")
        open_session(other).close()  # another allocation's is not counted
        chans[0].close()
        wait_until(lambda: sum(len(x.channels) for x in srv.server.gate.conns) < 4)
        chans.append(open_session(d))
        for x in (c, d, other):
            x.close()


def test_a_channel_that_never_asks_for_a_command_is_closed(access):
    with running(access, request_wait=0.5) as srv:
        c = connect(srv.port, "con1", "apw")
        ch = open_session(c)
        wait_until(lambda: ch.closed)
        assert not srv.server.gate.conns.pop().channels
        c.close()
