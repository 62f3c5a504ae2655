"""The paper's appliances on real guests: apache, gateway, vblade, fileserver + worker,
diskserver (Figure 3's intranet, piece by piece)."""

from __future__ import annotations

import hashlib
import re
import subprocess
import zlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from kh import boot, textobj
from kh.allocation import node_address
from kh.errors import BootError
from kh.hw import netns, uboot
from kh.hw.console import Console
from kh.model import EXTERNAL, PUBLIC
from kh.service.config import ServiceConfig
from tests.integration.conftest import allocate, credfile, kh, ps, release, wait_free
from tests.integration.test_channel import khdo

pytestmark = [pytest.mark.guest, pytest.mark.scenario]
USER, CRED = "corp1", "corp1cred"
DISK_MB = 96  # two AoE disks hold the full root (about 90 MB) with room to spare


@contextmanager
def consoles(cfg: ServiceConfig, nodes: list[int], artifacts: Path) -> Iterator[dict[int, Console]]:
    with ExitStack() as stack:
        out = {}
        for n in nodes:
            con = stack.enter_context(Console(cfg.node_dir(n) / "console.sock",
                                              artifacts / f"node{n}.console.log",
                                              name=f"node{n}"))
            con.connect(5)
            out[n] = con
        yield out


def take(cfg: ServiceConfig, *args: str) -> tuple[int, list[int], str]:
    """khget ARGS: the allocation, its nodes and the text object khdo reads."""
    alloc, nodes, lines = allocate(cfg, *args)
    return alloc, nodes, "\n".join(lines) + "\n"


def ip(netid: int, node: int) -> str:
    return str(node_address(netid, node).ip)


def boot_appliance(cfg: ServiceConfig, text: str, appliance: str, cons: dict[int, Console],
                   keys: dict[int, str] | None = None, cred: str = CRED, timeout: float = 60
                   ) -> dict[int, boot.BootedNode]:
    """Listing 1 with an appliance: kernel and ramdisk over the control channel, then each
    node's own keys at its U-Boot prompt and `run kboot`; every node's ready line."""
    for what, image in (("loadkernel", "uImage"),
                        ("loadramdisk", f"{appliance}.cpio.gz.uimg")):
        r = khdo(cfg, text, what, str(cfg.images / image), cred=cred)
        assert r.returncode == 0, r.stderr
    booted = {}
    for n, con in cons.items():
        extra = (keys or {}).get(n)
        if extra:
            uboot.uboot_command(con, f'setenv khargs "${{khargs}} {extra}"')
        booted[n] = boot.BootedNode(con, uboot.run_kboot(con, timeout))
        assert booted[n].appliance == appliance
    return booted


def ready_line(node: boot.BootedNode) -> str:
    m = re.findall(rb"kh-ready: [^\r\n]*", node.console.text())
    return m[-1].decode() if m else ""


def ok(node: boot.BootedNode, command: str, timeout: float = 60) -> str:
    out, status = node.run(command, timeout)
    assert status == 0, f"{command!r} exited {status}: {out}"
    return out


def netid_of(text: str, iface: int) -> int:
    """The private domain behind eth<iface> in a khget text object."""
    domain = textobj.parse(text).domains[iface]
    assert domain is not None, text
    return domain.netid


def test_apache_answers_200_with_its_node_name(khd, artifacts):
    wait_free(khd, 1)
    # In the external domain, so the principal's host (the test's outside world) can fetch.
    alloc, nodes, text = take(khd, "-x", "-c", credfile(CRED), USER, "1")
    with consoles(khd, nodes, artifacts) as cons:
        (web,) = boot_appliance(khd, text, "apache", cons).values()
        assert "apache" in ready_line(web)
        r = khdo(khd, text, "peripcmd", "wget -S -q -T 10 -O - http://%ip%/", cred=CRED)
        assert r.returncode == 0, r.stderr
        assert "200 OK" in r.stderr and f"node{nodes[0]}" in r.stderr, r.stderr
        assert "Server: Apache" in r.stderr
    release(khd, USER, CRED, alloc)


