"""A node's libvirt domain XML (kh.hw.domainxml): rendered from its frozen spec, read back, run
against libvirt's test driver, and turned into the QEMU command line libvirt would run
(the embedded QEMU driver's domxml-to-native, no daemon)."""

from __future__ import annotations

import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from kh.errors import UsageError
from kh.hw import domainxml
from kh.hw.board import BOARDS

B = BOARDS["ppce500"]


def spec(**kw: object) -> domainxml.DomainSpec:
    nics = tuple(domainxml.DomainNic(f"52:54:00:00:07:0{s}", f"kh7s{s}", B.nic_pci_slots[s])
                 for s in range(4))
    values: dict[str, object] = dict(name="kh-node7", prefix="kh", number=7,
                                     loader=Path("/srv/kh/u-boot.elf"),
                                     emulator="/usr/bin/qemu-system-ppc", nics=nics)
    values.update(kw)
    return domainxml.DomainSpec(**values)  # type: ignore[arg-type]


def test_the_domain_is_the_direct_backends_node() -> None:
    root = ET.fromstring(domainxml.render(spec()))
    assert root.get("type") == "qemu"
    assert root.findtext("name") == "kh-node7"
    assert root.findtext("uuid") == domainxml.domain_uuid("kh-node7")
    assert root.find("memory").text == "256" and root.find("memory").get("unit") == "MiB"
    os_type = root.find("os/type")
    assert (os_type.get("arch"), os_type.get("machine")) == ("ppc", "ppce500")
    assert root.find("os/loader").get("type") == "rom"
    assert root.findtext("os/loader") == "/srv/kh/u-boot.elf"
    assert root.find("memoryBacking/source").get("type") == "file"
    assert root.find("memoryBacking/access").get("mode") == "shared"
    assert root.find("devices/memballoon").get("model") == "none"
    assert root.find("devices/controller[@type='usb']").get("model") == "none"
    assert root.find("devices/serial").get("type") == "pty"
    nics = root.findall("devices/interface")
    assert [n.get("type") for n in nics] == ["ethernet"] * 4
    assert [n.find("target").get("dev") for n in nics] == [f"kh7s{s}" for s in range(4)]
    assert {n.find("target").get("managed") for n in nics} == {"no"}
    assert {n.find("rom").get("enabled") for n in nics} == {"no"}
    assert {n.find("link").get("state") for n in nics} == {"down"}  # up only once allocated
    assert [int(n.find("address").get("slot"), 16) for n in nics] == list(B.nic_pci_slots)


def test_values_are_escaped() -> None:
    root = ET.fromstring(domainxml.render(spec(name="a<b>&'c\"", loader=Path("/x/<y>"))))
    assert root.findtext("name") == "a<b>&'c\""
    assert root.findtext("os/loader") == "/x/<y>"


def test_bad_specs_are_refused() -> None:
    with pytest.raises(UsageError, match="RAM source"):
        domainxml.render(spec(ram_source="hugepages"))
    with pytest.raises(UsageError, match="too little memory"):
        domainxml.render(spec(mem_mib=64))
    with pytest.raises(UsageError, match="at most 4 network interfaces"):
        domainxml.render(spec(nics=spec().nics + spec().nics[:1]))


def test_link_change_xml_names_the_nic_by_its_mac() -> None:
    nic = spec().nics[2]
    el = ET.fromstring(domainxml.nic_xml(nic, True))
    assert el.find("mac").get("address") == nic.mac
    assert el.find("link").get("state") == "up"
    assert ET.fromstring(domainxml.nic_xml(nic, False)).find("link").get("state") == "down"


def test_libvirt_test_driver_takes_the_domain() -> None:
    libvirt = pytest.importorskip("libvirt")
    conn = libvirt.open("test:///default")
    try:
        dom = conn.defineXML(domainxml.render(spec()))
        back = ET.fromstring(dom.XMLDesc(0))
        assert back.find("os/type").get("machine") == "ppce500"
        assert back.findtext("os/loader") == "/srv/kh/u-boot.elf"
        assert dom.UUIDString() == domainxml.domain_uuid("kh-node7")
        nics = back.findall("devices/interface")
        assert [int(n.find("address").get("slot"), 16) for n in nics] == list(B.nic_pci_slots)
        assert {n.find("rom").get("enabled") for n in nics} == {"no"}
        assert back.find("devices/memballoon").get("model") == "none"
        dom.undefine()
    finally:
        conn.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="the embedded QEMU driver runs as root here")
def test_libvirt_runs_the_qemu_command_line_we_mean(tmp_path: Path) -> None:
    libvirt = pytest.importorskip("libvirt")
    qemu = shutil.which("qemu-system-ppc")
    if qemu is None:
        pytest.skip("no qemu-system-ppc")
    from kh.hw.virtstream import check_ppc, event_loop
    event_loop()  # the embedded driver needs one
    loader = tmp_path / "u-boot.elf"
    loader.write_bytes(b"\x7fELF")
    # (one embedded driver per process: the host check of kh.hw.virtstream is tested here too)
    conn = libvirt.open(f"qemu:///embed?root={tmp_path / 'root'}")
    try:
        argv = conn.domainXMLToNative("qemu-argv",
                                      domainxml.render(spec(loader=loader, emulator=qemu)), 0)
        assert check_ppc(conn, "here") == qemu  # this host offers ppc ppce500 guests
    finally:
        conn.close()
    assert "-machine ppce500" in argv
    assert f"-bios {loader}" in argv
    assert "memory-backend-file" in argv and "share" in argv
    assert '"share":true' in argv and "/lib/qemu/ram/-1-kh-node7/" in argv  # memload's path
    assert argv.count("virtio-net-pci") == 4  # (domxml-to-native remakes NICs: no slots, ROM)
    assert "usb=off" in argv and "balloon" not in argv and "-nodefaults" in argv
    assert "-cpu" not in argv  # ppce500's default, e500v2 (<cpu><model> is refused for ppc)
