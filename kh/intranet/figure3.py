"""Figure 3 brought up with the paper's own commands, through kh.scenario (khget, khdo, the
control channel, kh token): GW, FS, DS, DS's disk nodes (``khgetdisk`` inside DS), workers,
and a node of another principal on the public domain (a web server there, and the place the
isolation checks look in from)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from kh.allocation import node_address
from kh.errors import KhError
from kh.intranet.report import Report
from kh.scenario import Allocation, Scenario

CREDFILE = "./{user}cred"  # the paper's -c ./corp1cred, in the working directory
BOOT_TIMEOUT = 600.0  # seconds from `run kboot` to a ready line (a loaded 2-core host)
KHGETDISK_TIMEOUT = 900.0  # seconds for khgetdisk N (images over the channel, N boots)
# FS gives a disk that stopped answering up after this long (kh.aoedead; the driver's default
# is 180 s): its I/O fails and LVM sees its PV missing, instead of every I/O waiting on it.
AOE_DEAD = 60


@dataclass(frozen=True)
class Plan:
    """How big: disks and workers at first and added by the growth, each disk's size."""

    disks: int = 2
    workers: int = 2
    grow_disks: int = 2
    grow_workers: int = 2
    disk_size: str = "96M"
    grow: bool = True

    @property
    def nodes(self) -> int:
        """Nodes the whole run holds at its peak (GW, FS, DS, the other principal's)."""
        more = self.grow_disks + self.grow_workers if self.grow else 0
        return 4 + self.disks + self.workers + more


@dataclass
class Made:
    """What the run made besides allocations (which kh.scenario releases), for the teardown:
    private domains and the disk server's token, each with its principal, in the order made;
    ``before``: each principal's private domains when the run began (never removed), so that
    a domain a step made but could not record (a khget interrupted) goes as well."""

    domains: list[tuple[str, int]] = field(default_factory=list)
    tokens: list[tuple[str, int]] = field(default_factory=list)
    before: dict[str, set[int]] | None = None

    def domain(self, sc: Scenario, netid: int) -> None:
        self.domains.append((sc.principal.user, netid))


def holdings(sc: Scenario) -> tuple[set[int], set[int]]:
    """The principal's live allocations and private domains (one kh ps -u); none for a
    principal khd does not know."""
    r = sc.kh("ps", "--json", check=False)
    if r.returncode:
        return set(), set()
    view = json.loads(r.stdout)
    return ({a["id"] for a in view["allocations"]},
            {d["netid"] for d in view["domains"]
             if d["kind"] == "private" and d["owner"] == sc.principal.user})


@dataclass(frozen=True)
class Figure:
    """The intranet once up: its allocations (one node each but the workers') and domains."""

    gw: Allocation
    fs: Allocation
    ds: Allocation
    workers: Allocation
    other: Allocation  # another principal's node on the public domain
    pnet: int
    disknet: int
    disks: tuple[str, ...]  # AoE addresses khgetdisk made (e1.0, ...)

    @staticmethod
    def one(a: Allocation) -> int:
        return a.nodes[0]

    def ip(self, netid: int, node: int) -> str:
        return str(node_address(netid, node).ip)


def credfile(user: str) -> str:
    return CREDFILE.format(user=user)


def khget(sc: Scenario, rep: Report, var: str, *opts: str, count: int = 1) -> Allocation:
    """The paper's ``var=$(khget OPTS -c ./USERcred USER COUNT)``, echoed as typed."""
    user = sc.principal.user
    rep.command(f"{var}=$(khget {' '.join(opts)}{' ' if opts else ''}-c {credfile(user)} "
                f"{user} {count})")
    a = sc.khget(*opts, count=count)
    rep.facts.setdefault("allocations", {}).setdefault(user, []).append(a.id)
    names = {0: "external", 1: "public"}
    nets = ", ".join(f"eth{i}={names.get(d.netid, d.netid)}"
                     for i, d in enumerate(a.info.domains) if d is not None)
    rep.say(f"    con{a.id}: node{'s' if len(a.nodes) > 1 else ''} "
            f"{' '.join(map(str, a.nodes))}; {nets}")
    return a


def boot(sc: Scenario, rep: Report, var: str, a: Allocation, appliance: str, *,
         keys: str = "", node_keys: dict[int, str] | None = None, shown: str = ""
         ) -> dict[int, str]:
    """Listing 1 with an appliance (khdo loadkernel, loadramdisk, write "run kboot"), echoed;
    every node's ready line. ``shown`` stands in for node keys that hold a secret."""
    rep.command(f'echo "${var}" | khdo loadkernel uImage | khdo loadramdisk '
                f'{appliance}.cpio.gz.uimg')
    if keys:
        rep.command(f'echo "${var}" | khdo write \'setenv khargs "${{khargs}} {keys}"\'')
    if shown:
        rep.say(f"    {shown}")
    rep.command(f'echo "${var}" | khdo write "run kboot"')
    ready = sc.boot(a, appliance, keys=keys, node_keys=node_keys, timeout=BOOT_TIMEOUT)
    for n, line in sorted(ready.items()):
        rep.say(f"    node {n}: {line}")
    return ready


