"""The disk server's khgetdisk (appliance-builder/files/khgetdisk), run by the host's POSIX
shell with a wget that answers like khd and a khget and dbclient that record being called: more
disks than the service has free nodes is said in one line, and nothing is allocated, loaded or
recorded."""

from __future__ import annotations

import subprocess
from pathlib import Path

from kh.service import tokens

KHGETDISK = Path(__file__).resolve().parents[2] / "appliance-builder" / "files" / "khgetdisk"
FAKE_WGET = """#!/bin/sh
# answers GET /v1/status like khd; anything else is recorded and fails
for a in "$@"; do last=$a; done
case "$last" in
*/v1/status) printf 'khd running: 8 nodes, %s free, 5 allocated\\n' "$FREE" ;;
*) echo "wget $last" >> "$CALLS"; exit 1 ;;
esac
"""
FAKE_KHGET = """#!/bin/sh
echo "khget $*" >> "$CALLS"
if [ -n "$REFUSE" ]; then
    echo "khget: cannot be met: too few free nodes, a quota, or the token's node budget" >&2
    exit 1
fi
printf 'con9@10.1.255.254\\nprotocol: uboot\\nnetwork 4 : eth0\\nnodes: 7\\n'
"""
TOKEN = tokens.new_secret()
FAKE_DBCLIENT = """#!/bin/sh
echo "dbclient $*" >> "$CALLS"
exit 1
"""


def khgetdisk(tmp: Path, *args: str, free: int, refuse: bool = False,
              dbclient: str = FAKE_DBCLIENT) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("wget", FAKE_WGET), ("khget", FAKE_KHGET), ("dbclient", dbclient)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    state = tmp / "state"
    state.mkdir(exist_ok=True)
    for img in ("uImage", "vblade.cpio.gz.uimg"):  # already fetched: nothing to download
        (state / img).write_bytes(b"x")
    conf = tmp / "khgetdisk.conf"
    conf.write_text(f"server=10.1.255.254:7480\nchannel=10.1.255.254:7422\nuser=corp1\n"
                    f"token={TOKEN}\ndisknet=4\nshelf=1\ndisksize=16M\n")
    (tmp / "channel" / ".ssh").mkdir(parents=True, exist_ok=True)
    (tmp / "channel" / ".ssh" / "known_hosts").write_text("10.1.255.254 ssh-rsa AAAA\n")
    calls = tmp / "calls"
    calls.unlink(missing_ok=True)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "KHGETDISK_CONF": str(conf),
           "KHGETDISK_DIR": str(state), "CALLS": str(calls), "FREE": str(free),
           "REFUSE": "1" if refuse else "", "KH_CHANNEL_HOME": str(tmp / "channel")}
    r = subprocess.run(["sh", str(KHGETDISK), *args], env=env, capture_output=True, text=True,
                       timeout=20)
    return r, calls.read_text().splitlines() if calls.exists() else []


def test_more_disks_than_free_nodes_is_said_and_nothing_is_asked(tmp_path):
    r, calls = khgetdisk(tmp_path, "5", free=3)
    assert r.returncode == 1, r
    assert r.stderr.strip() == ("khgetdisk: 5 disks asked for, but the service has 3 free "
                                "nodes; nothing was allocated"), r.stderr
    assert calls == []  # no khget, no channel
    assert not (tmp_path / "state" / "disks").exists() or \
        (tmp_path / "state" / "disks").read_text() == ""


def test_a_refused_khget_is_said_and_nothing_is_loaded_or_recorded(tmp_path):
    # free enough when asked first, then khget is refused (another principal took them)
    r, calls = khgetdisk(tmp_path, "2", free=2, refuse=True)
    assert r.returncode == 1, r
    assert "khget refused 2 disks" in r.stderr and "nothing was allocated" in r.stderr, r.stderr
    assert calls == ["khget -t " + calls[0].split()[2] + " -n 4 corp1 2"]
    assert (tmp_path / "state" / "disks").read_text() == ""


def test_enough_free_nodes_goes_on_to_allocate(tmp_path):
    r, calls = khgetdisk(tmp_path, "2", free=2)
    assert calls[0].startswith("khget ") and calls[1].startswith("dbclient "), calls
    assert "loading the kernel failed" in r.stderr


# answers over the channel as khd does: a load, an AoE address (api+USER), a boot
WORKING_DBCLIENT = """#!/bin/sh
echo "dbclient $* password=$DROPBEAR_PASSWORD" >> "$CALLS"
cat > /dev/null
case "$*" in
*" load "*) echo "node 7: 1 bytes at 0x08000000 crc32 8cdc1683" ;;
*" aoe-address "*) echo e1.3 ;;
esac
"""


def test_the_aoe_address_is_asked_over_the_channel_with_the_token(tmp_path):
    """Not by wget (a POST in clear on the public domain): api+USER over the pinned channel,
    the token in dbclient's environment (issue 11)."""
    r, calls = khgetdisk(tmp_path, "1", free=2, dbclient=WORKING_DBCLIENT)
    assert r.returncode == 0 and "booted e1.3 (allocation 9, nodes 7)" in r.stdout, r
    asked = [c for c in calls if "aoe-address" in c]
    assert asked == [f"dbclient -T -p 7422 api+corp1@10.1.255.254 aoe-address -s 1 7 4 "
                     f"password={TOKEN}"], calls
    assert not any(c.startswith("wget") for c in calls), calls
    assert (tmp_path / "state" / "disks").read_text() == "e1.3 node 7 9\n"