def test_gateway_forwards_out_of_pnet_and_not_back_in(khd, artifacts):
    wait_free(khd, 3)
    # The gateway: public domain + a new private domain (pnet), as in Figure 3 (without -x).
    ga, (gw,), gtext = take(khd, "-i", "-p", "1", "-c", credfile(CRED), USER, "1")
    pnet = netid_of(gtext, 1)
    pa, (inner,), ptext = take(khd, "-n", str(pnet), "-c", credfile(CRED), USER, "1")
    # A server on the public domain, of another principal.
    sa, (server,), stext = take(khd, "-i", "-c", credfile("othercred"), "other", "1")
    gw_pnet, gw_pub = ip(pnet, gw), ip(PUBLIC, gw)
    srv_pub, inner_ip = ip(PUBLIC, server), ip(pnet, inner)
    with consoles(khd, [gw, inner, server], artifacts) as cons:
        g = boot_appliance(khd, gtext, "gateway", {gw: cons[gw]})[gw]
        assert "inside=eth1 nat=eth0" in ready_line(g)
        i = boot_appliance(khd, ptext, "shell", {inner: cons[inner]},
                           {inner: f"kh.gw={gw_pnet}"})[inner]
        s = boot_appliance(khd, stext, "shell", {server: cons[server]}, cred="othercred")[server]
        # Out: the pnet node fetches the public server's page through the gateway ...
        page = ok(i, f"wget -q -T 10 -O - http://{srv_pub}/")
        assert f"<h1>node{server}</h1>" in page
        # In: even with a route to pnet through the gateway, the server cannot open a
        # connection to the pnet node, nor ping it.
        ok(s, f"ip route add 10.{pnet}.0.0/16 via {gw_pub}")
        out, status = s.run(f"wget -q -T 5 -O - http://{inner_ip}/", 30)
        assert status != 0, out
        out, status = s.run(f"ping -c 2 -W 2 {inner_ip}", 30)
        assert status != 0, out
        # The gateway counted the refused packets in its FORWARD policy.
        assert "DROP" in ok(g, "iptables -L FORWARD -n")
    release(khd, USER, CRED, pa)
    release(khd, USER, CRED, ga)
    release(khd, "other", "othercred", sa)


def test_vblade_disk_is_seen_written_and_read_back(khd, artifacts):
    wait_free(khd, 2)
    alloc, nodes, text = take(khd, "-p", "1", "-c", credfile(CRED), USER, "2")
    disk, reader = nodes
    with consoles(khd, nodes, artifacts) as cons:
        d = boot_appliance(khd, text, "vblade", {disk: cons[disk]},
                           {disk: "kh.aoe=3.7 kh.disksize=16M"})[disk]
        assert "aoe=e3.7" in ready_line(d)
        r = boot_appliance(khd, text, "worker", {reader: cons[reader]})[reader]
        # the disk answers a moment after discovery: aoe-stat until it lists it (10 s at most)
        ok(r, "aoe-discover; for i in $(seq 50); do aoe-stat | grep -q '^ *e3\\.7 ' && break; "
              "sleep 0.2; done")
        stat = ok(r, "aoe-stat")
        assert re.search(r"e3\.7\s+0\.016GB\s+eth0 .* up", stat), stat
        ok(r, "dd if=/dev/urandom of=/tmp/blob bs=1k count=512 2>/dev/null")
        want = ok(r, "cksum < /tmp/blob").split()[0]
        ok(r, "dd if=/tmp/blob of=/dev/etherd/e3.7 bs=1k seek=1024 conv=fsync 2>/dev/null")
        ok(r, "echo 3 > /proc/sys/vm/drop_caches")
        got = ok(r, "dd if=/dev/etherd/e3.7 bs=1k skip=1024 count=512 2>/dev/null | cksum")
        assert got.split()[0] == want
        # The bytes are in the disk node's RAM, where vblade keeps the disk.
        there = ok(d, "dd if=/disk/ram.img bs=1k skip=1024 count=512 2>/dev/null | cksum")
        assert there.split()[0] == want
    release(khd, USER, CRED, alloc)


