"""khget's text object: the format of the paper and of the original khctl scripts.

```
con12@10.255.0.1
protocol: uboot
network External : eth0
network Internal : eth1
network 7 : eth2
nodeinfo: 3 3 10.255.1.3
nodes: 3
```
A node on another host than khd's own (kh host add) has that host's name after its address,
``nodeinfo: 4 4 10.255.1.4 hostb`` (``-`` for an address it lacks); a node on khd's own host
has none, so a text object of one host reads as it always did. khget prints it; khdo reads
it on stdin; both sides use this module. An interface its nodes freed while running
(`kh domain leave`) has no line: the eth numbers skip it.
"""

from __future__ import annotations

import re
from typing import Any

from kh.allocation import NIC_SLOTS
from kh.errors import UsageError
from kh.model import EXTERNAL, PUBLIC, AllocationInfo, Domain, DomainKind, NodeInfo

CHANNEL_RE = re.compile(r"^con(\d+)@(\S+)$")
NETWORK_RE = re.compile(r"^network (\S+) : eth(\d+)$")
NODEINFO_RE = re.compile(r"^nodeinfo: (\d+) (\d+) (\S+)(?: ([a-z][a-z0-9-]{0,15}))?$")
LOCAL = "local"


def format(a: AllocationInfo) -> str:
    lines = [a.channel, f"protocol: {a.protocol}"]
    lines += [f"network {d.label} : eth{i}" for i, d in enumerate(a.domains) if d is not None]
    lines += [f"nodeinfo: {n.number} {n.uid} {n.address}" if n.host == LOCAL else
              f"nodeinfo: {n.number} {n.uid} {n.address or '-'} {n.host}" for n in a.nodes]
    lines.append("nodes: " + " ".join(str(n.number) for n in a.nodes))
    return "\n".join(lines) + "\n"


def to_json(a: AllocationInfo) -> dict[str, Any]:
    return {"channel": a.channel, "id": a.id, "server": a.server, "protocol": a.protocol,
            "networks": [{"netid": d.netid, "name": d.label, "kind": d.kind.value,
                          "interface": f"eth{i}"} for i, d in enumerate(a.domains)
                         if d is not None],
            "nodes": [{"node": n.number, "uid": n.uid, "address": n.address, "host": n.host}
                      for n in a.nodes]}


def _domain(label: str) -> Domain:
    if label == "External":
        return Domain(EXTERNAL, DomainKind.EXTERNAL, None)
    if label == "Internal":
        return Domain(PUBLIC, DomainKind.PUBLIC, None)
    if label.isdigit():
        return Domain(int(label), DomainKind.PRIVATE, None)
    raise UsageError(f"text object: unknown network {label!r}")


def parse(text: str) -> AllocationInfo:
    """Read a text object (what khdo gets on stdin); malformed input is a UsageError."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise UsageError("empty text object", "pipe khget's output in: echo \"$nodes\" | khdo ...")
    m = CHANNEL_RE.match(lines[0])
    if not m:
        raise UsageError(f"text object: first line {lines[0]!r} is not con<ID>@<host>")
    alloc_id, server = int(m[1]), m[2]
    protocol = "uboot"
    domains: list[Domain | None] = []
    nodes: list[NodeInfo] = []
    listed: list[int] | None = None
    for n, line in enumerate(lines[1:], 2):
        if line.startswith("protocol: "):
            protocol = line.split(": ", 1)[1]
        elif mm := NETWORK_RE.match(line):
            if int(mm[2]) >= NIC_SLOTS:
                raise UsageError(f"text object line {n}: a node has {NIC_SLOTS} interfaces "
                                 f"({line!r})")
            if int(mm[2]) < len(domains):
                raise UsageError(f"text object line {n}: interfaces out of order ({line!r})")
            domains += [None] * (int(mm[2]) - len(domains))  # interfaces left free
            domains.append(_domain(mm[1]))
        elif mm := NODEINFO_RE.match(line):
            if mm[4] is None:
                nodes.append(NodeInfo(int(mm[1]), int(mm[2]), mm[3]))
            else:
                nodes.append(NodeInfo(int(mm[1]), int(mm[2]), "" if mm[3] == "-" else mm[3],
                                      mm[4]))
        elif line.startswith("nodes:"):
            try:
                listed = [int(x) for x in line.split(":", 1)[1].split()]
            except ValueError:
                raise UsageError(f"text object line {n}: bad node list {line!r}") from None
        else:
            raise UsageError(f"text object line {n} not understood: {line!r}")
    if listed is None:
        raise UsageError("text object has no `nodes:` line")
    if nodes and [x.number for x in nodes] != listed:
        raise UsageError("text object: `nodes:` does not match the nodeinfo lines")
    if not nodes:
        nodes = [NodeInfo(x, x, "") for x in listed]
    return AllocationInfo(alloc_id, server, tuple(domains), tuple(nodes), protocol)
