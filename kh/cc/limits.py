"""The ssh server's bounds: what any client may cost khd (docs/control-channel.md, "Limits").

kh.cc.gate enforces them; tests pass smaller ones.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """The ssh server's bounds (see docs/control-channel.md, "Limits", for the reasons)."""

    login_timeout: float = 20.0  # s from TCP accept to a successful login
    logins: int = 256  # connections not logged in yet, in all (a file descriptor each)
    logins_per_source: int = 64  # ... from one address
    handshakes: int = 32  # key exchanges/logins in progress (a paramiko thread each)
    handshakes_per_source: int = 8
    slow_handshakes: int = 8  # of them, clients that sent no key exchange of their own
    slow_per_source: int = 2
    ident_wait: float = 2.0  # s a client may wait for ours before it counts as slow
    connections: int = 64  # logged-in connections (a thread each)
    connections_per_principal: int = 16
    channels_per_connection: int = 8
    sessions: int = 128  # open channels in all (a thread each, more while tagged)
    sessions_per_principal: int = 32
    sessions_per_allocation: int = 16
    auth_tries: int = 6  # failed logins on one connection before it is closed
    request_wait: float = 10.0  # s a channel may stay open without a command
    watch_interval: float = 0.5  # s between two looks at every connection
