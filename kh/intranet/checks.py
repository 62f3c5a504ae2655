"""Every arrow of Figure 3, checked from the nodes themselves over the control channel; one
report line each. A check that cannot be run (a node does not answer) is a failed check with
the reason, and the others still run."""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable

from kh.errors import KhError
from kh.intranet import figure3
from kh.intranet.figure3 import Figure
from kh.intranet.outside import OutsideWeb
from kh.intranet.report import Report
from kh.scenario import Allocation, Scenario

SHA = re.compile(r"\b([0-9a-f]{64})\b")
PROBE_TIMEOUT = 240.0  # seconds for a node's probes (all in parallel on the node)


def _sha(text: str) -> str:
    m = SHA.search(text)
    return m[1] if m else "(none)"


def guarded(rep: Report, name: str, fn: Callable[[], tuple[bool, str]]) -> bool:
    """Run one check; a KhError (a node that does not answer, a command refused) fails it."""
    try:
        ok, detail = fn()
    except KhError as e:
        ok, detail = False, f"could not be checked: {e.message}"
    return rep.check(name, ok, detail)


def masqueraded(corp: Scenario, gw: Allocation, dev: str) -> int:
    """Connections GW's MASQUERADE rule for ``dev`` has taken (its packet counter)."""
    out = corp.check(gw, gw.nodes[0], "iptables -t nat -L POSTROUTING -v -n -x")
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 7 and f[2] == "MASQUERADE" and f[6] == dev and f[0].isdigit():
            return int(f[0])
    raise KhError(f"GW has no MASQUERADE rule for {dev}: {out.strip()[-200:]}")


def storage(corp: Scenario, fig: Figure) -> tuple[bool, str]:
    """A worker writes a file; FS holds it on khvg/data (ext3 over the AoE disks) with the same
    sha256; another worker reads it back with it."""
    w1, w2 = fig.workers.nodes[:2]
    fsn = fig.one(fig.fs)
    name = f"hello-{secrets.token_hex(4)}"
    want = _sha(corp.check(fig.workers, w1,
                           f"dd if=/dev/urandom of=/tmp/{name} bs=65536 count=16 2>/dev/null && "
                           f"sha256sum < /tmp/{name} && dd if=/tmp/{name} of=/mnt/nfs/{name} "
                           f"bs=65536 conv=fsync 2>/dev/null"))
    there = corp.check(fig.fs, fsn, f"sha256sum < /export/{name}; "
                                    "grep ' /export ' /proc/mounts; "
                                    "lvm lvs --noheadings -o devices khvg/data")
    back = _sha(corp.check(fig.workers, w2, f"sha256sum < /mnt/nfs/{name}"))
    devices = sorted(set(re.findall(r"/dev/etherd/(e\d+\.\d+)", there)))
    on_lv = re.search(r"^/dev/(?:khvg/data|mapper/khvg-data) /export ext3 ", there,
                      re.M) is not None
    ok = want == _sha(there) == back and on_lv and bool(devices)
    return ok, (f"worker {w1} wrote {name} (1 MiB, sha256 {want[:12]}); FS has it on "
                f"khvg/data{' (ext3 on /export)' if on_lv else ' (NOT the ext3 volume)'} over "
                f"{' '.join(devices) or 'no AoE disk'} with sha256 {_sha(there)[:12]}; "
                f"worker {w2} read back {back[:12]}")


def through_gw(corp: Scenario, fig: Figure, url: str, expect: str, dev: str, what: str
               ) -> tuple[bool, str]:
    """A worker fetches ``url``; the page holds ``expect`` and GW masqueraded it out ``dev``."""
    w1 = fig.workers.nodes[0]
    before = masqueraded(corp, fig.gw, dev)
    page, status = corp.run(fig.workers, w1, f"wget -q -T 20 -O - {url}", 120)
    after = masqueraded(corp, fig.gw, dev)
    got = expect in page
    return (status == 0 and got and after > before,
            f"worker {w1} (pnet only) fetched {what} {url}: "
            f"{'the page' if got else f'no page (wget status {status})'}; "
            f"GW's MASQUERADE out {dev} took {after - before} new connection(s)")


def targets(corp: Scenario, fig: Figure) -> dict[str, str]:
    """Every address of corp1's pnet and disknet: name -> IPv4."""
    gw, fs, ds = fig.one(fig.gw), fig.one(fig.fs), fig.one(fig.ds)
    out = {f"GW's pnet address (node {gw})": fig.ip(fig.pnet, gw),
           f"FS's pnet address (node {fs})": fig.ip(fig.pnet, fs),
           f"FS's disknet address (node {fs})": fig.ip(fig.disknet, fs),
           f"DS's pnet address (node {ds})": fig.ip(fig.pnet, ds),
           f"DS's disknet address (node {ds})": fig.ip(fig.disknet, ds)}
    for w in fig.workers.nodes:
        out[f"worker {w}"] = fig.ip(fig.pnet, w)
    for d in disk_nodes(corp, fig):
        out[f"disk node {d}"] = fig.ip(fig.disknet, d)
    return out


