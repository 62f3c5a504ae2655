"""The appliances' shared shell functions (kh-boot.sh), run by the host's POSIX shell."""

import subprocess
from pathlib import Path

import pytest

BOOT_SH = Path(__file__).resolve().parents[2] / "appliance-builder" / "files" / "kh-boot.sh"


def sh(script: str, cmdline: str = "", tmp: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin"}
    if tmp is not None:
        (tmp / "cmdline").write_text(cmdline + "\n")
        env["KH_CMDLINE"] = str(tmp / "cmdline")
    return subprocess.run(["sh", "-c", f". {BOOT_SH}; {script}"], env=env,
                          capture_output=True, text=True, timeout=10)


@pytest.mark.parametrize("size,mib", [("64M", "64"), ("1G", "1024"), ("65536K", "64"),
                                      ("67108864", "64")])
def test_sizes(size, mib):
    assert sh(f"kh_mib {size}").stdout.strip() == mib


@pytest.mark.parametrize("bad", ["", "M", "12x", "-5M", "1.5G", "64MB"])
def test_bad_sizes_fail(bad):
    assert sh(f"kh_mib '{bad}'").returncode != 0


def test_counts_and_addresses():
    assert sh("kh_valid_count 7 255").returncode == 0
    assert sh("kh_valid_count 256 255").returncode != 0
    assert sh("kh_valid_count 1x").returncode != 0
    assert sh("kh_valid_cidr 10.3.0.7/16").returncode == 0
    assert sh("kh_valid_cidr 10.3.0.300/16").returncode != 0
    assert sh("kh_valid_cidr 10.3.0.7/33").returncode != 0


def test_keys_are_read_and_malformed_ones_named(tmp_path):
    r = sh('kh_read_keys; echo "gw=$KH_GW node=$KH_NODE aoe=$(kh_key aoe) size=$(kh_key disksize)"',
           "console=ttyS0 kh.node=4 kh.gw=10.0.255.254 kh.aoe=1.2 kh.disksize=64M "
           "kh.eth0=10.1.2.300/24 kh.hostname=-bad", tmp_path)
    assert "gw=10.0.255.254 node=4 aoe=1.2 size=64M" in r.stdout
    assert "boot key kh.eth0=10.1.2.300/24 is malformed" in r.stdout
    assert "boot key kh.hostname=-bad is malformed" in r.stdout



@pytest.mark.parametrize("nets,want", [
    ({"eth0": "10.1.0.0/16", "eth1": "10.5.0.0/16", "eth2": "10.6.0.0/16"}, "eth1"),
    ({"eth0": "10.0.0.0/16", "eth1": "10.1.0.0/16", "eth2": "10.9.0.0/16"}, "eth2"),
    ({"eth0": "10.7.0.0/16"}, "eth0"),
    ({"eth0": "10.1.0.0/16", "eth1": ""}, None),
])
def test_private_iface_is_never_a_shared_domain(tmp_path, nets, want):
    """The file server's default export: the first interface in a private domain. With -i its
    eth0 is the public domain, and exporting /export rw,no_root_squash there opened it to
    every principal's public nodes."""
    for name in nets:
        (tmp_path / name).mkdir()
    table = " ".join(f"{k}) echo '{v}' ;;" for k, v in nets.items())
    r = sh(f'KH_SYSNET={tmp_path}; kh_net_of() {{ case "$1" in {table} esac; }}; '
           'kh_private_iface')
    if want is None:
        assert r.returncode != 0 and r.stdout == ""
    else:
        assert r.returncode == 0 and r.stdout.strip() == want


def test_addrs_names_each_interfaces_first_ipv4_address_from_one_ip(tmp_path):
    """Issue 13: kh_addrs ran ip, awk and head for every interface, 0.4 s of an apache node's
    boot under TCG; it now runs one ip and reads its lines itself."""
    net = tmp_path / "net"
    for dev in ("eth0", "eth1", "eth2", "eth10", "lo"):
        (net / dev).mkdir(parents=True)
    calls = tmp_path / "calls"
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "ip").write_text(
        "#!/bin/sh\necho \"$*\" >> " + str(calls) + "\n"
        "cat <<'X'\n"
        "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever\n"
        "2: eth0    inet 10.0.0.3/16 brd 10.0.255.255 scope global eth0\\       valid_lft "
        "forever preferred_lft forever\n"
        "2: eth0    inet 10.0.9.9/16 scope global secondary eth0\\       valid_lft forever\n"
        "4: eth2    inet 10.3.0.3/16 scope global eth2\\       valid_lft forever\n"
        "5: eth10    inet 10.4.0.3/16 scope global eth10\\       valid_lft forever\n"
        "X\n")
    (fake / "ip").chmod(0o755)
    r = subprocess.run(["sh", "-c", f". {BOOT_SH}; kh_addrs"], capture_output=True, text=True,
                       env={"PATH": f"{fake}:/usr/bin:/bin", "KH_SYS_NET": str(net)}, timeout=10)
    assert r.stdout == "eth0=10.0.0.3/16 eth1=none eth10=10.4.0.3/16 eth2=10.3.0.3/16\n"
    assert calls.read_text() == "-4 -o addr show\n"  # once, for every interface


def test_mtu_keys_set_each_interfaces_mtu(tmp_path):
    """Issue 16: a node in a domain that spans hosts gets kh.mtuN (the tunnel's 1450 over a
    1500-byte underlay); ethN comes up with it in the same `ip` call. A malformed or
    out-of-range value is named and ignored (the interface still comes up)."""
    net = tmp_path / "net"
    for dev in ("eth0", "eth1", "eth2"):
        (net / dev).mkdir(parents=True)
    calls = tmp_path / "calls"
    fake = tmp_path / "bin"
    fake.mkdir()
    for tool in ("ip", "hostname"):
        (fake / tool).write_text(f"#!/bin/sh\necho \"{tool} $*\" >> {calls}\n")
        (fake / tool).chmod(0o755)
    (tmp_path / "cmdline").write_text("kh.mtu0=1450 kh.mtu1=65536 kh.mtu2=14x0 kh.mtu3=1450\n")
    r = subprocess.run(["sh", "-c", f". {BOOT_SH}; kh_read_keys; kh_configure_net"],
                       capture_output=True, text=True, timeout=10,
                       env={"PATH": f"{fake}:/usr/bin:/bin", "KH_SYS_NET": str(net),
                            "KH_CMDLINE": str(tmp_path / "cmdline")})
    assert calls.read_text().splitlines() == [
        "ip link set lo up", "ip link set eth0 mtu 1450 up", "ip link set eth1 up",
        "ip link set eth2 up", "hostname node0"]
    assert "boot key kh.mtu1=65536 is out of range" in r.stdout
    assert "boot key kh.mtu2=14x0 is malformed" in r.stdout
