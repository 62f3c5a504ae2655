"""`kh host rm` (kh.service.hosts.Hosts.remove): a far host's nodes stopped, their taps there
removed, kh's domains left there destroyed, its connection closed, its rows gone.

Under khd's lock the host is only marked ``removing`` (kh host list's state): its backend
leaves the routing, so its free nodes are no one's to allocate and the pool starts none there.
The remote work is done outside the lock, each step bounded by REMOTE_STEP s (the starts under
way there by REMOVE_WAIT more), so a far host that hangs instead of refusing holds up no other
principal's request, only this one, and that for a bounded time: once a step has not answered
in time the host's remaining steps there are left (logged; what they would have removed may
stay on that host). The host's rows go under the lock at the end, whatever the far host did.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kh.allocation import NIC_SLOTS
from kh.errors import KhError
from kh.model import NodeState
from kh.service import hostspec

if TYPE_CHECKING:
    from kh.hw.backend import Backend
    from kh.service.hostfabric import Far
    from kh.service.hosts import Hosts

log = logging.getLogger("kh.hosts")
REMOVE_WAIT = 60.0  # s `kh host rm` waits for the starts under way there to end
REMOTE_STEP = 90.0  # s one step there may take (a destroy, an unwire: ssh's 60 s and some)


def remove(hosts: Hosts, name: str) -> dict[str, Any]:
    """Forget host ``name``: refused (HostRefused, 409) while one of its nodes is allocated or
    it is being removed already; NotFound for an unknown host, UsageError for a bad name.
    {"removed": name, "nodes": [numbers of its nodes that were stopped]}."""
    from kh.service.core import NotFound
    from kh.service.hosts import HostRefused
    svc = hosts.svc
    hostspec.check_name(name)
    with svc.lock:
        if svc.store.host(name) is None:
            raise NotFound(f"no host {name}", "kh host list shows them")
        if name in hosts.removing:
            raise HostRefused(f"host {name} is being removed already", "kh host list shows it")
        held = [r.number for r in svc.store.nodes()
                if r.host == name and (r.alloc is not None or r.state == NodeState.CONFIGURING)]
        if held:
            raise HostRefused(f"host {name} has {len(held)} allocated node"
                              f"{'s' if len(held) > 1 else ''} "
                              f"({' '.join(map(str, held))})", "release them first")
        hosts.removing.add(name)
        backend = svc.nodes.remove(name)  # no start and no allocation there from now on
        numbers = [r.number for r in svc.store.nodes() if r.host == name]
        far = svc.fabric.far.get(name)
    try:
        _remote(hosts, name, backend, far, numbers)
    finally:
        with svc.lock:
            gone = svc.store.remove_host(name)
            svc.fabric.remove_host(name)
            hosts.faults.pop(name, None)
            hosts.removing.discard(name)
    log.info("host %s removed; nodes %s stopped", name, gone)
    return {"removed": name, "nodes": gone}


def _remote(hosts: Hosts, name: str, backend: Backend | None, far: Far | None,
            numbers: list[int]) -> None:
    """The steps on host ``name``, in order, each bounded; after one that did not answer in
    time, only the local one (the connection closed) is still done."""
    steps: list[tuple[str, float, Callable[[], object]]] = []

    def stop(n: int) -> None:
        if backend is not None:
            backend.stop(n)
        hosts.svc.nodes.stop(n)  # its host is out of the routing: those told of stops alone

    def orphans() -> None:  # kh's domains there that no node row holds (a start cut short)
        assert backend is not None
        for line in backend.stop_orphans():
            log.warning("host %s: %s", name, line)

    if backend is not None:  # no start there from now on; those under way end
        b = backend
        steps.append(("ending the starts there", REMOVE_WAIT + REMOTE_STEP,
                      lambda: b.abort_starts(wait=REMOVE_WAIT)))
    for n in numbers:
        steps.append((f"stopping node {n}", REMOTE_STEP, functools.partial(stop, n)))
        if far is not None:
            steps.append((f"removing node {n}'s taps", REMOTE_STEP,
                          functools.partial(far.fabric.unwire, n, NIC_SLOTS)))
    if backend is not None:
        steps.append(("looking for kh's domains left there", REMOTE_STEP, orphans))
    for what, seconds, step in steps:
        if not bounded(name, what, step, seconds):
            break
    if backend is not None:  # its connection closed, its consoles' readers too
        bounded(name, "closing its connection", backend.detach_all, REMOTE_STEP)


def bounded(host: str, what: str, step: Callable[[], object], seconds: float) -> bool:
    """Run ``step`` in a thread of its own for at most ``seconds``: True when it returned
    (a KhError it raised is logged: the host refused), False when it did not answer in time
    (logged; the thread is left to its own bound: a process's timeout, libvirt's keepalive)."""
    done = threading.Event()

    def run() -> None:
        try:
            step()
        except KhError as e:
            log.warning("host %s: %s: %s", host, what, e)
        except Exception:
            log.exception("host %s: %s", host, what)
        finally:
            done.set()

    threading.Thread(target=run, daemon=True, name=f"host-rm-{host}").start()
    if done.wait(seconds):
        return True
    log.error("host %s: %s did not answer in %.0f s; the rest of its removal there is left "
              "(kh's domains and taps may stay there)", host, what, seconds)
    return False