def disk_nodes(corp: Scenario, fig: Figure) -> list[int]:
    """The disk nodes khgetdisk made, from DS's record (``eS.L node N ALLOC`` lines)."""
    rec = corp.check(fig.ds, fig.one(fig.ds), "cat /var/lib/khgetdisk/disks")
    return [int(n) for n in re.findall(r"^e\d+\.\d+ node (\d+) ", rec, re.M)]


def arp_isolated(other: Scenario, fig: Figure, addrs: dict[str, str]) -> tuple[bool, str]:
    """From the other principal's public node: no pnet/disknet address answers ARP there,
    while GW's public address does (the probe works)."""
    web = fig.one(fig.other)
    gw_pub = fig.ip(1, fig.one(fig.gw))
    probes = " ".join(f"{ip}" for ip in [gw_pub, *addrs.values()])
    out = other.check(fig.other, web,
                      f"for t in {probes}; do (arping -q -c 2 -w 4 -I eth0 $t && "
                      f"echo \"ANSWERED $t\") & done; wait", PROBE_TIMEOUT)
    answered = set(re.findall(r"ANSWERED (\S+)", out))
    leaked = [n for n, ip in addrs.items() if ip in answered]
    ok = gw_pub in answered and not leaked
    return ok, (f"from corp2's node {web} on the public domain, "
                f"{'none' if not leaked else ', '.join(leaked)} of {len(addrs)} pnet/disknet "
                f"addresses answered ARP (GW's public address "
                f"{'did' if gw_pub in answered else 'did NOT: the probe is broken'})")


def ip_isolated(other: Scenario, fig: Figure, addrs: dict[str, str]) -> tuple[bool, str]:
    """From the other principal's public node, with routes to pnet and disknet through GW's
    and then DS's public address: nothing answers ping, nor TCP to FS's NFS and rpcbind."""
    web = fig.one(fig.other)
    gw_pub, ds_pub = fig.ip(1, fig.one(fig.gw)), fig.ip(1, fig.one(fig.ds))
    fs_in = fig.ip(fig.pnet, fig.one(fig.fs))
    ips = " ".join(addrs.values())
    leaked: list[str] = []
    for via in (gw_pub, ds_pub):
        cmd = (f"ip route replace 10.{fig.pnet}.0.0/16 via {via} && "
               f"ip route replace 10.{fig.disknet}.0.0/16 via {via} && "
               f"ping -c 1 -W 5 {via} >/dev/null && echo CONTROL; "
               f"for t in {ips}; do (ping -c 2 -W 4 $t >/dev/null 2>&1 && echo \"PING $t\") & "
               f"done; for p in 111 2049; do (nc -w 5 {fs_in} $p </dev/null >/dev/null 2>&1 "
               f"&& echo \"TCP {fs_in}:$p\") & done; wait; "
               f"ip route del 10.{fig.pnet}.0.0/16; ip route del 10.{fig.disknet}.0.0/16")
        out = other.check(fig.other, web, cmd, PROBE_TIMEOUT)
        if "CONTROL" not in out:
            leaked.append(f"(probe broken: {via} did not answer ping)")
        answered = set(re.findall(r"PING (\S+)", out))
        leaked += [f"{n} via {via}" for n, ip in addrs.items() if ip in answered]
        leaked += [f"TCP {t} via {via}" for t in re.findall(r"TCP (\S+)", out)]
    return not leaked, (f"from corp2's node {web}, with routes to pnet and disknet through GW "
                        f"({gw_pub}) and DS ({ds_pub}): "
                        + ("nothing answered ping, nor TCP to FS's rpcbind and NFS"
                           if not leaked else "answered: " + "; ".join(leaked)))


def aoe_seen(sc: Scenario, a: Allocation, node: int) -> list[tuple[str, str]]:
    """(address, interface) of each AoE disk the node discovers."""
    out = sc.check(a, node, "aoe-discover; sleep 3; aoe-stat; true", 120)  # 1: no disk
    return re.findall(r"^\s*(e\d+\.\d+)\s+\S+\s+(eth\d+)", out, re.M)


