"""Local users are told apart on loopback by the kernel's word (kh.peer), not by an address
they choose: an attacker on the host took every other local user's share of khd's per-source
limits, since all of loopback was one source."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import pytest

from kh import admission, peer
from tests.unit.as_user import NOBODY, connect_as, needs_root


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s


@pytest.mark.parametrize("source", ["127.0.0.1", "127.0.0.9"])
def test_a_loopback_peer_is_the_user_owning_its_socket(listener, source):
    with socket.socket() as c:
        c.bind((source, 0))
        c.connect(listener.getsockname())
        a, addr = listener.accept()
        with a:
            assert peer.loopback_peer_uid(a) == os.geteuid()
            assert admission.source_of_peer(a, addr[0]) == f"loopback:uid={os.geteuid()}"


def test_another_user_is_another_source(listener):
    needs_root()
    c = connect_as(NOBODY, listener.getsockname(), "127.0.0.2")
    a, addr = listener.accept()
    with a, c:
        assert peer.loopback_peer_uid(a) == NOBODY
        assert admission.source_of_peer(a, addr[0]) == f"loopback:uid={NOBODY}"


def test_a_peer_that_has_gone_is_plain_loopback(listener):
    """A closed peer has no owner left (at most a TIME_WAIT remnant): it is plain loopback,
    never the uid a remnant might report."""
    c = socket.create_connection(listener.getsockname())
    a, addr = listener.accept()
    with a:
        c.close()
        a.recv(1)  # the peer's FIN has arrived
        a.shutdown(socket.SHUT_WR)  # our FIN: the peer's socket goes to TIME_WAIT
        deadline = time.monotonic() + 5
        while peer.loopback_peer_uid(a) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert peer.loopback_peer_uid(a) is None
        assert admission.source_of_peer(a, addr[0]) == "loopback"


def test_a_fabric_address_is_its_own_source():
    a, b = socket.socketpair()
    with a, b:  # not asked of the kernel: the address is the source
        assert admission.source_of_peer(a, "10.1.0.4") == "10.1.0.4"
