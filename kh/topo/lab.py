"""A lab file's topology before it runs (`kh topo LAB.yaml`): each group of nodes is one
allocation (one khget, one control channel whose number khd gives at `kh up`), its nodes
``GROUP[i]`` with their interfaces in khget's order; private domains by their names in the
file, with their owners. Addresses and MACs come from node numbers, which only khd hands out:
they are shown as unknown.
"""

from __future__ import annotations

from kh.lab.model import EXTERNAL, PUBLIC, Lab
from kh.model import EXTERNAL as D0
from kh.model import PUBLIC as D1
from kh.topo.model import (
    Interface,
    TopoAllocation,
    TopoDomain,
    Topology,
    TopoNode,
    domain_of,
)


def _key(lab_domain: str, principal: str) -> str:
    if lab_domain == EXTERNAL:
        return f"D{D0}"
    if lab_domain == PUBLIC:
        return f"D{D1}"
    if lab_domain == "":  # khget's default private domain of the group's principal
        return f"D:{principal}:default"
    return f"D:{lab_domain}"


def from_lab(lab: Lab, server: str = "127.0.0.1") -> Topology:
    """The topology ``lab`` describes (pure: nothing is asked of khd)."""
    domains: dict[str, TopoDomain] = {}
    allocs: list[TopoAllocation] = []
    nodes: list[TopoNode] = []
    for g in lab.groups:
        keys = []
        for i in range(g.count):
            key = f"{g.name}.{i}"
            ifs = []
            for slot, name in enumerate(g.interfaces):
                dkey = _key(name, g.principal)
                if dkey not in domains:
                    if name in (EXTERNAL, PUBLIC):
                        netid = D0 if name == EXTERNAL else D1
                        domains[dkey] = domain_of(netid, name, None)
                    elif name == "":
                        domains[dkey] = TopoDomain(dkey, "first private domain", None, "private",
                                                   g.principal)
                    else:
                        d = lab.domain(name)
                        domains[dkey] = TopoDomain(dkey, name, None, "private", d.owner)
                ifs.append(Interface(slot, dkey, None, None))
            nodes.append(TopoNode(key, f"{g.name}[{i}]", None, f"planned: {g.appliance}",
                                  g.principal, f"G:{g.name}", tuple(ifs)))
            keys.append(key)
        after = f", after {' '.join(g.after)}" if g.after else ""
        size = f"{g.count} node{'s' * (g.count != 1)}"
        allocs.append(TopoAllocation(f"G:{g.name}", f"group {g.name} ({size}{after})",
                                     g.principal, f"con?@{server}", tuple(keys)))
    # shared domains first, then private ones in the file's order
    order = sorted(domains.values(), key=lambda d: (d.netid is None, d.netid or 0))
    return Topology(f"lab {lab.path.name}", "operator", tuple(p.name for p in lab.principals),
                    tuple(allocs), tuple(nodes), tuple(order))