def test_fileserver_pools_two_disks_a_worker_writes_and_a_node_boots_the_full_root(khd, artifacts):
    wait_free(khd, 5)
    # The file server: the public domain (eth0: the service, for the root image), pnet (eth1)
    # and disknet (eth2), both new.
    fa, (fs,), ftext = take(khd, "-i", "-p", "2", "-c", credfile(CRED), USER, "1")
    pnet, disknet = netid_of(ftext, 1), netid_of(ftext, 2)
    da, disks, dtext = take(khd, "-n", str(disknet), "-c", credfile(CRED), USER, "2")
    wa, (worker,), wtext = take(khd, "-n", str(pnet), "-c", credfile(CRED), USER, "1")
    fs_ip = ip(pnet, fs)
    with consoles(khd, [fs, *disks, worker], artifacts) as cons:
        boot_appliance(khd, dtext, "vblade", {n: cons[n] for n in disks},
                       {n: f"kh.aoe=1.{i} kh.disksize={DISK_MB}M" for i, n in enumerate(disks)})
        f = boot_appliance(khd, ftext, "fileserver", {fs: cons[fs]},
                           {fs: "kh.disks=2 kh.export=eth1 kh.aoeif=eth2 "
                                "kh.rootimage=root.tar.gz"}, timeout=600)[fs]
        line = ready_line(f)
        assert f"export=10.{pnet}.0.0/16:/export" in line and "disks=2" in line, line
        vgs = ok(f, "lvm vgs --noheadings -o pv_count,vg_name")
        assert vgs.split() == ["2", "khvg"], vgs
        assert "ext3" in ok(f, "grep ' /export ' /proc/mounts")
        size = int(ok(f, "df -m /export | awk 'NR == 2 {print $2}'").strip())
        assert size > DISK_MB, size  # spans both disks
        # The full root was unpacked whole: the same file count as the published tree.
        files = sum(1 for _ in (khd.images / "root").rglob("*"))
        got = int(ok(f, "find /export/root | wc -l").strip())
        assert got == files + 2, (got, files)  # + the directory itself and its .kh-image stamp
        w = boot_appliance(khd, wtext, "worker", {worker: cons[worker]},
                           {worker: f"kh.nfs={fs_ip}:/export"})[worker]
        ok(w, "dd if=/dev/urandom of=/mnt/nfs/hello bs=1k count=256 2>/dev/null && sync")
        want = ok(w, "cksum < /mnt/nfs/hello").split()[0]
        assert ok(f, "cksum < /export/hello").split()[0] == want
        ok(w, "umount /mnt/nfs && mount.nfs " + f"{fs_ip}:/export /mnt/nfs -o nolock,vers=3")
        assert ok(w, "cksum < /mnt/nfs/hello").split()[0] == want
        # The paper's general-purpose servers, first approach: the full root on the file
        # server, booted read-only over NFS by another node with the root's own init.
        na, (nr,), ntext = take(khd, "-n", str(pnet), "-c", credfile(CRED), USER, "1")
        with consoles(khd, [nr], artifacts) as ncons:
            boot_appliance(khd, ntext, "nfsroot", ncons, {nr: f"kh.nfsroot={fs_ip}:/export/root"})
            ncons[nr].expect(re.compile(rb"kh-ready: server node\d+ [^\r\n]*root=(\S+)\r?\n"), 120,
                             stage="the full root's own init (rcS)")
            booted = boot.BootedNode(ncons[nr], "nfsroot")
            assert f"{fs_ip}:/export/root" in ok(booted, "grep ' / ' /proc/mounts")
            # The general-purpose userland, not busybox: bash, GNU coreutils, Python.
            assert "GNU bash" in ok(booted, "echo $BASH_VERSION; bash --version | head -n 1")
            assert "GNU coreutils" in ok(booted, "ls --version | head -n 1")
            assert "VIM - Vi IMproved 9.0" in ok(booted, "vim --version | head -n 1")
            py = ok(booted, "python3 -c 'import sys, json, zlib, hashlib, lzma, bz2, ctypes, ssl; "
                            "print(sys.platform, sys.byteorder, ssl.OPENSSL_VERSION, json.dumps(["
                            "hashlib.sha256(b\"kh\").hexdigest()[:8], zlib.crc32(b\"kh\")]))'",
                    180)
            assert "linux big OpenSSL 3.0" in py, py
            assert f'["{hashlib.sha256(b"kh").hexdigest()[:8]}", {zlib.crc32(b"kh")}]' in py, py
            ok(booted, "echo written > /etc/in-ram")  # the writable parts are in RAM ...
            out, status = booted.run("touch /usr/not-here", 30)  # ... the rest is read-only
            assert status != 0, out
        assert ok(f, "ls /export/root/etc/in-ram || echo absent").strip().endswith("absent")
        release(khd, USER, CRED, na)
    for a in (wa, da, fa):
        release(khd, USER, CRED, a)


