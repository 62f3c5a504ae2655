import dataclasses
from pathlib import Path

import pytest

from kh.errors import UsageError
from kh.hw import board

B = board.BOARDS["ppce500"]


def test_machine_and_memory():
    assert board.machine_args(B) == ["-M", "ppce500", "-cpu", "e500v2"]
    assert board.memory_args(512) == ["-m", "512M"]


def test_console_socket_waits_for_kh():
    args = board.console_args(Path("/run/x.sock"), wait=True)
    assert args == ["-chardev", "socket,id=con0,path=/run/x.sock,server=on,wait=on",
                    "-serial", "chardev:con0"]


def test_loader_refuses_the_region_that_stops_uboot():
    with pytest.raises(UsageError, match="0x2000000"):
        board.loader_args((board.Load(Path("k"), 0x2000000),), B)
    assert board.loader_args((board.Load(Path("k"), 0x8000000),), B) == [
        "-device", "loader,file=k,addr=0x8000000,force-raw=on"]


def test_nics():
    assert board.nic_args((), B) == ["-nic", "none"]
    tap = board.Nic("n0", "52:54:00:00:00:01", tap="khtap0")
    user = board.Nic("c0", "52:54:00:00:01:01", tftp=Path("/srv/t"))
    assert board.nic_args((tap, user), B) == [
        "-netdev", "tap,id=n0,ifname=khtap0,script=no,downscript=no",
        "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:00:00:01,romfile=,addr=0x1",
        "-netdev", "user,id=c0,restrict=on,tftp=/srv/t",
        "-device", "virtio-net-pci,netdev=c0,mac=52:54:00:00:01:01,romfile=,addr=0x5"]


def test_nics_share_one_interrupt_line_and_the_balloon_has_its_own():
    """Issue 13: ppce500 wires INTA of PCI slot S to MPIC line S % 4 (+1). The balloon (INTx
    only in QEMU 7.2) beside eth0's line took 100000 spurious interrupts at boot in khd's web
    farm until Linux disabled the line; NICs in slots 1, 5, 9, 13 leave line 2 to it."""
    nics = tuple(board.Nic(f"d{i}", f"52:54:00:00:00:0{i}", tap=f"t{i}") for i in range(4))
    slots = [int(d.rsplit("addr=", 1)[1], 16) for d in board.nic_args(nics, B)
             if d.startswith(B.nic_model)]
    assert slots == sorted(slots)  # PCI order is eth order: d0 is eth0, ...
    balloon = int(board.balloon_args(B, True)[1].rsplit("addr=", 1)[1], 16)
    assert len({s % 4 for s in slots}) == 1 and balloon % 4 not in {s % 4 for s in slots}
    with pytest.raises(UsageError, match="at most 4 network interfaces"):
        board.nic_args(nics + (board.Nic("d4", "52:54:00:00:00:04", tap="t4"),), B)


def test_nics_need_no_option_rom():
    """Every NIC says romfile= (none): a ppce500 node cannot run QEMU's x86 iPXE ROMs, and a
    host without ipxe-qemu (a mere Recommends of QEMU) would fail to start the node at all."""
    nics = tuple(board.Nic(f"d{i}", f"52:54:00:00:00:0{i}", tap=f"t{i}") for i in range(4))
    devices = [a for a in board.nic_args(nics, B) if a.startswith(B.nic_model)]
    assert len(devices) == 4
    assert all("romfile=" in d.split(",") for d in devices)


def test_whole_command_line():
    spec = board.NodeSpec(name="n1", bios=Path("/u.elf"), console=Path("/c.sock"),
                          qmp=Path("/q.sock"), loads=(board.Load(Path("/k"), 0x8000000),))
    argv = board.qemu_argv(spec)
    assert argv[0] == "qemu-system-ppc"
    assert argv[argv.index("-bios") + 1] == "/u.elf"
    assert argv[argv.index("-name") + 1] == "n1,process=n1"
    assert "-nodefaults" in argv and argv[argv.index("-qmp"):argv.index("-qmp") + 2] == \
        ["-qmp", "unix:/q.sock,server=on,wait=off"]
    assert argv[-2:] == ["-nic", "none"]


@pytest.mark.parametrize("text,mib", [("256M", 256), ("1G", 1024), ("512", 512), ("2g", 2048)])
def test_parse_mem(text, mib):
    assert board.parse_mem(text) == mib


@pytest.mark.parametrize("text", ["", "abc", "-5M", "0", "12T"])
def test_parse_mem_bad(text):
    with pytest.raises(UsageError):
        board.parse_mem(text)


