"""The server appliances' shell helpers (kh-aoe.sh, kh-root.sh), run by the host's POSIX shell
with stand-ins for the node's programs."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

FILES = Path(__file__).resolve().parents[2] / "appliance-builder" / "files"
KEY = "ssh-ed25519:AAAAC3NzaC1lZDI1NTE5AAAAIHZl8qRZQj6WmZKIqq7V3nM9uQq2v8yZ0cJ2y1b5Vd0h"

# What aoe-sancheck -v prints (aoetools 36): per interface, one line per answer, then a summary
# whose lines must not be taken for answers.
SANCHECK = """Probing...done.
eth1:
e1.0 525400000100 17
e1.1 525400000200 17
e1.1 525400000300 17

eth2:
e1.0 525400000900 17

==========================================
DEVICE SUMMARY
==========================================
Device\tMacs\tPayload\tLocal Interfaces
e1.0\t   2\t8704\teth1,eth2
"""


def sh(script: str, tmp: Path, sancheck: str = SANCHECK) -> subprocess.CompletedProcess[str]:
    bin_ = tmp / "bin"
    bin_.mkdir(exist_ok=True)
    fake = bin_ / "aoe-sancheck"
    (tmp / "sancheck.out").write_text(sancheck)
    fake.write_text(f"#!/bin/sh\ncat {tmp / 'sancheck.out'}\n")
    fake.chmod(0o755)
    return subprocess.run(
        ["sh", "-c", f". {FILES / 'kh-boot.sh'}; . {FILES / 'kh-aoe.sh'}; "
                     f". {FILES / 'kh-root.sh'}; {script}"],
        env={"PATH": f"{bin_}:/usr/bin:/bin"}, capture_output=True, text=True, timeout=10)


@pytest.mark.parametrize("value,want", [("1.0", "1 0"), ("e3.7", "3 7"),
                                        ("65534.254", "65534 254")])
def test_aoe_addresses(tmp_path, value, want):
    assert sh(f"kh_aoe_addr {value}", tmp_path).stdout.strip() == want


@pytest.mark.parametrize("bad", ["", "1", "1.", ".1", "12.x", "1.255", "65535.0", "1.2.3", "e",
                                 "-1.0"])
def test_bad_aoe_addresses_fail(tmp_path, bad):
    assert sh(f"kh_aoe_addr '{bad}'", tmp_path).returncode != 0


def test_the_macs_answering_an_address_per_interface(tmp_path):
    assert sh("kh_aoe_macs e1.1", tmp_path).stdout.split() == ["52:54:00:00:02:00",
                                                              "52:54:00:00:03:00"]
    assert sh("kh_aoe_macs e1.0", tmp_path).stdout.split() == ["52:54:00:00:01:00",
                                                              "52:54:00:00:09:00"]
    assert sh("kh_aoe_macs e1.0 eth2", tmp_path).stdout.split() == ["52:54:00:00:09:00"]
    assert sh("kh_aoe_macs e1.2", tmp_path).stdout.split() == []


def test_an_answered_address_is_not_served_again(tmp_path):
    r = sh('kh_aoe_unanswered 1 0 eth1 || echo "refused: $KH_WHY"', tmp_path)
    assert "refused: AoE address e1.0 already answered by MAC 52:54:00:00:01:00" in r.stdout
    r = sh('kh_aoe_unanswered 1 5 eth1 && echo free', tmp_path)
    assert r.stdout.strip() == "free"


@pytest.mark.parametrize("bad", [
    "ssh-ed25519", "ssh-dss:AAAAB3NzaC1kc3MAAACBAJ", "ssh-ed25519:short",
    "ssh-ed25519:AAAAC3NzaC1lZDI1NTE5AAAA,command=x", 'ssh-ed25519:AAAAC3NzaC1lZDI1"x',
    "x" + KEY])
def test_malformed_ssh_keys_are_refused(tmp_path, bad):
    assert sh(f"kh_root_valid_sshkey '{bad}'", tmp_path).returncode != 0


def test_the_key_and_the_ssh_servers_start_land_in_the_new_root(tmp_path):
    root = tmp_path / "newroot"
    (root / "etc").mkdir(parents=True)
    r = sh(f"kh_root_valid_sshkey {KEY} && kh_root_ssh {root} {KEY} && echo ok", tmp_path)
    assert r.stdout.strip() == "ok", r
    keys = root / "root/.ssh/authorized_keys"
    assert keys.read_text() == KEY.replace(":", " ", 1) + "\n"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600
    assert stat.S_IMODE((root / "root/.ssh").stat().st_mode) == 0o700
    rc = root / "etc/rc.d/50-kh-sshd"
    assert stat.S_IMODE(rc.stat().st_mode) == 0o755
    text = rc.read_text()
    assert "dropbear -s " in text and "kh: ssh host key" in text  # keys only; the key shown


def test_a_root_it_cannot_write_is_named(tmp_path):
    root = tmp_path / "ro"
    root.mkdir()
    (root / "root").write_text("")  # not a directory: mkdir fails even for root, as on a ro root
    r = sh(f'kh_root_ssh {root} {KEY} || echo "failed: $KH_WHY"', tmp_path)
    assert "failed: cannot write /root/.ssh and /etc/rc.d in the new root" in r.stdout
    assert not (root / "etc/rc.d").exists() or not any((root / "etc/rc.d").iterdir())
