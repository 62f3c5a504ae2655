"""Jinja2 templates of a lab file: boot keys, actions and checks, rendered per node.

What a template sees (StrictUndefined: a name, node or domain that does not exist is an
error, never an empty string)::

    lab                 the lab's name
    group, index, count the node's group, its index there (0...), the group's size
    node                the node's number (khget's nodeinfo)
    ip.DOMAIN           the node's IPv4 address in DOMAIN (external, public, a private name)
    principal           the group's principal
    token               the group's token secret (only in keys, only with token:)
    nodes.G[i].node     node i of group G; nodes.G[i].ip.DOMAIN its address
    domains.NAME        a domain's id (external 0, public 1, private ones as khget made them)
    outside.ip          the outside world's address (checks only)

``kh up --dry-run`` renders with placeholders (``<fs[0].ip.pnet>``); load_lab renders every
template of every node that way, so that a missing name is found before anything runs.
"""

from __future__ import annotations

import contextlib
import resource
import signal
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.sandbox

from kh.allocation import node_address
from kh.model import EXTERNAL as EXTERNAL_ID
from kh.model import PUBLIC as PUBLIC_ID

if TYPE_CHECKING:
    from kh.lab.model import Check, Group, Lab
    from kh.lab.state import LabState

_ENV = jinja2.sandbox.ImmutableSandboxedEnvironment(
    undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=False)
MAX_OUTPUT = 8192  # characters a rendered template may have
RENDER_SECONDS = 5.0  # one template's rendering (kh up's boots, checks)
ALL_SECONDS = 30.0  # every template of every node, rendered when a lab file is read
RENDER_BYTES = 512 << 20  # memory renderings may take beyond what the process has


class _OverTime(BaseException):
    """SIGALRM in a rendering (a BaseException: no `except Exception` inside swallows it)."""


_bounding = False
_rendering = ""  # the template being rendered (file:line: key ...), for bounded's error


def _vm_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


@contextlib.contextmanager
def bounded(seconds: float, where: str) -> Iterator[None]:
    """Templates rendered within take at most ``seconds`` (wall) and RENDER_BYTES more
    memory (RLIMIT_AS, lowered meanwhile): a lab file is read before anything runs, by
    `kh topo LAB` too, and Jinja2's sandbox bounds neither (nested loops, 'x' * 10**10,
    'x' | center(10**10)). LabError naming ``where`` beyond. Outside the main thread, or
    inside another bounded block (which governs), nothing more is bounded."""
    from kh.lab.source import LabError
    global _bounding
    if _bounding or threading.current_thread() is not threading.main_thread():
        yield
        return

    def alarm(signum: int, frame: FrameType | None) -> None:
        raise _OverTime

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _vm_bytes() + RENDER_BYTES
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    lower = soft == resource.RLIM_INFINITY or limit < soft
    old = signal.signal(signal.SIGALRM, alarm)
    _bounding = True
    try:
        if lower:
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        signal.setitimer(signal.ITIMER_REAL, seconds)
        yield
    except _OverTime:
        raise LabError(f"{_rendering or where}: templates take over {seconds:g} s to render",
                       "a loop too many?") from None
    except MemoryError:
        raise LabError(f"{_rendering or where}: templates take over {RENDER_BYTES >> 20} MiB "
                       "to render") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if lower:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        _bounding = False
_rendering = ""  # the template being rendered (file:line: key ...), for bounded's error


@dataclass(frozen=True)
class Facts:
    """What the lab's templates are rendered over: each group's node numbers (in khget's
    order) and each domain's id, or placeholders (strings) for a dry run."""

    nodes: Mapping[str, tuple[int | str, ...]]
    netids: Mapping[str, int | str]
    outside: str = "<outside.ip>"


def symbolic(lab: Lab) -> Facts:
    """Placeholders: node ``<G[i]>``, domain ``<NAME>``, addresses ``<G[i].ip.D>``."""
    return Facts({g.name: tuple(f"<{g.name}[{i}]>" for i in range(g.count))
                  for g in lab.groups},
                 {"external": EXTERNAL_ID, "public": PUBLIC_ID,
                  **{d.name: f"<{d.name}>" for d in lab.domains}})


def _ip(facts: Facts, group: str, i: int, node: int | str, domain: str) -> str:
    netid = facts.netids.get(domain, f"<{domain}>")
    if isinstance(node, int) and isinstance(netid, int):
        return str(node_address(netid, node).ip)
    return f"<{group}[{i}].ip.{domain}>"


def _view(lab: Lab, facts: Facts, g: Group, i: int) -> dict[str, Any]:
    node = facts.nodes[g.name][i]
    return {"node": node, "index": i,
            "ip": {d: _ip(facts, g.name, i, node, d) for d in g.domains}}


