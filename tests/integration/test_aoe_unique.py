"""AoE addresses are unique per domain, on real guests (issue 11, finding 4).

Seen before: two vblade nodes both served e1.0 in one domain, and the file server then failed
to build its volume with no word of why. Now a vblade node refuses an address that already
answers (naming the MAC that answers), the file server names an address two disks answer
(with both MACs), and khgetdisk's addresses come from the service: two disk servers on one
disknet hand out distinct ones, and skip one that a disk booted by hand answers."""

from __future__ import annotations

import json
import re

import pytest

from kh import boot
from kh.errors import BootError
from kh.hw import uboot
from kh.hw.console import Console
from kh.service.config import ServiceConfig
from tests.integration.conftest import credfile, kh, ps, release, wait_free
from tests.integration.test_appliances import consoles, netid_of, ok, ready_line, take
from tests.integration.test_channel import khdo
from tests.unit.fake_khd import post, text_of

pytestmark = [pytest.mark.guest, pytest.mark.scenario]
USER, CRED = "disks1", "disks1cred"


def load(cfg: ServiceConfig, text: str, appliance: str) -> None:
    """The kernel and ``appliance`` into every node of an allocation (Listing 1)."""
    for what, image in (("loadkernel", "uImage"), ("loadramdisk", f"{appliance}.cpio.gz.uimg")):
        r = khdo(cfg, text, what, str(cfg.images / image), cred=CRED)
        assert r.returncode == 0, r.stderr


def kboot(con: Console, keys: str, timeout: float = 120) -> boot.BootedNode:
    """One node, loaded already: its own keys, then `run kboot` to the appliance's ready line
    (BootError carrying its kh-failed line if it fails)."""
    uboot.uboot_command(con, f'setenv khargs "${{khargs}} {keys}"')
    return boot.BootedNode(con, uboot.run_kboot(con, timeout))


def mac_of(node: boot.BootedNode, iface: str = "eth0") -> str:
    return ok(node, f"cat /sys/class/net/{iface}/address").strip()


def addresses(cfg: ServiceConfig, netid: int) -> list[tuple[str, int]]:
    """The service's record: (address, node) of the principal's disks in ``netid``."""
    status, resp = post(cfg.socket, "/v1/aoe/addresses/list?format=json", json.dumps(
        {"user": USER, "credential": CRED, "netid": netid}).encode())
    assert status == 200, resp
    return [(a["address"], a["node"]) for a in json.loads(text_of(resp))]


def test_an_answered_address_is_refused_and_a_duplicate_is_named(khd, artifacts):
    wait_free(khd, 4)
    da, (first, second, third), dtext = take(khd, "-p", "1", "-c", credfile(CRED), USER, "3")
    disknet = netid_of(dtext, 0)
    fa, (fs,), ftext = take(khd, "-n", str(disknet), "-c", credfile(CRED), USER, "1")
    try:
        with consoles(khd, [first, second, third, fs], artifacts) as cons:
            load(khd, dtext, "vblade")
            # Slot 255 is AoE's broadcast slot (a disk there would answer for every slot).
            with pytest.raises(BootError, match=r"kh.aoe=1\.255 is missing or malformed"):
                kboot(cons[third], "kh.aoe=1.255 kh.disksize=16M")
            d1 = kboot(cons[first], "kh.aoe=1.0 kh.disksize=16M")
            assert "aoe=e1.0" in ready_line(d1)
            mac1 = mac_of(d1)
            # The second disk on e1.0 refuses, naming the MAC that answers there ...
            refused = (rf"appliance failed: vblade node{second}: AoE address e1\.0 already "
                       rf"answered by MAC {re.escape(mac1)}")
            with pytest.raises(BootError, match=refused):
                kboot(cons[second], "kh.aoe=1.0 kh.disksize=16M")
            # ... and leaves a shell, where vblade is started by hand on e1.0 all the same:
            # two disks now answer e1.0, as two nodes booted at the same moment could.
            d2 = boot.BootedNode(cons[second], "vblade")
            mac2 = mac_of(d2)
            ok(d2, "mkdir -p /disk && mount -t tmpfs -o size=20m tmpfs /disk && "
                   "truncate -s 16M /disk/ram.img && "
                   "(setsid vblade 1 0 eth0 /disk/ram.img >/tmp/v.log 2>&1 &) && "
                   "for i in $(seq 50); do grep -q sectors /tmp/v.log && break; sleep 0.2; done; "
                   "grep sectors /tmp/v.log")
            # The file server does not build a volume over them, and says which address two
            # disks answer, with both MACs.
            load(khd, ftext, "fileserver")
            named = (r"appliance failed: fileserver [^:]*: could not build the volume: AoE "
                     r"address e1\.0 is answered by 2 disks")
            with pytest.raises(BootError, match=named) as e:
                kboot(cons[fs], "kh.export=eth0 kh.aoeif=eth0", timeout=300)
            assert mac1 in e.value.message and mac2 in e.value.message, e.value.message
    finally:
        release(khd, USER, CRED, fa)
        release(khd, USER, CRED, da)


