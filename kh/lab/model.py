"""A lab file's parsed model (issue 15): principals, private domains, groups of nodes (each a
khget request booted with an appliance), ordering, actions and checks. ``load_lab(path)``
reads, schema-checks and cross-checks a file; every error is one LabError naming the file,
the line and the key (or the cycle). Nothing here talks to khd: ``kh topo LAB`` draws from
this model without running it, and kh.lab.plan turns it into khget/khdo commands.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kh.allocation import NIC_SLOTS
from kh.lab import template
from kh.lab.source import LabError, Source, keypath, read

EXTERNAL = "external"
PUBLIC = "public"
SHARED = (EXTERNAL, PUBLIC)  # the domains every principal may join (khget -x, -i)
OUTSIDE = "outside"  # a check's place: the outside world (kh outside / KHDO_NETNS)
AtFn = Callable[..., "At"]
__all__ = ["At", "Check", "Group", "Lab", "LabError", "Principal", "PrivateDomain", "Token",
           "load_lab"]
NODE_REF = re.compile(r"^([a-z][a-z0-9_]{0,31})(?:\[(\d+)\])?$")


@dataclass(frozen=True)
class At:
    """Where a thing is written: file, 1-based line, key path (``groups.fs.keys``)."""

    file: Path
    line: int
    key: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: key {self.key}"


@dataclass(frozen=True)
class Principal:
    """A principal and the file holding its credential (absolute; it exists and is a file)."""

    name: str
    credential: Path
    at: At


@dataclass(frozen=True)
class PrivateDomain:
    """A private domain named in the lab, owned by ``owner`` (a principal's name), created
    with ``khget -p`` by ``created_by`` (the first group, in file order, that lists it)."""

    name: str
    owner: str
    created_by: str
    at: At


@dataclass(frozen=True)
class Token:
    """``kh token add --allocate-on DOMAIN --max-nodes N``: the secret reaches the group's
    nodes as ``{{ token }}`` in their keys (typed at each node's console, never on a command
    line)."""

    allocate_on: str  # a private domain's name
    max_nodes: int


@dataclass(frozen=True)
class Group:
    """``count`` nodes of ``principal``, one khget request; ``domains`` in the file's order
    (names: external, public, private ones); ``interfaces`` is khget's order (eth0...).
    ``keys`` and ``actions`` are Jinja2 template sources (kh.lab.template), rendered per
    node. ``implicit_private``: the group names no private domain, so khget also puts its
    nodes in the principal's first private domain (creating one if it has none): that
    interface comes last and has no name in the lab."""

    name: str
    principal: str
    count: int
    domains: tuple[str, ...]
    appliance: str
    kernel: str
    keys: str
    token: Token | None
    after: tuple[str, ...]
    actions: tuple[str, ...]
    timeout: float  # seconds for the boot and for each action
    at: At
    # where each template is written: "keys", "actions[0]" ... -> At
    src: Mapping[str, At] = field(default_factory=dict, compare=False)

    @property
    def private(self) -> tuple[str, ...]:
        return tuple(d for d in self.domains if d not in SHARED)

    @property
    def implicit_private(self) -> bool:
        return not self.private

    @property
    def interfaces(self) -> tuple[str, ...]:
        """Domain names in eth order as khget gives them: external, public, the existing
        private domains (-n, in the file's order), then the new ones (-p); an implicit
        private domain is ``""``."""
        shared = tuple(d for d in SHARED if d in self.domains)
        return shared + self.private + (("",) if self.implicit_private else ())


@dataclass(frozen=True)
class Check:
    """A command on a node (``group``, ``index``) or in the outside world (``group`` None);
    it passes when it exits ``status`` and its output holds ``expect`` and not ``reject``
    (all three of run/expect/reject are templates)."""

    name: str
    group: str | None
    index: int
    run: str
    expect: str | None
    reject: str | None
    status: int
    timeout: float
    at: At
    src: Mapping[str, At] = field(default_factory=dict, compare=False)  # "run" ... -> At

    @property
    def place(self) -> str:
        return OUTSIDE if self.group is None else f"{self.group}[{self.index}]"


@dataclass(frozen=True)
class Lab:
    """The whole file. ``groups`` in file order; ``order()`` in boot order."""

    name: str
    path: Path
    principals: tuple[Principal, ...]
    domains: tuple[PrivateDomain, ...]
    groups: tuple[Group, ...]
    checks: tuple[Check, ...]

    def group(self, name: str) -> Group:
        return next(g for g in self.groups if g.name == name)

    def principal(self, name: str) -> Principal:
        return next(p for p in self.principals if p.name == name)

    def domain(self, name: str) -> PrivateDomain:
        return next(d for d in self.domains if d.name == name)

    def credentials(self, remembered: Mapping[str, str]) -> dict[str, str]:
        """Each principal's credential file by name: the file's, else the one ``remembered``
        (a lab state's, for principals the file no longer names)."""
        return {**remembered, **{p.name: str(p.credential) for p in self.principals}}

    @property
    def nodes(self) -> int:
        return sum(g.count for g in self.groups)

    def order(self) -> tuple[Group, ...]:
        """Boot order: each group after those in its ``after``, otherwise file order."""
        done: list[Group] = []
        left = list(self.groups)
        while left:
            g = next(g for g in left if all(a in {d.name for d in done} for a in g.after))
            done.append(g)
            left.remove(g)
        return tuple(done)


def load_lab(path: Path, credentials: bool = True) -> Lab:
    """Read ``path`` into a Lab. LabError (file, line, key) for: a file that is not YAML or
    breaks lab.schema.json (unknown key, wrong type ...), an unknown principal, domain or
    group, a domain of another principal, more than 4 interfaces, a cycle in ``after``
    (naming it), a credential file that is missing (unless not ``credentials``: a picture of
    the file needs none), or a template that names a missing node, domain or variable
    (checked by rendering every node's with placeholder addresses)."""
    path = Path(path)
    src = read(path)
    d = src.data
    name = str(d.get("lab") or re.sub(r"\.ya?ml$", "", path.name))
    if not re.fullmatch(r"[a-z][a-z0-9-]{0,31}", name):
        raise src.error((), f"the lab's name {name!r} is not [a-z][a-z0-9-]*",
                        "name it with lab: NAME")

    def at(*where: str | int) -> At:
        return At(path, src.line(where), keypath(where))

    principals = tuple(_principal(src, path, n, p, at("principals", n), credentials)
                       for n, p in d["principals"].items())
    pnames = [p.name for p in principals]
    first = pnames[0]
    groups_raw: dict[str, dict[str, object]] = d["groups"]
    creators: dict[str, str] = {}
    for gname, g in groups_raw.items():
        for i, dom in enumerate(_strs(g.get("domains"))):
            if dom not in SHARED and dom not in (d.get("domains") or {}):
                raise src.error(("groups", gname, "domains", i),
                                f"no domain {dom!r}: not external, public, or one under "
                                f"domains:", "name private domains under domains:")
            creators.setdefault(dom, gname)
    for gname, g in groups_raw.items():
        private = [x for x in _strs(g.get("domains")) if x not in SHARED]
        made = [creators[x] == gname for x in private]
        if made != sorted(made):  # a domain it creates before one it joins
            i = _strs(g.get("domains")).index(private[made.index(True)])
            raise src.error(("groups", gname, "domains", i),
                            f"{private[made.index(True)]!r} is created by this group: list it "
                            "after the domains it joins", "khget gives new domains the last "
                            "interfaces")
    domains = []
    for dname, dv in (d.get("domains") or {}).items():
        owner = str((dv or {}).get("owner") or first)
        if owner not in pnames:
            raise src.error(("domains", dname, "owner"), f"no principal {owner!r}")
        if dname not in creators:
            raise src.error(("domains", dname), f"no group lists domain {dname!r}")
        domains.append(PrivateDomain(dname, owner, creators[dname], at("domains", dname)))
    owners = {dm.name: dm.owner for dm in domains}
    groups = tuple(_group(src, gname, g, first, pnames, owners, groups_raw, at)
                   for gname, g in groups_raw.items())
    _no_cycle(src, groups)
    checks = tuple(_check(src, i, c, groups, at) for i, c in enumerate(d.get("checks") or []))
    lab = Lab(name, path, principals, tuple(domains), groups, checks)
    template.validate(lab)
    return lab


def _strs(v: object) -> list[str]:
    return [str(x) for x in v] if isinstance(v, list) else []


def _principal(src: Source, path: Path, name: str, p: dict[str, str], where: At,
               must_exist: bool = True) -> Principal:
    cred = Path(p["credential"]).expanduser()
    if not cred.is_absolute():
        cred = path.resolve().parent / cred
    if must_exist and not cred.is_file():
        raise src.error(("principals", name, "credential"),
                        f"credential file {p['credential']!r} is missing ({cred})",
                        "put the principal's credential in that file, mode 600")
    return Principal(name, cred, where)


def _group(src: Source, name: str, g: dict[str, object], first: str, pnames: list[str],
           owners: dict[str, str], groups: dict[str, dict[str, object]], at: AtFn) -> Group:
    principal = str(g.get("principal") or first)
    if principal not in pnames:
        raise src.error(("groups", name, "principal"), f"no principal {principal!r}",
                        "principals: " + ", ".join(pnames))
    doms = _strs(g.get("domains"))
    for i, dom in enumerate(doms):
        if dom in owners and owners[dom] != principal:
            raise src.error(("groups", name, "domains", i),
                            f"domain {dom!r} is {owners[dom]}'s, not {principal}'s",
                            "a principal's nodes join only its own private domains")
    extra = 0 if any(x not in SHARED for x in doms) else 1
    if len(doms) + extra > NIC_SLOTS:
        raise src.error(("groups", name, "domains"),
                        f"{len(doms) + extra} interfaces; a node has {NIC_SLOTS}"
                        + (" (khget adds the principal's first private domain when none is "
                           "named)" if extra else ""))
    after = _strs(g.get("after"))
    for i, a in enumerate(after):
        if a not in groups:
            raise src.error(("groups", name, "after", i), f"no group {a!r}")
    tok = g.get("token")
    token = None
    if isinstance(tok, dict):
        on = str(tok["allocate_on"])
        if owners.get(on) != principal:
            raise src.error(("groups", name, "token", "allocate_on"),
                            f"{on!r} is not a private domain of {principal}")
        token = Token(on, int(tok["max_nodes"]))
    actions = tuple(_strs(g.get("actions")))
    srcs = {"keys": at("groups", name, "keys")}
    srcs.update({f"actions[{i}]": at("groups", name, "actions", i) for i in range(len(actions))})
    return Group(name=name, principal=principal, count=_int(g.get("count", 1)),
                 domains=tuple(doms), appliance=str(g["appliance"]),
                 kernel=str(g.get("kernel") or "uImage"), keys=str(g.get("keys") or ""),
                 token=token, after=tuple(after), actions=actions,
                 timeout=_float(g.get("timeout", 300)), at=at("groups", name), src=srcs)


def _no_cycle(src: Source, groups: tuple[Group, ...]) -> None:
    after = {g.name: g.after for g in groups}
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        path.append(n)
        for i, a in enumerate(after[n]):
            if state.get(a) == 1:
                cyc = path[path.index(a):] + [a]
                raise src.error(("groups", n, "after", i),
                                "a cycle in after: " + " -> ".join(cyc))
            if a not in state:
                visit(a)
        path.pop()
        state[n] = 2

    for g in groups:
        if g.name not in state:
            visit(g.name)


def _check(src: Source, i: int, c: dict[str, object], groups: tuple[Group, ...], at: AtFn
           ) -> Check:
    on = str(c["on"])
    group: str | None = None
    index = 0
    if on != OUTSIDE:
        m = NODE_REF.match(on)
        assert m  # the schema's pattern
        group, index = m[1], int(m[2] or 0)
        g = next((x for x in groups if x.name == group), None)
        if g is None:
            raise src.error(("checks", i, "on"), f"no group {group!r}")
        if index >= g.count:
            raise src.error(("checks", i, "on"),
                            f"group {group} has {g.count} node{'s' if g.count > 1 else ''}: "
                            f"no {on}")
    return Check(name=str(c["name"]), group=group, index=index, run=str(c["run"]),
                 expect=None if c.get("expect") is None else str(c["expect"]),
                 reject=None if c.get("reject") is None else str(c["reject"]),
                 status=_int(c.get("status", 0)), timeout=_float(c.get("timeout", 120)),
                 at=at("checks", i),
                 src={k: at("checks", i, k) for k in ("run", "expect", "reject")})


def _int(v: object) -> int:
    assert isinstance(v, int)  # the schema's type
    return v


def _float(v: object) -> float:
    assert isinstance(v, (int, float))  # the schema's type
    return float(v)
