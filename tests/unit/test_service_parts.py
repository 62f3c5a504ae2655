from pathlib import Path

from kh.hw import board
from kh.service.config import ServiceConfig
from kh.service.qemunode import mac, node_spec, node_tag


def cfg(tmp: Path) -> ServiceConfig:
    return ServiceConfig(state_dir=tmp, images=tmp, prefix="kq")


def test_node_argv_carries_the_tag_clean_and_reattach_look_for(tmp_path):
    c = cfg(tmp_path)
    argv = board.qemu_argv(node_spec(c, 7))
    name = argv[argv.index("-name") + 1]
    # procid.tagged (khd, kh clean) and control.kh_qemu_pids match exactly these
    assert name == f"{node_tag(c, 7)},process={node_tag(c, 7)}"
    assert ",process=kq-node" in name


def test_every_node_has_four_tap_nics_with_unique_macs(tmp_path):
    c = cfg(tmp_path)
    spec = node_spec(c, 300)
    assert [n.tap for n in spec.nics] == ["kq300s0", "kq300s1", "kq300s2", "kq300s3"]
    assert len({n.mac for n in spec.nics}) == 4
    assert mac(300, 2) == "52:54:00:01:2c:02"
    assert not spec.wait_for_console  # khd connects after QEMU starts paused (-S)


def test_names_fit_linux_interface_limit():
    from kh.hw.tags import FabricConfig
    f = FabricConfig(prefix="kt9999")
    assert len(f.tap(65000, 3)) <= 15 and len(f.bridge(253)) <= 15
