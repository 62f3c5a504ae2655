"""Hypothesis over the ssh server's inputs: user names, exec commands and byte streams. No input
crashes the server or reaches beyond the session's own nodes, and every session ends with a
status: 0, 1 (a node failed, or the session was ended), or 2 (refused)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import paramiko
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kh.cc.sshd import parse_user
from tests.unit.sshd_fakes import FakeAccess, FakeRam, Running, connect, serve

MIB = 1 << 20


@given(st.one_of(st.text(max_size=40),
                st.from_regex(r"con[0-9]{1,9}(\.[0-9]{1,9})?", fullmatch=True)))
def test_user_names_are_matched_whole_and_ascii(name):
    parsed = parse_user(name)
    if parsed is not None:
        assert name.isascii() and name.isprintable() and " " not in name
        head, _, tail = name[3:].partition(".")
        assert name.startswith("con") and parsed == (int(head), int(tail) if tail else None)


@pytest.mark.parametrize("name", ["con1\n", "con١", "con1.", "con.1", "con1.2.3", " con1",
                                  "con" + "9" * 10, "CON1"])
def test_odd_user_names_are_nobody(name):
    assert parse_user(name) is None


@pytest.fixture(scope="module")
def srv() -> Iterator[Running]:
    access = FakeAccess(limit=4 * MIB)
    access.add("alice", "apw", 1, [1, 2])
    access.add("bob", "bpw", 2, [3])
    access.rams = {1: FakeRam(8 * MIB), 2: FakeRam(8 * MIB), 3: FakeRam(8 * MIB)}
    with serve(access) as running:
        yield running


COMMANDS = st.one_of(
    st.sampled_from(["nodes", "load 0x100", "load 0x3fffff", "load 0x400000", "load -0x10",
                     "load", "load 0x", "load 0x1 2", "raw x", "tagged tagged", ""]),
    st.text(max_size=200).filter(lambda c: c.strip() not in ("", "raw", "tagged")),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=COMMANDS, data=st.binary(max_size=70_000), user=st.sampled_from(["con1",
                                                                                 "con1.2"]))
def test_any_command_and_stream_ends_with_a_status(srv, command, data, user):
    c = connect(srv.port, user, "apw")
    try:
        t = c.get_transport()
        assert t is not None
        ch = t.open_session(timeout=10)
        ch.exec_command(command.encode("utf-8", "surrogatepass"))
        try:
            ch.sendall(data)
            ch.shutdown_write()
        except (OSError, EOFError, paramiko.SSHException):
            pass  # the server may have answered (and closed) before reading it all
        deadline = time.monotonic() + 30
        while not ch.exit_status_ready():
            assert time.monotonic() < deadline, command
            time.sleep(0.01)
        assert ch.recv_exit_status() in (0, 1, 2)
    finally:
        c.close()
    # bob's node never got any of it
    assert not any(srv.access.rams[3].mem)  # type: ignore[attr-defined]
    assert srv.access.writers[3].got == b""
