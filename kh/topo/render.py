"""The topology drawn: text (a tree of principals, allocations and nodes, then each domain as
a bus, Figure 2 style; at most WIDTH columns), Graphviz DOT, Mermaid and JSON. Pure functions
of a Topology (kh.topo.model): the same graph always gives the same bytes. ``svg`` runs
Graphviz's ``dot`` (through kh.proc) on the DOT.

Every name that reaches a format is escaped for it (DOT's quoted strings and HTML-like labels,
Mermaid's quoted labels), so a lab's names cannot break or inject into the picture.
"""

from __future__ import annotations

import html
import json
import re
from xml.etree import ElementTree

from kh import proc
from kh.errors import KhError
from kh.topo.model import Interface, TopoDomain, Topology, TopoNode

WIDTH = 100  # the text picture's widest line
FORMATS = ("text", "dot", "svg", "mermaid", "json")
# DOT fill colours by domain kind, and for nodes by state
KIND_COLOUR = {"external": "#f4cccc", "public": "#cfe2f3", "private": "#d9ead3"}
DOT_TIMEOUT = 30  # seconds; dot lays out a few hundred nodes in well under one


def _cut(line: str, width: int = WIDTH) -> str:
    return line if len(line) <= width else line[: width - 1] + "…"


def _dom(d: TopoDomain) -> str:
    """"D3 private (alice)", "D0 external"; a lab's planned private domain by its name."""
    owner = f" ({d.owner})" if d.owner else ""
    return f"{d.label}{owner}"


def _where(i: Interface) -> str:
    mac = i.mac or "MAC ?"
    ip = i.ip or "address ?"
    return f"eth{i.slot}  {mac:<17}  {ip:<14}"


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def header(t: Topology) -> str:
    whose = "the operator's view" if t.view == "operator" else f"{t.view}'s view"
    what = "running" if t.source == "running" else t.source
    if t.source != "running":
        whose = "as planned, not running"
    parts = [_count(len(t.principals), "principal"), _count(len(t.allocations), "allocation"),
             _count(len(t.nodes), "node"), _count(len(t.domains), "domain")]
    if t.free_nodes is not None:
        parts.append(f"{t.free_nodes} free in the pool")
    return f"kh topology: {what}, {whose}\n{', '.join(parts)}"


def text(t: Topology) -> str:
    """The picture in plain text: each principal's allocations (their control channels) and
    nodes with their interfaces, its published ports; then every domain as a bus with its
    members and kh's own address there."""
    out = [header(t), ""]
    for p in t.principals:
        allocs = [a for a in t.allocations if a.principal == p]
        owned = [d for d in t.domains if d.owner == p]
        out.append(f"principal {p}" + (f"  (owns {', '.join(d.label for d in owned)})"
                                       if owned else ""))
        for ai, a in enumerate(allocs):
            last_a = ai == len(allocs) - 1
            out.append(f"{'└' if last_a else '├'}─ {a.label}   control channel: ssh {a.channel}")
            bar = " " if last_a else "│"
            for ni, key in enumerate(a.nodes):
                n = t.node(key)
                last_n = ni == len(a.nodes) - 1
                out.append(f"{bar}  {'└' if last_n else '├'}─ {n.label}  [{n.state}]")
                sub = " " if last_n else "│"
                if not n.interfaces:
                    out.append(f"{bar}  {sub}    (no interface in a domain)")
                for i in n.interfaces:
                    out.append(f"{bar}  {sub}    {_where(i)}  ── {_dom(t.domain(i.domain))}")
        for port in (x for x in t.ports if x.principal == p):
            out.append(f"   published 127.0.0.1:{port.host_port} → {t.node(port.node).label} "
                       f"port {port.port}")
        if not allocs:
            out.append("└─ (no allocation)")
        out.append("")
    out.append("domains (network-style, as the paper's Figure 2)")
    for d in t.domains:
        name = _dom(d)
        members = [f"{n.label}  eth{i.slot} {i.ip or ''}".rstrip()
                   + (f"  ({n.principal})" if n.principal and t.view == "operator" else "")
                   for n, i in t.members(d.key)]
        if d.gateway:
            who = "outside world" if d.kind == "external" else "khd (API, control channel)"
            members.insert(0, f"{who} {d.gateway}")
        if not members:
            members = ["(no node)"]
        pad = " " * (len(name) + 4)
        for k, m in enumerate(members):
            tee = "┬" if k == 0 and len(members) > 1 else "─" if k == 0 else \
                "└" if k == len(members) - 1 else "├"
            out.append(f"{name} ───{tee}─ {m}" if k == 0 else f"{pad}{tee}─ {m}")
    out += [f"note: {x}" for x in t.notes]
    return "\n".join(_cut(x.rstrip()) for x in "\n".join(out).split("\n")) + "\n"


