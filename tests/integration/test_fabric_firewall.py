"""The host as real nodes see it (issue 11, findings 1 and 6): a node in a private domain only
gets no ARP answer for either of kh's addresses and reaches nothing of the host; a node in the
external domain (eth0, its default route; eth1 is private) gets its gateway's ARP answer but
not the API. The host-side proof, frame
by frame, is tests/unit/test_fabric_firewall.py."""

from __future__ import annotations

import pytest

from tests.integration.conftest import allocate, credfile, release, shell, wait_free

pytestmark = pytest.mark.guest


def test_private_and_external_nodes_get_nothing_of_the_service(khd, artifacts):
    wait_free(khd, 2)
    p_alloc, (p_node,), p_lines = allocate(khd, "-c", credfile("fw1"), "fwpat", "1")
    x_alloc, (x_node,), x_lines = allocate(khd, "-c", credfile("fw1"), "fwpat", "-x")
    try:
        assert p_lines[2].startswith("network ") and "External" not in p_lines[2]
        assert x_lines[2] == "network External : eth0"  # its way out: the gateway on eth0
        p, x = shell(khd, p_node, artifacts), shell(khd, x_node, artifacts)
        # the private node takes addresses in both of kh's subnets, so it would be answered
        # if the host were there at all
        for cmd in ("ip addr add 10.1.0.250/16 dev eth0", "ip addr add 10.0.0.250/16 dev eth0"):
            out, status = p.run(cmd)
            assert status == 0, out
        api = f"http://10.1.255.254:{khd.api_port}/v1/ps"
        for addr in ("10.1.255.254", "10.0.255.254"):
            out, status = p.run(f"arping -c 2 -w 3 -I eth0 {addr}")
            assert status != 0 and "Received 0 response" in out, out
            out, status = p.run(f"ping -c 1 -W 2 {addr}")
            assert status != 0, out
        out, status = p.run(f"wget -q -T 3 -O - {api}")
        assert status != 0 and "HTTP" not in out, out
        # the external node: its gateway answers ARP (it needs it), the service does not
        out, status = x.run("arping -c 2 -w 3 -I eth0 10.0.255.254")
        assert status == 0 and "Received 2 response" in out, out
        out, status = x.run(f"wget -q -T 3 -O - {api}")
        assert status != 0 and "HTTP" not in out, out
        out, status = x.run("ping -c 1 -W 2 10.0.255.254")
        assert status != 0, out
    finally:
        release(khd, "fwpat", "fw1", p_alloc)
        release(khd, "fwpat", "fw1", x_alloc)