def test_memory_checks(tmp_path):
    k = tmp_path / "k"
    k.write_bytes(b"x" * 1000)
    small = board.NodeSpec(name="n", bios=k, console=k, mem_mib=128)
    with pytest.raises(UsageError, match="too little memory"):
        board.check_memory(small)
    spec = board.NodeSpec(name="n", bios=k, console=k, mem_mib=256,
                          loads=(board.Load(k, 256 * 1024 * 1024 - 10),))
    with pytest.raises(UsageError, match="does not fit"):
        board.check_memory(spec)


def test_shared_ram_is_a_memfd_backend_named_by_the_machine():
    assert board.memory_args(256) == ["-m", "256M"]
    assert board.memory_args(256, shared_ram=True) == [
        "-object", "memory-backend-memfd,id=ram0,size=256M,share=on", "-m", "256M"]
    b = board.BOARDS["ppce500"]
    assert board.machine_args(b, shared_ram=True) == [
        "-M", "ppce500,memory-backend=ram0", "-cpu", "e500v2"]


def test_gdb_socket_for_debugging():
    assert board.gdb_args(None) == []
    assert board.gdb_args(Path("/r/g.sock")) == [
        "-chardev", "socket,id=gdb0,path=/r/g.sock,server=on,wait=off", "-gdb", "chardev:gdb0"]


def test_sandbox_denies_obsolete_calls_new_processes_privileges_and_scheduling():
    """Issue 10: node QEMUs ran with no sandbox. As root, every set*uid is denied too."""
    assert board.sandbox_args(False, None) == []
    assert board.sandbox_args(True, None) == [
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]


def test_a_qemu_that_drops_root_keeps_set_uid_for_the_drop():
    """QEMU 7.2 installs its filter before -runas switches users: with
    elevateprivileges=deny it dies of SIGSYS at that switch (measured), so only the drop's
    own calls stay allowed, and the dropped process has no capability to use them."""
    assert board.sandbox_args(True, "kh-node") == [
        "-sandbox", "on,obsolete=deny,spawn=deny,resourcecontrol=deny"]
    assert board.user_args("kh-node") == ["-runas", "kh-node"]
    assert board.user_args(None) == []


def test_code_cache_is_bounded_only_when_asked():
    assert board.accel_args(None) == []
    assert board.accel_args(64) == ["-accel", "tcg,tb-size=64"]


def test_whole_command_line_of_a_confined_node():
    spec = board.NodeSpec(name="n1", bios=Path("/u.elf"), console=Path("/c.sock"),
                          sandbox=True, run_as="kh-node", code_cache_mib=64)
    argv = board.qemu_argv(spec)
    assert argv[argv.index("-sandbox") + 1] == "on,obsolete=deny,spawn=deny,resourcecontrol=deny"
    assert argv[argv.index("-runas") + 1] == "kh-node"
    assert argv[argv.index("-accel") + 1] == "tcg,tb-size=64"
    plain = board.qemu_argv(board.NodeSpec(name="n1", bios=Path("/u.elf"),
                                           console=Path("/c.sock")))
    assert not {"-sandbox", "-runas", "-accel"} & set(plain)


@pytest.mark.parametrize("user", ["kh-node", None])
def test_khd_nodes_are_sandboxed_with_a_bounded_code_cache(tmp_path, monkeypatch, user):
    from kh.service import qemunode
    from kh.service.config import ServiceConfig

    monkeypatch.setattr(qemunode, "node_user", lambda: user)
    spec = qemunode.node_spec(ServiceConfig(state_dir=tmp_path, images=tmp_path, prefix="kb"), 3)
    argv = board.qemu_argv(spec)
    assert argv[argv.index("-sandbox") + 1] == board.sandbox_args(True, user)[1]
    assert ("-runas" in argv) == (user is not None)
    assert argv[argv.index("-accel") + 1] == f"tcg,tb-size={qemunode.CODE_CACHE_MIB}"


def test_free_page_reporting_adds_a_balloon_only_when_asked():
    b = board.BOARDS["ppce500"]
    assert board.balloon_args(b, False) == []
    assert board.balloon_args(b, True) == [
        "-device", "virtio-balloon-pci,free-page-reporting=on,addr=0x2"]
    plain = dataclasses.replace(b, balloon_model=None)
    assert board.balloon_args(plain, True) == []


def test_khd_nodes_give_free_ram_back_and_keep_a_small_code_cache(tmp_path):
    """Issue 13: a booted node's QEMU held its whole 64 MiB code cache and every page its
    guest ever touched."""
    from kh.service import qemunode
    from kh.service.config import ServiceConfig

    spec = qemunode.node_spec(ServiceConfig(state_dir=tmp_path, images=tmp_path, prefix="kb"), 3)
    argv = board.qemu_argv(spec)
    balloon = board.balloon_args(spec.board, True)
    at = argv.index(balloon[1])
    assert argv[at - 1:at + 1] == balloon
    assert qemunode.CODE_CACHE_MIB <= 24