def disks_on_disknet(corp: Scenario, fig: Figure) -> tuple[bool, str]:
    """The disk nodes' allocations are on disknet alone; FS sees every disk on its disknet
    interface; a worker (pnet) sees none."""
    ps = json.loads(corp.kh("ps", "--json").stdout)
    ours = {fig.gw.id, fig.fs.id, fig.ds.id, fig.workers.id}
    disk_allocs = [a for a in ps["allocations"] if a["id"] not in ours]
    alone = all(a["netids"] == [fig.disknet] for a in disk_allocs) and bool(disk_allocs)
    seen = aoe_seen(corp, fig.fs, fig.one(fig.fs))
    fs_ok = {d for d, _ in seen} >= set(fig.disks) and all(i == "eth1" for _, i in seen)
    w_seen = aoe_seen(corp, fig.workers, fig.workers.nodes[0])
    desc = ", ".join(f"con{a['id']} (nodes {' '.join(map(str, a['nodes']))}) on domains "
                     f"{a['netids']}" for a in disk_allocs)
    return (alone and fs_ok and not w_seen,
            f"disk allocations {desc or 'none'} (disknet = {fig.disknet}); FS sees "
            f"{' '.join(f'{d} on {i}' for d, i in seen) or 'nothing'} (its eth1 = disknet); "
            f"worker {fig.workers.nodes[0]} on pnet sees {len(w_seen)} AoE disks")


def aoe_isolated(other: Scenario, fig: Figure) -> tuple[bool, str]:
    """AoE discovery from the other principal's public node finds none of corp1's disks."""
    seen = aoe_seen(other, fig.other, fig.one(fig.other))
    return not seen, (f"corp2's node {fig.one(fig.other)} ran aoe-discover on the public "
                      f"domain: {' '.join(d for d, _ in seen) or 'no disk answered'}")


def ds_reaches_service(corp: Scenario, fig: Figure) -> tuple[bool, str]:
    out, status = corp.run(fig.ds, fig.one(fig.ds),
                           ". /etc/khgetdisk.conf && echo \"server=$server\" && "
                           "wget -q -T 20 -O - http://$server/v1/status", 120)
    server = re.search(r"server=(\S+)", out)
    line = re.search(r"khd running[^\n]*", out)
    return (status == 0 and line is not None,
            f"DS (node {fig.one(fig.ds)}) asked the service interface at "
            f"{server[1] if server else '?'} over the public domain: "
            f"{line[0] if line else f'no answer (status {status})'}")


def khgetdisk_too_many(corp: Scenario, fig: Figure) -> tuple[bool, str]:
    """khgetdisk asked for one disk more than the service has free nodes says so, and
    allocates, boots and records nothing."""
    dsn = fig.one(fig.ds)
    free = figure3.free_nodes(corp)
    if free is None:
        return False, "the service did not say how many nodes are free"
    held = corp.held()
    record = corp.check(fig.ds, dsn, "cat /var/lib/khgetdisk/disks")
    out, status = corp.run(fig.ds, dsn, f"khgetdisk {free + 1}", 300)
    same = corp.held() == held and corp.check(fig.ds, dsn, "cat /var/lib/khgetdisk/disks") \
        == record
    said = re.search(r"khgetdisk: [^\n]*nothing was allocated", out)
    return (status != 0 and said is not None and same,
            f"khgetdisk {free + 1} with {free} free nodes exited {status}: "
            f"{said[0] if said else out.strip()[-160:]!r}; "
            f"{'nothing changed' if same else 'allocations or the disk record CHANGED'}")


def run_all(corp: Scenario, other: Scenario, rep: Report, fig: Figure, web: OutsideWeb
            ) -> bool:
    """Every arrow, one line each; True when all held."""
    results = [
        guarded(rep, "storage: worker -> NFS (FS) -> LVM2/ext3 -> AoE disks -> another worker",
                lambda: storage(corp, fig)),
        guarded(rep, "pnet -> GW (NAT) -> a web server in the public domain",
                lambda: through_gw(corp, fig, f"http://{fig.ip(1, fig.one(fig.other))}/",
                                   f"<h1>node{fig.one(fig.other)}</h1>", "eth1",
                                   "corp2's public web server")),
        guarded(rep, "pnet -> GW (NAT) -> a web server in the outside world",
                lambda: through_gw(corp, fig, web.url, web.nonce, "eth0",
                                   "the outside world's web server")),
        guarded(rep, "DS -> the service interface", lambda: ds_reaches_service(corp, fig)),
        guarded(rep, "disk nodes exist only on disknet",
                lambda: disks_on_disknet(corp, fig)),
        guarded(rep, "DS: khgetdisk for more disks than free nodes changes nothing",
                lambda: khgetdisk_too_many(corp, fig)),
    ]
    try:
        addrs = targets(corp, fig)
    except KhError as e:
        return rep.check("public domain -/-> pnet, disknet", False,
                         f"could not list corp1's addresses: {e.message}") and False
    results += [
        guarded(rep, "public domain -/-> pnet, disknet (ARP)",
                lambda: arp_isolated(other, fig, addrs)),
        guarded(rep, "public domain -/-> pnet, disknet (IP, TCP)",
                lambda: ip_isolated(other, fig, addrs)),
        guarded(rep, "public domain -/-> disknet (AoE discovery)",
                lambda: aoe_isolated(other, fig)),
    ]
    return all(results)
