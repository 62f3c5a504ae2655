"""The control channel's ssh server asks its ChannelAccess on every use (kh.cc.sshd, kh.cc.gate):
a released allocation, a revoked key, a removed principal or a node leaving ends the sessions
that depended on them, with one line on stderr, and refuses new channels."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from kh.cc.channel import NodeWriter
from kh.cc.client import ChannelClient, ChannelError
from kh.cc.limits import Limits
from kh.hw.console import Console
from tests.unit.fakenode import FakeNode
from tests.unit.sshd_fakes import FakeAccess, Running, connect, serve, wait_until


@pytest.fixture
def srv() -> Iterator[Running]:
    access = FakeAccess()
    access.add("alice", "apw", 1, [1, 2])
    access.add("bob", "bpw", 2, [3])
    with serve(access) as running:
        yield running


def open_raw(client: paramiko.SSHClient, command: str = "raw") -> paramiko.Channel:
    t = client.get_transport()
    assert t is not None
    ch = t.open_session()
    ch.exec_command(command)
    return ch


def ended(ch: paramiko.Channel) -> tuple[int, bytes]:
    """Wait for the server to end ``ch``: (exit status, everything on stderr)."""
    wait_until(ch.exit_status_ready)
    wait_until(lambda: ch.closed or ch.eof_received)
    err = b""
    while ch.recv_stderr_ready():
        err += ch.recv_stderr(4096)
    return ch.recv_exit_status(), err


def new_channel_refused(client: paramiko.SSHClient) -> bool:
    t = client.get_transport()
    if t is None or not t.is_active():
        return True
    try:
        t.open_session(timeout=5).close()
    except (paramiko.SSHException, EOFError, OSError):
        return True
    return False


def test_a_session_reaches_only_its_allocation(srv):
    c = connect(srv.port, "con1", "apw")
    try:
        ch = open_raw(c, "nodes")
        assert ch.makefile().read().split() == [b"1", b"2"]
        ch = open_raw(c)
        ch.sendall(b"hello\n")
        wait_until(lambda: srv.access.writers[2].got == b"hello\n")
        assert srv.access.writers[1].got == b"hello\n" and srv.access.writers[3].got == b""
        srv.access.consoles[1].emit(b"from node 1\n")
        assert ch.recv(100) == b"from node 1\n"
        ch.close()
    finally:
        c.close()
    assert srv.access.sources and set(srv.access.sources) == {f"loopback:uid={os.geteuid()}"}


@pytest.mark.parametrize("user, password", [("con1", "bpw"), ("con2", "apw"), ("con9", "apw"),
                                            ("con1.3", "apw"), ("alice", "apw"),
                                            ("con1\n", "apw")])
def test_wrong_logins_are_refused(srv, user, password):
    with pytest.raises(paramiko.AuthenticationException):
        connect(srv.port, user, password)


def test_release_ends_the_open_session_and_refuses_new_channels(srv):
    """Finding 2: after alice released, her open connection kept reading and writing."""
    c = connect(srv.port, "con1", "apw")
    try:
        ch = open_raw(c)
        srv.access.allocs[1].released = True
        status, err = ended(ch)
        assert status == 1
        assert err == b"kh: allocation 1 was released; this session ends\n"
        assert new_channel_refused(c)
        wait_until(lambda: not c.get_transport().is_active())  # type: ignore[union-attr]
    finally:
        c.close()


class DrainWatched(NodeWriter):
    """A real node writer that says when a session waits for it to drain."""

    def __init__(self, number: int, console: Console) -> None:
        self.draining = threading.Event()
        super().__init__(number, console)

    def drain(self, timeout: float) -> bool:
        self.draining.set()
        return super().drain(timeout)


@pytest.mark.parametrize("watch", [0.1, 3600.0], ids=["watcher", "no-watcher"])
def test_a_release_ends_a_session_draining_after_its_eof(tmp_path: Path, watch: float):
    """A raw session whose client had sent EOF, waiting for its input to reach a node that
    reads nothing, got neither the release line nor an exit status when the allocation was
    released: the console closed under its drain and its thread died. Ended like any other
    session, whether the watcher looks in time or the session reaches its own end first."""
    node = FakeNode(tmp_path / "con.sock")
    con = node.attach()
    w = DrainWatched(1, con)
    access = FakeAccess()
    access.add("alice", "apw", 1, [1])
    access.consoles[1] = con  # type: ignore[assignment]
    access.writers[1] = w  # type: ignore[assignment]
    try:
        with serve(access, Limits(watch_interval=watch)) as srv:
            c = connect(srv.port, "con1", "apw")
            try:
                ch = open_raw(c)
                ch.sendall(b"x" * 16384)  # more than QEMU's socket is let hold at once
                ch.shutdown_write()
                assert w.draining.wait(10)
                # khd's release: the allocation is marked first, then the node's QEMU and
                # console go (kh.service.nodes stops the writer and closes the console).
                access.allocs[1].released = True
                w.stop()
                con.close()
                status, err = ended(ch)
                assert err == b"kh: allocation 1 was released; this session ends\n"
                assert status == 1
            finally:
                c.close()
    finally:
        w.stop()
        con.close()
        node.close()


def test_a_release_is_seen_at_channel_open_before_the_watcher():
    access = FakeAccess()
    access.add("alice", "apw", 1, [1])
    with serve(access, Limits(watch_interval=3600.0)) as srv:  # the watcher does not look
        c = connect(srv.port, "con1", "apw")
        try:
            ch = open_raw(c)
            # The session checks its grant as it starts, after the exec reply, and then
            # subscribes to the console: the release below must come after that check.
            wait_until(lambda: access.consoles[1].subs)
            access.allocs[1].released = True
            assert new_channel_refused(c)
            assert not ch.closed  # only the watcher ends what is open
        finally:
            c.close()


def test_a_revoked_key_ends_its_sessions_and_the_credential_still_works(srv):
    key = paramiko.RSAKey.generate(1024)
    srv.access.keys[7] = ("alice", 1, f"{key.get_name()} {key.get_base64()}")
    by_key = connect(srv.port, "con1", key=key)
    by_password = connect(srv.port, "con1", "apw")
    try:
        ch_key, ch_pw = open_raw(by_key), open_raw(by_password)
        del srv.access.keys[7]
        status, err = ended(ch_key)
        assert status == 1 and err == b"kh: key 7 was revoked; this session ends\n"
        assert new_channel_refused(by_key)
        assert not ch_pw.closed and not new_channel_refused(by_password)
        with pytest.raises(paramiko.AuthenticationException):
            connect(srv.port, "con1", key=key)
    finally:
        by_key.close()
        by_password.close()


def test_a_key_for_another_allocation_is_refused(srv):
    key = paramiko.RSAKey.generate(1024)
    srv.access.keys[8] = ("alice", 5, f"{key.get_name()} {key.get_base64()}")
    with pytest.raises(paramiko.AuthenticationException):
        connect(srv.port, "con1", key=key)


def test_a_removed_principal_ends_every_session(srv):
    c = connect(srv.port, "con1.2", "apw")
    try:
        ch = open_raw(c, "tagged")
        del srv.access.passwords["alice"]
        status, err = ended(ch)
        assert status == 1 and b"principal alice was removed" in err
    finally:
        c.close()


def test_a_node_leaving_ends_the_sessions_that_reach_it(srv):
    one = connect(srv.port, "con1.2", "apw")
    whole = connect(srv.port, "con1", "apw")
    other = connect(srv.port, "con1.1", "apw")
    try:
        ch_one, ch_whole, ch_other = open_raw(one), open_raw(whole), open_raw(other)
        srv.access.allocs[1].members.discard(2)  # `kh release ... ` of node 2 alone
        status, err = ended(ch_one)
        assert status == 1 and err == b"kh: node 2 left allocation 1; this session ends\n"
        assert ended(ch_whole)[1] == b"kh: node 2 left allocation 1; this session ends\n"
        assert new_channel_refused(one)
        # node 1's session and a new session of the whole allocation go on
        assert not ch_other.closed
        ch = open_raw(whole, "nodes")
        assert ch.makefile().read().split() == [b"1"]
    finally:
        for c in (one, whole, other):
            c.close()


def test_an_unknown_command_and_a_garbage_client(srv):
    c = connect(srv.port, "con2", "bpw")
    try:
        ch = open_raw(c, "frobnicate")
        assert ch.recv_exit_status() == 2
        assert b"unknown channel command" in ch.makefile_stderr().read()
    finally:
        c.close()
    s = socket.create_connection(("127.0.0.1", srv.port))
    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    s.settimeout(5)
    data = s.recv(4096)
    while data and not data.endswith(b"\n"):
        data += s.recv(4096)
    assert data.startswith(b"SSH-2.0-")
    try:  # not an ssh client: dropped (a reset, as the rest of its request was not read)
        assert s.recv(4096) == b""
    except ConnectionResetError:
        pass
    s.close()


def test_the_client_says_why_a_session_is_refused():
    access = FakeAccess()
    access.add("alice", "apw", 1, [1, 2])
    with serve(access, Limits(watch_interval=3600.0)) as srv:  # the watcher does not look
        c = ChannelClient("con1", "127.0.0.1", srv.port, password="apw")
        try:
            assert c.exec("nodes") == (b"1 2\n", b"", 0)
            access.allocs[1].released = True
            with pytest.raises(ChannelError, match="khd refused a session"):
                c.exec("nodes")
        finally:
            c.close()


def test_a_refused_client_login_leaves_no_connection_behind(srv):
    with pytest.raises(ChannelError, match="refused our credential"):
        ChannelClient("con1", "127.0.0.1", srv.port, password="wrong")
    wait_until(lambda: not srv.server.gate.conns)


def test_a_bug_in_a_session_ends_it_with_a_reason_not_its_thread(srv, monkeypatch):
    # Seen: a ValueError in a draining session escaped its thread ("Exception in thread
    # sshd-session") and the client got no exit status.
    def broken(grant):  # type: ignore[no-untyped-def]
        raise ValueError("a bug")

    monkeypatch.setattr(srv.access, "reach", broken)
    c = connect(srv.port, "con1", "apw")
    try:
        status, err = ended(open_raw(c))
        assert status == 1
        assert err == b"kh: khd's session failed (ValueError); see khd's log; this session ends\n"
    finally:
        c.close()


def test_send_returns_once_every_node_has_the_bytes_though_they_never_go_quiet(srv):
    """Issue 13: `khdo write "run kboot"` to 64 booting nodes took 12 s to return: a raw
    session waits for one second of quiet after its EOF, and booting nodes print all along.
    The channel's `send` ends when every byte has reached every node, and carries no output."""
    stop = threading.Event()

    def chatter() -> None:  # a booting node: never quiet
        while not stop.wait(0.05):
            srv.access.consoles[1].emit(b"[    1.234] booting\n")

    t = threading.Thread(target=chatter, daemon=True)
    t.start()
    c = connect(srv.port, "con1", "apw")
    try:
        ch = open_raw(c, "send")
        ch.sendall(b"run kboot\n")
        ch.shutdown_write()
        status, err = ended(ch)  # wait_until: 10 s, less than raw's 30 s bound
        assert (status, err) == (0, b"")
        assert srv.access.writers[1].got == srv.access.writers[2].got == b"run kboot\n"
        assert srv.access.writers[3].got == b""  # bob's node
        assert ch.recv(100) == b""  # no node output: that is raw's and readcon's
    finally:
        stop.set()
        c.close()


def test_send_names_a_node_that_did_not_take_its_input(srv, monkeypatch):
    monkeypatch.setattr(srv.access.writers[2], "drain", lambda timeout: False)
    c = connect(srv.port, "con1", "apw")
    try:
        ch = open_raw(c, "send")
        ch.sendall(b"x\n")
        ch.shutdown_write()
        status, err = ended(ch)
        assert status == 1
        assert err == b"kh: node 2 did not take its input within 30 s\n"
    finally:
        c.close()