# -- Graphviz ----------------------------------------------------------------------------------
def _q(s: str) -> str:
    """A DOT quoted string."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _h(s: str) -> str:
    """Text inside a DOT HTML-like label."""
    return html.escape(s, quote=True)


def _dot_node(n: TopoNode) -> str:
    rows = [f'<TR><TD BGCOLOR="#eeeeee"><B>{_h(n.label)}</B>&#160;{_h(n.state)}</TD></TR>']
    rows += [f'<TR><TD PORT="e{i.slot}" ALIGN="LEFT">eth{i.slot} {_h(i.ip or "?")}'
             + (f'<BR ALIGN="LEFT"/><FONT POINT-SIZE="8">{_h(i.mac)}</FONT>' if i.mac else "")
             + "</TD></TR>" for i in n.interfaces]
    table = '<TABLE BORDER="0" CELLBORDER="1" CELLSPACING="0">' + "".join(rows) + "</TABLE>"
    return f"{_q(n.key)} [shape=plain, label=<{table}>];"


def dot(t: Topology) -> str:
    """Graphviz DOT: a cluster per principal holding a cluster per allocation (its control
    channel in the label) holding its nodes (one row per interface); domains as boxes, each
    interface an edge to its domain; published ports as host boxes pointing at their node."""
    out = ["graph kh {",
           f"  graph [rankdir=LR, fontname=Helvetica, fontsize=11, label={_q(header(t))}, "
           "labelloc=t];",
           "  node [fontname=Helvetica, fontsize=10];",
           "  edge [fontname=Helvetica, fontsize=9];"]
    for pi, p in enumerate(t.principals):
        out.append(f"  subgraph {_q(f'cluster_p{pi}')} {{")
        out.append(f"    label={_q('principal ' + p)}; style=rounded; color=\"#888888\";")
        for a in (a for a in t.allocations if a.principal == p):
            out.append(f"    subgraph {_q('cluster_' + a.key)} {{")
            out.append(f"      label={_q(a.label + chr(10) + 'ssh ' + a.channel)}; "
                       "style=dashed;")
            out += [f"      {_dot_node(t.node(k))}" for k in a.nodes]
            out.append("    }")
        out.append("  }")
    for d in t.domains:
        extra = ""
        if d.gateway:
            extra = "\n" + ("outside world " if d.kind == "external" else "khd ") + d.gateway
        label = _dom(d) + extra
        colour = KIND_COLOUR.get(d.kind, "#ffffff")
        out.append(f"  {_q(d.key)} [shape=box, style=\"rounded,filled\", "
                   f"fillcolor={_q(colour)}, label={_q(label)}];")
    for n in t.nodes:
        out += [f"  {_q(n.key)}:e{i.slot} -- {_q(i.domain)};" for i in n.interfaces]
    for port in t.ports:
        key = f"port{port.host_port}"
        out.append(f"  {_q(key)} [shape=cds, label={_q(f'127.0.0.1:{port.host_port}')}];")
        out.append(f"  {_q(key)} -- {_q(port.node)} [label={_q(f'port {port.port}')}, "
                   "style=bold];")
    out.append("}")
    return "\n".join(out) + "\n"


SVG_NS = "{http://www.w3.org/2000/svg}"


def svg(t: Topology, dot_program: str = "dot") -> str:
    """The DOT laid out by Graphviz as SVG (a KhError naming the package when dot is missing,
    or its error)."""
    res = proc.run([dot_program, "-Tsvg"], input=dot(t).encode(), timeout=DOT_TIMEOUT,
                   what="graphviz")
    out = res.stdout
    try:
        ElementTree.fromstring(out)
    except ElementTree.ParseError as e:
        raise KhError(f"dot wrote no valid SVG: {e}") from None
    return out


# -- Mermaid -----------------------------------------------------------------------------------
def _mid(key: str) -> str:
    """A Mermaid node id: letters, digits and _ only (unique: the key's other bytes in hex)."""
    return "k_" + re.sub(r"[^A-Za-z0-9]", lambda m: f"_{ord(m.group()):x}_", key)


def _mq(s: str) -> str:
    """A Mermaid quoted label: quotes and angle brackets as entity codes; line breaks as
    <br/>."""
    s = s.replace("#", "#35;").replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;")
    return '"' + s.replace("\n", "<br/>") + '"'


def mermaid(t: Topology) -> str:
    """A Mermaid flowchart (pastes into Markdown as a ```mermaid block)."""
    out = ["flowchart LR"]
    for pi, p in enumerate(t.principals):
        out.append(f"  subgraph p{pi}[{_mq('principal ' + p)}]")
        for a in (a for a in t.allocations if a.principal == p):
            out.append(f"    subgraph {_mid(a.key)}[{_mq(a.label + chr(10) + 'ssh ' + a.channel)}]")
            for k in a.nodes:
                n = t.node(k)
                out.append(f"      {_mid(n.key)}[{_mq(n.label + chr(10) + n.state)}]")
            out.append("    end")
        out.append("  end")
    for d in t.domains:
        extra = f"\n{d.gateway}" if d.gateway else ""
        out.append(f"  {_mid(d.key)}([{_mq(_dom(d) + extra)}])")
    for n in t.nodes:
        for i in n.interfaces:
            out.append(f"  {_mid(n.key)} ---|{_mq(f'eth{i.slot} {i.ip or chr(63)}')}| "
                       f"{_mid(i.domain)}")
    for port in t.ports:
        pid = f"port_{port.host_port}"
        out.append(f"  {pid}>{_mq(f'127.0.0.1:{port.host_port}')}]")
        out.append(f"  {pid} -->|{_mq(f'port {port.port}')}| {_mid(port.node)}")
    return "\n".join(out) + "\n"


def as_json(t: Topology) -> str:
    return json.dumps(t.to_json(), indent=1) + "\n"


def render(t: Topology, fmt: str) -> str:
    """``t`` in one of FORMATS."""
    return {"text": text, "dot": dot, "svg": svg, "mermaid": mermaid, "json": as_json}[fmt](t)
