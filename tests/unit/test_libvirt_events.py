"""The libvirt backend's lifecycle handling (kh.service.libvirt_host) against libvirt's test
driver: a domain that stops marks its node gone with the reason, which the pool then acts on;
other domains' events touch no node."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from kh.hw import domainxml
from tests.unit.test_domainxml import spec

libvirt = pytest.importorskip("libvirt")


def wait_for(cond, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_stopped_domain_marks_only_its_node_gone(tmp_path: Path) -> None:
    from kh.service.libvirt_host import LibvirtHost

    nodes: list[SimpleNamespace] = []
    host = LibvirtHost("testhost", "test:///default", None, tmp_path, lambda: nodes,
                       machine=None)  # the test driver has no ppc guests
    conn = host.conn  # events registered on it
    doms = [conn.createXML(domainxml.render(spec(name=f"kh-node{n}", number=n)), 0)
            for n in (1, 2)]
    try:
        nodes.extend(SimpleNamespace(number=n, dom=d, gone=None)
                     for n, d in zip((1, 2), doms, strict=True))
        doms[0].destroy()
        assert wait_for(lambda: nodes[0].gone is not None), "no lifecycle event arrived"
        assert "its libvirt domain stopped" in nodes[0].gone
        time.sleep(0.2)
        assert nodes[1].gone is None
    finally:
        for d in doms[1:]:
            d.destroy()
        host.close()


def test_an_unreachable_host_is_one_error_naming_it(tmp_path: Path) -> None:
    from kh.errors import KhError
    from kh.hw.virtstream import connect

    uri = f"qemu+unix:///system?socket={tmp_path}/no-such-sock"
    with pytest.raises(KhError, match=r"^host h2: cannot reach libvirt at qemu\+unix") as e:
        connect(uri, "h2")
    assert "\n" not in str(e.value)


def test_a_host_without_qemu_system_ppc_is_refused_naming_it(tmp_path: Path) -> None:
    from kh.errors import KhError
    from kh.service.libvirt_host import LibvirtHost

    host = LibvirtHost("x86box", "test:///default", None, tmp_path, list)
    with pytest.raises(KhError, match=r"^host x86box: libvirt there offers no ppc ppce500 guest"):
        host.conn  # noqa: B018  # the first use connects and checks