def base(lab: Lab, facts: Facts) -> dict[str, Any]:
    """The variables every node's templates share (build once, pass to ``context``)."""
    return {
        "lab": lab.name,
        "nodes": {g.name: [_view(lab, facts, g, i) for i in range(len(facts.nodes[g.name]))]
                  for g in lab.groups},
        "domains": dict(facts.netids),
        "outside": {"ip": facts.outside},
    }


def context(lab: Lab, facts: Facts, group: Group | None = None, index: int = 0,
            token: str | None = None, shared: dict[str, Any] | None = None
            ) -> dict[str, Any]:
    """The variables of one node's templates (``group`` None: a check in the outside);
    ``shared``: what ``base`` gave, to save rebuilding it per node."""
    ctx = dict(shared if shared is not None else base(lab, facts))
    if group is not None:
        me = _view(lab, facts, group, index)
        ctx.update(group=group.name, index=index, count=group.count, node=me["node"],
                   ip=me["ip"], principal=group.principal)
        if token is not None:
            ctx["token"] = token
    return ctx


def render(source: str, ctx: Mapping[str, Any], where: str) -> str:
    """The rendered template, one line (newlines become spaces). TemplateError naming
    ``where`` (file:line: key ...) for a syntax error or a name that does not exist."""
    from kh.lab.source import LabError
    global _rendering
    _rendering = where
    try:
        with bounded(RENDER_SECONDS, where):
            out = _ENV.from_string(source).render(ctx)
    except jinja2.TemplateSyntaxError as e:
        raise LabError(f"{where}: template: {e.message}") from None
    except jinja2.UndefinedError as e:
        raise LabError(f"{where}: template names something that does not exist: {e.message}",
                       "nodes.GROUP[i].ip.DOMAIN, domains.NAME, node, index, ip.DOMAIN "
                       "(docs/labs.md)") from None
    except (jinja2.TemplateError, TypeError, ValueError, ArithmeticError) as e:
        raise LabError(f"{where}: template: {e}") from None
    if len(out) > MAX_OUTPUT:
        raise LabError(f"{where}: template renders to {len(out)} characters, over "
                       f"{MAX_OUTPUT}")
    return " ".join(out.split()) if "\n" in out else out.strip()


def node_keys(lab: Lab, facts: Facts, g: Group, i: int, token: str | None = None,
              shared: dict[str, Any] | None = None) -> str:
    """Node ``i``'s boot keys (one line)."""
    return render(g.keys, context(lab, facts, g, i, token, shared), str(g.src["keys"]))


def actions(lab: Lab, facts: Facts, g: Group, i: int, shared: dict[str, Any] | None = None
            ) -> list[str]:
    """Node ``i``'s actions, each one shell command line."""
    ctx = context(lab, facts, g, i, None, shared)
    return [render(a, ctx, str(g.src[f"actions[{k}]"])) for k, a in enumerate(g.actions)]


def check(lab: Lab, facts: Facts, c: Check, shared: dict[str, Any] | None = None
          ) -> dict[str, str | None]:
    """The check's run, expect and reject rendered (None where not given)."""
    g = lab.group(c.group) if c.group else None
    ctx = context(lab, facts, g, c.index, None, shared)
    out: dict[str, str | None] = {}
    for key in ("run", "expect", "reject"):
        text = getattr(c, key)
        out[key] = None if text is None else render(text, ctx, str(c.src[key]))
    return out


def validate(lab: Lab) -> None:
    """Render every template of every node with placeholders: LabError for the first one
    that names something missing."""
    facts = symbolic(lab)
    shared = base(lab, facts)
    with bounded(ALL_SECONDS, str(lab.path)):
        for g in lab.groups:
            for i in range(g.count):
                node_keys(lab, facts, g, i, "<token>" if g.token else None, shared)
                actions(lab, facts, g, i, shared)
        for c in lab.checks:
            check(lab, facts, c, shared)


def facts(lab: Lab, st: LabState | None, fresh: frozenset[str] = frozenset(),
          placeholders: bool = True) -> Facts:
    """The facts the state knows: each group's nodes (up to its count in ``lab``; groups in
    ``fresh``, about to be allocated again, have none), each private domain's id. What is not
    known yet is a placeholder (a dry run's ``<fs[0]>``), or, without ``placeholders``,
    missing (a template naming it fails: `kh up --only G` before the group it names)."""
    sym = symbolic(lab)
    nodes: dict[str, tuple[int | str, ...]] = {}
    for g in lab.groups:
        have: tuple[int | str, ...] = ()
        if st is not None and g.name in st.groups and g.name not in fresh:
            have = st.groups[g.name].nodes[:g.count]
        nodes[g.name] = have + (sym.nodes[g.name][len(have):] if placeholders else ())
    netids = dict(sym.netids) if placeholders else {"external": EXTERNAL_ID,
                                                    "public": PUBLIC_ID}
    if st is not None:
        netids.update({n: i for n, i in st.domains.items() if n in sym.netids})
    return Facts(nodes, netids)
