"""The control channel's host key, pinned on a real node (issue 11, item 3): khd's kh.channel
boot key carries its ssh host key, the node's kh-boot.sh writes it where dbclient looks, and the
node's own dbclient (dropbear 2022.83, as built for the root) logs in to khd's channel with it and
refuses a channel whose key is another, before any login; so does the in-node khget, which sends
its secret only over that channel."""

from __future__ import annotations

import paramiko
import pytest

from kh.allocation import host_address
from kh.model import PUBLIC
from tests.integration.conftest import credfile, ps, release, wait_free
from tests.integration.test_appliances import boot_appliance, consoles, ok, take

pytestmark = [pytest.mark.guest]
USER, CRED = "pinner", "pinnercred"


def test_the_nodes_dbclient_talks_only_to_the_pinned_channel(khd, artifacts):
    wait_free(khd, 1)
    alloc, (n,), text = take(khd, "-i", "-c", credfile(CRED), USER, "1")
    service = host_address(PUBLIC).ip
    try:
        with consoles(khd, [n], artifacts) as cons:
            d = boot_appliance(khd, text, "diskserver", cons, cred=CRED)[n]
            key = paramiko.RSAKey.from_private_key_file(str(khd.host_key))
            known = ok(d, "cat /etc/kh/channel/.ssh/known_hosts")
            assert known.strip() == f"{service} ssh-rsa {key.get_base64()}"
            session = (f"DROPBEAR_PASSWORD={CRED} setsid dbclient -T -p {khd.ssh_port} "
                       f"con{alloc}@{service} nodes </dev/null")
            # (dbclient may first say it waits for the kernel's randomness, on stderr)
            assert ok(d, f"HOME=/etc/kh/channel {session}").splitlines()[-1] == str(n)
            other = paramiko.RSAKey.generate(2048)
            out, status = d.run(
                f"mkdir -p /tmp/other/.ssh && echo '{service} ssh-rsa {other.get_base64()}' "
                f">/tmp/other/.ssh/known_hosts && HOME=/tmp/other {session}", 60)
            assert status != 0 and "host key mismatch" in out, out
            # the in-node khget sends its credential only to the pinned key: with another
            # pinned it leaves before any login (and allocates nothing)
            held = len(ps(khd)["allocations"])
            out, status = d.run(f"KH_CHANNEL_HOME=/tmp/other khget -c {CRED} {USER} 1", 60)
            assert status == 1 and "showed a host key other than the pinned one" in out, out
            assert len(ps(khd)["allocations"]) == held
    finally:
        release(khd, USER, CRED, alloc)