def test_two_disk_servers_hand_out_distinct_addresses(khd, artifacts):
    wait_free(khd, 5)
    # Disk server 1: the public domain (the service) and a new disknet; a disk booted by hand
    # on e1.0 there; disk server 2: the public domain and the same disknet.
    a1, (ds1,), t1 = take(khd, "-i", "-p", "1", "-c", credfile(CRED), USER, "1")
    disknet = netid_of(t1, 1)
    am, (manual,), tm = take(khd, "-n", str(disknet), "-c", credfile(CRED), USER, "1")
    a2, (ds2,), t2 = take(khd, "-i", "-n", str(disknet), "-c", credfile(CRED), USER, "1")
    held: list[int] = []
    try:
        with consoles(khd, [ds1, manual, ds2], artifacts) as cons:
            load(khd, tm, "vblade")
            assert "aoe=e1.0" in ready_line(kboot(cons[manual], "kh.aoe=1.0 kh.disksize=16M"))
            servers = {}
            for n, text in ((ds1, t1), (ds2, t2)):
                load(khd, text, "diskserver")
                servers[n] = kboot(cons[n], f"kh.user={USER} kh.token={token(khd, disknet)} "
                                            "kh.disksize=16M")
                assert f"disknet={disknet}" in ready_line(servers[n])
            # e1.0 answers already: the service skips it; then each run gets its own address.
            out1 = ok(servers[ds1], "khgetdisk 1", timeout=300)
            assert "ready: e1.1" in out1, out1
            out2 = ok(servers[ds2], "khgetdisk 1", timeout=300)
            assert "ready: e1.2" in out2, out2
            mine = [a["id"] for a in _allocations(khd) if a["id"] > a2]
            held = mine
            assert len(mine) == 2, mine
            got = addresses(khd, disknet)
            assert [a for a, _ in got] == ["e1.1", "e1.2"], got
            # Every address has one disk behind it: on disknet (the disk server's eth1) each
            # of the three answers from one MAC, as aoe-sancheck sees the network.
            seen = ok(servers[ds1], "aoe-sancheck -v | sed -n '/^eth1:$/,/^$/p'", timeout=120)
            answers = re.findall(r"^(e\d+\.\d+) ([0-9a-f]{12}) ", seen, re.M)
            assert sorted(a for a, _ in answers) == ["e1.0", "e1.1", "e1.2"], seen
            assert len({m for _, m in answers}) == 3, seen
            # A released disk node's address is free again.
            release(khd, USER, CRED, mine[0])
            held = mine[1:]
            assert [a for a, _ in addresses(khd, disknet)] == ["e1.2"]
    finally:
        for a in [*held, a2, am, a1]:
            release(khd, USER, CRED, a)


def token(cfg: ServiceConfig, netid: int) -> str:
    """A token of the principal's that allocates on ``netid`` (what a disk server holds)."""
    made = kh(cfg, "token", "add", "-u", USER, "-c", credfile(CRED), "--allocate-on", str(netid))
    assert made.returncode == 0, made.stderr
    return made.stdout.splitlines()[0]


def _allocations(cfg: ServiceConfig) -> list[dict]:
    return [a for a in ps(cfg)["allocations"] if a["principal"] == USER and a["nodes"]]
