"""Tokens on real guests (issue 11): a disk server booted with a token and no credential makes
disk nodes with khgetdisk, and its token allocates on disknet only, within its budget, releases
nothing it did not make, and stops working once revoked; khd's console log never shows it.
The node sends it only over the control channel's ssh (api+USER, to the pinned host key): khd's
API on the public domain takes no token, and the node's khget shows khd's own reasons."""

from __future__ import annotations

import json

import pytest

from tests.integration.conftest import credfile, kh, ps, release, wait_free
from tests.integration.test_appliances import (
    USER,
    boot_appliance,
    consoles,
    netid_of,
    ready_line,
    take,
)

pytestmark = [pytest.mark.guest, pytest.mark.scenario]
CRED = "corp1cred"
# One API request over the control channel as the node's khget makes it (the token from the
# boot key, in dbclient's environment; the pinned host key): `CHANNEL release ID`.
CHANNEL = ("c=$(sed -n 's/.*kh[.]channel=\\([^# ]*\\).*/\\1/p' /proc/cmdline); "
           "t=$(sed -n 's/.*kh[.]token=\\([^ ]*\\).*/\\1/p' /proc/cmdline); "
           "echo n | HOME=/etc/kh/channel DROPBEAR_PASSWORD=$t setsid dbclient -T "
           f"-p ${{c##*:}} api+{USER}@${{c%:*}}")


def run(node, command: str, timeout: float = 60) -> tuple[str, int]:  # type: ignore[no-untyped-def]
    return node.run(command, timeout)  # type: ignore[no-any-return]


def test_a_disk_server_with_a_token_makes_disks_and_nothing_else(khd, artifacts):
    wait_free(khd, 3)
    alloc, (ds,), text = take(khd, "-i", "-p", "2", "-c", credfile(CRED), USER, "1")
    disknet, othernet = netid_of(text, 1), netid_of(text, 2)
    r = kh(khd, "token", "add", "-u", USER, "-c", credfile(CRED), "--allocate-on",
           str(disknet), "--max-nodes", "2", "--json")
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)
    token, tid = made["token"], made["id"]
    disks = None
    try:
        with consoles(khd, [ds], artifacts) as cons:
            d = boot_appliance(khd, text, "diskserver", cons, {
                ds: f"kh.user={USER} kh.token={token} kh.disknet={disknet} "
                    "kh.disksize=16M"})[ds]
            assert f"disknet={disknet}" in ready_line(d)
            assert run(d, "grep -c cred= /etc/khgetdisk.conf")[0].strip() == "0"
            # out of its scope: another domain of the principal's, the public domain; khd's
            # own reason, as it came over the channel
            for asked, domain in ((f"-n {othernet}", othernet), ("-i", 1),
                                  (f"-n {disknet} -x", 0)):
                out, status = run(d, f"khget {asked} {USER} 1")
                assert status == 3 and f"khget: token {tid} may not allocate on domain " \
                    f"{domain}" in out, out
            # over its budget of 2 nodes at once
            out, status = run(d, f"khget -n {disknet} {USER} 3", timeout=120)
            assert status == 1 and "over its budget of 2 nodes" in out, out
            # within it: two disk nodes, booted over the channel with the token as password
            out, status = run(d, "khgetdisk 2", timeout=240)
            assert status == 0 and "ready: e1.0 e1.1" in out, out
            disks = [a for a in ps(khd)["allocations"]
                     if a["principal"] == USER and a["id"] > alloc and a["nodes"]]
            assert len(disks) == 1 and len(disks[0]["nodes"]) == 2, ps(khd)
            # the disk server's own allocation (made with the credential) is not the token's
            out, status = run(d, f"{CHANNEL} release {alloc}")
            assert status == 4 and f"has no active allocation {alloc}" in out, out
            assert any(a["id"] == alloc for a in ps(khd)["allocations"])
            # khd's API on the public domain takes no token: the old way is refused, in one line
            out, status = run(d, (
                "s=$(sed -n 's/.*kh[.]server=\\([^ ]*\\).*/\\1/p' /proc/cmdline); "
                "wget -O - --header 'Content-Type: application/json' --post-data "
                f"'{{\"user\": \"{USER}\", \"token\": \"kht_x\"}}' "
                f"http://$s/v1/allocations/{alloc}/release"))
            assert status != 0 and "403" in out, out
            # revoked: refused at once
            r = kh(khd, "token", "rm", "-u", USER, "-c", credfile(CRED), str(tid))
            assert r.returncode == 0, r.stderr
            out, status = run(d, f"khget -n {disknet} {USER} 1")
            assert status == 1 and f"the service refused the login of {USER}" in out, out
            assert len(ps(khd)["allocations"]) == 2  # the disk server's and the disks'
        log = khd.console_log(ds).read_bytes()
        assert token.encode() not in log and b"kh.token=kht_..." in log
    finally:
        if disks:
            release(khd, USER, CRED, disks[0]["id"])
        release(khd, USER, CRED, alloc)
