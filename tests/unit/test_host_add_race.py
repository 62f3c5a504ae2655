"""`kh host add` keeps its bound when adds race (TRIAL16, issue 16): the count of hosts was
checked before the seconds of checks each add makes (ssh, ARP, libvirt), outside khd's lock, so
adds run side by side all passed it and khd took more than MAX_HOSTS."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from kh.hw import underlay
from kh.hw.stretch import Underlay
from kh.service import hosts as hosts_mod
from kh.service.hostspec import HostSpec
from tests.unit.fake_khd import make_service


@pytest.fixture
def svc(tmp_path, monkeypatch):
    s = make_service(tmp_path, monkeypatch, nodes=1)
    yield s
    s.store.close()


def test_adds_side_by_side_take_no_more_than_the_bound(svc, monkeypatch):
    monkeypatch.setattr(hosts_mod, "MAX_HOSTS", 2)
    monkeypatch.setattr(svc.fabric, "local_underlay",
                        lambda: (Underlay("kuul0", "192.0.2.1"), 1500))
    monkeypatch.setattr(underlay, "check_reaches", lambda *a: 1500)
    names = ["b", "c", "d", "e"]
    checking = threading.Barrier(len(names), timeout=10)

    def far(spec):  # every add is past the count's check before any records
        checking.wait()
        return {"ifname": "kbul0", "address": f"192.0.2.{10 + names.index(spec.name)}",
                "mtu": 1500}

    monkeypatch.setattr(svc.hosts, "_far_underlay", far)
    monkeypatch.setattr(svc.hosts, "_probe", lambda spec: 1)
    monkeypatch.setattr(svc.hosts, "_connect", lambda row, check=False: None)

    def add(name):
        try:
            svc.hosts.add(HostSpec(name, f"qemu+ssh://root@{name}/system", prefix="kb"))
            return "added"
        except hosts_mod.HostRefused as e:
            return e.message

    with ThreadPoolExecutor(len(names)) as ex:
        got = list(ex.map(add, names))
    assert got.count("added") == 2, got
    assert len(svc.store.hosts()) == 2
    assert all("the most it takes" in g for g in got if g != "added"), got