def make_token(sc: Scenario, rep: Report, made: Made, disknet: int, budget: int) -> str:
    """``kh token add --allocate-on DISKNET --max-nodes BUDGET``: the disk server's token (its
    secret is returned, never printed)."""
    user = sc.principal.user
    rep.command(f"kh token add -u {user} -c {credfile(user)} --allocate-on {disknet} "
                f"--max-nodes {budget}")
    r = sc.cli("main", "token", "add", "-u", user, "-c", str(sc.principal.credential),
               "--allocate-on", str(disknet), "--max-nodes", str(budget), "--json")
    t = json.loads(r.stdout)
    made.tokens.append((user, int(t["id"])))
    rep.say(f"    token {t['id']}: allocates on domain {disknet} only, at most {budget} nodes")
    return str(t["token"])


def khgetdisk(sc: Scenario, rep: Report, ds: Allocation, count: int) -> list[str]:
    """``khgetdisk COUNT`` on the disk server's shell: the AoE addresses of the new disks."""
    rep.command(f"khgetdisk {count}    # on DS (node {ds.nodes[0]}), over con{ds.id}.{ds.nodes[0]}")
    with sc.step(f"khgetdisk {count} on DS"):
        out = sc.check(ds, ds.nodes[0], f"khgetdisk {count}", KHGETDISK_TIMEOUT)
    m = re.search(r"ready:((?: e\d+\.\d+)+)", out)
    if not m:
        raise KhError(f"khgetdisk {count} did not say its disks were ready: "
                      f"{out.strip()[-300:]}")
    disks = m[1].split()
    rep.say(f"    disks {' '.join(disks)} answer on disknet")
    return disks


def free_nodes(sc: Scenario) -> int | None:
    """The service's free nodes (`kh service status`), None when it does not say."""
    r = sc.cli("main", "service", "status", check=False)
    m = re.search(r"(\d+) free", r.stdout)
    return int(m[1]) if r.returncode == 0 and m else None


def bring_up(corp: Scenario, other: Scenario, rep: Report, plan: Plan, made: Made) -> Figure:
    """GW, FS, DS with the paper's khget options; DS's token; GW and DS booted, the other
    principal's web server on the public domain, khgetdisk on DS, FS over those disks, then
    the workers with the export mounted and GW as their way out."""
    gw = khget(corp, rep, "gw", "-x", "-i", "-p", "1")
    pnet = gw.netid(2)
    made.domain(corp, pnet)
    rep.say(f"    pnet = domain {pnet}")
    fs = khget(corp, rep, "fs", "-n", str(pnet), "-p", "1")
    disknet = fs.netid(1)
    made.domain(corp, disknet)
    rep.say(f"    disknet = domain {disknet}")
    ds = khget(corp, rep, "ds", "-i", "-n", f"{pnet},{disknet}")
    token = make_token(corp, rep, made, disknet, plan.disks + plan.grow_disks)
    boot(corp, rep, "gw", gw, "gateway")
    dsn = ds.nodes[0]
    boot(corp, rep, "ds", ds, "diskserver",
         node_keys={dsn: f"kh.user={corp.principal.user} kh.token={token} "
                         f"kh.disksize={plan.disk_size}"},
         shown=f"(kh.user={corp.principal.user} kh.token=kht_... kh.disksize="
               f"{plan.disk_size} typed at DS's U-Boot prompt over con{ds.id}.{dsn}: "
               f"the token never goes on a command line)")
    web = khget(other, rep, "web", "-i")
    for d in web.info.domains:  # its first private domain, which khget made with it
        if d is not None and d.netid > 1:
            made.domain(other, d.netid)
    boot(other, rep, "web", web, "worker", keys="kh.httpd=1")
    disks = khgetdisk(corp, rep, ds, plan.disks)
    fig_ip = str(node_address(pnet, fs.nodes[0]).ip)
    boot(corp, rep, "fs", fs, "fileserver", keys=f"kh.disks={plan.disks} kh.aoedead={AOE_DEAD}")
    workers = khget(corp, rep, "w", "-n", str(pnet), count=plan.workers)
    gw_in = str(node_address(pnet, gw.nodes[0]).ip)
    boot(corp, rep, "w", workers, "worker", keys=f"kh.nfs={fig_ip}:/export kh.gw={gw_in}")
    return Figure(gw=gw, fs=fs, ds=ds, workers=workers, other=web, pnet=pnet,
                  disknet=disknet, disks=tuple(disks))


def teardown(scs: dict[str, Scenario], rep: Report, made: Made) -> list[str]:
    """After kh.scenario released the allocations: the tokens revoked, the private domains
    removed (newest first), each by its principal (``scs`` by name). Returns what could not be
    undone (one line each)."""
    domains = list(reversed(made.domains))
    if made.before is not None:
        for user, sc in scs.items():
            new = holdings(sc)[1] - made.before.get(user, set())
            domains += [(user, n) for n in sorted(new, reverse=True) if (user, n) not in domains]
    undo = [("token", "rm", user, n) for user, n in made.tokens]
    undo += [("domain", "rm", user, n) for user, n in domains]
    problems = []
    for group, sub, user, n in undo:
        sc = scs[user]
        rep.command(f"kh {group} {sub} -u {user} -c {credfile(user)} {n}")
        r = sc.cli("main", group, sub, "-u", user, "-c", str(sc.principal.credential), str(n),
                   check=False)
        if r.returncode:
            problems.append(f"{group} {n}: {r.stderr.strip()[-200:]}")
    return problems