def test_diskserver_makes_two_disk_nodes_from_inside(khd, artifacts):
    wait_free(khd, 3)
    # The disk server: public (for the service interface) and a new disknet.
    alloc, (ds,), text = take(khd, "-i", "-p", "1", "-c", credfile(CRED), USER, "1")
    disknet = netid_of(text, 1)
    # a token for disknet, never the credential (kh.service.tokens; tests/integration/test_token)
    made = kh(khd, "token", "add", "-u", USER, "-c", credfile(CRED), "--allocate-on",
              str(disknet))
    assert made.returncode == 0, made.stderr
    token = made.stdout.splitlines()[0]
    with consoles(khd, [ds], artifacts) as cons:
        d = boot_appliance(khd, text, "diskserver", cons,
                           {ds: f"kh.user={USER} kh.token={token} kh.disksize=16M"})[ds]
        assert f"disknet={disknet}" in ready_line(d)
        out = ok(d, "khgetdisk 2", timeout=180)
        assert "ready: e1.0 e1.1" in out, out
        assert "e1.0" in ok(d, "aoe-stat") and "e1.1" in ok(d, "aoe-stat")
        recorded = ok(d, "cat /var/lib/khgetdisk/disks")
        assert recorded.count("\n") >= 2 and "e1.0 node" in recorded
    mine = [a for a in ps(khd)["allocations"]
            if a["principal"] == USER and a["id"] > alloc and a["nodes"]]
    assert len(mine) == 1 and len(mine[0]["nodes"]) == 2, ps(khd)
    release(khd, USER, CRED, mine[0]["id"])
    release(khd, USER, CRED, alloc)


def test_a_malformed_appliance_key_is_named_and_leaves_a_shell(khd, artifacts):
    wait_free(khd, 1)
    alloc, nodes, text = take(khd, "-p", "1", "-c", credfile(CRED), USER, "1")
    with consoles(khd, nodes, artifacts) as cons:
        with pytest.raises(BootError, match=r"kh.aoe=12\.x is missing or malformed"):
            boot_appliance(khd, text, "vblade", cons, {nodes[0]: "kh.aoe=12.x"})
        # ... and the node has a shell for the principal.
        node = boot.BootedNode(cons[nodes[0]], "vblade")
        assert ok(node, "echo alive").strip() == "alive"
    release(khd, USER, CRED, alloc)


def test_a_principal_logs_into_a_worker_over_ssh(khd, artifacts, tmp_path, outside):
    wait_free(khd, 1)
    for name in ("key", "other"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                        str(tmp_path / name)], check=True)
    kind, b64 = (tmp_path / "key.pub").read_text().split()[:2]
    alloc, (node,), text = take(khd, "-x", "-c", credfile(CRED), USER, "1")
    addr = ip(EXTERNAL, node)
    with consoles(khd, [node], artifacts) as cons:
        w = boot_appliance(khd, text, "worker", cons, {node: f"kh.sshkey={kind}:{b64}"})[node]
        assert "ssh=22" in ready_line(w)

        def ssh(key: str) -> subprocess.CompletedProcess[str]:
            # Stock OpenSSH from the principal's side: the test's outside world.
            return subprocess.run(
                [*netns.enter_argv(outside), "ssh", "-i", str(tmp_path / key),
                 "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                 "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=20",
                 f"root@{addr}", "uname -m; hostname"],
                capture_output=True, text=True, timeout=120)
        r = ssh("key")
        assert r.returncode == 0 and "ppc" in r.stdout and f"node{node}" in r.stdout, r
        assert ssh("other").returncode != 0
    release(khd, USER, CRED, alloc)
