"""khdo refuses what a node's console would not run as sent, before it connects."""

import socket

from click.testing import CliRunner

from kh.cli import khdo

OBJ = "con12@127.0.0.1\nprotocol: uboot\nnetwork 7 : eth0\nnodeinfo: 3 3 10.7.0.3\nnodes: 3\n"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again: a connection would be refused


def test_write_of_a_line_longer_than_u_boot_takes_fails_with_the_limit():
    r = CliRunner().invoke(khdo.main, ["-p", str(closed_port()), "write", "echo " + "x" * 1095],
                           input=OBJ, env={"KH_CREDENTIAL": "secret-credential"})
    assert r.exit_code != 0
    assert "the line is 1100 bytes; a node's console takes at most 1023" in r.output
    assert "refused" not in r.output  # it never tried to connect
