"""The appliances' sourced shell helpers (kh-boot.sh, kh-aoe.sh, kh-root.sh) keep their working
variables ``local``: an /init that calls one keeps its own ``addr``, ``a``, ``path``, ``i`` ...
(an init's loop variable was one call away from being overwritten). Only the documented
outputs change: KH_* (kh_read_keys' keys, KH_WHY). Each helper runs under the host's POSIX
shell with stand-ins for the node's programs (ip, hostname, wget, aoe-sancheck ...), so
nothing of the host is changed; the shell's variables are compared before and after. Not run
here: the helpers that write outside the test's directory (kh_aoe_serve: /var/log, kh_aoe_mount
and kh_aoe_one_writer: /tmp) or act on the host (kh_root_switch: mount --move)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

FILES = Path(__file__).resolve().parents[2] / "appliance-builder" / "files"
KEY = "ssh-ed25519:AAAAC3NzaC1lZDI1NTE5AAAAIHZl8qRZQj6WmZKIqq7V3nM9uQq2v8yZ0cJ2y1b5Vd0h"
STANDINS = {  # the node's programs: harmless answers
    "ip": "case \"$*\" in *addr*) echo '2: eth0    inet 10.3.0.7/16 brd 10.3.255.255';; esac",
    "hostname": "echo node0",
    "udhcpc": "exit 1",
    "wget": "exit 1",
    "ipcalc": "echo NETWORK=10.3.0.0; echo PREFIX=16",
    "aoe-sancheck": "printf 'eth0:\\ne1.0 525400000100 17\\n'",
}
CALLS = [
    "kh_valid_cidr 10.3.0.7/16",
    "kh_valid_ip 10.3.0.7",
    "kh_mib 64M",
    "kh_pin_channel 127.0.0.1:7422#" + KEY,
    "kh_fetch_image 127.0.0.1:9 shell.cpio.gz.uimg $T/img",
    "kh_read_keys",
    "kh_configure_net",
    "kh_addrs",
    "kh_configured",
    "kh_private_iface",
    "kh_net_of eth0",
    "kh_aoe_addr 1.0",
    "kh_aoe_unanswered 1 0 eth0",
    "kh_root_valid_sshkey " + KEY,
]
# the shell's own, and what the helpers are there to set
OUTPUTS = re.compile(r"^(KH_\w*|_|OPTIND|PPID|LINENO|RANDOM|SECONDS)$")


def variables(text: str) -> dict[str, str]:
    """`set`'s listing (NAME='value' lines, values possibly over several lines), by name."""
    out: dict[str, str] = {}
    name = None
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", line)
        if m:
            name = m.group(1)
            out[name] = m.group(2)
        elif name is not None:
            out[name] += "\n" + line
    return out


@pytest.mark.parametrize("call", CALLS)
def test_a_helper_changes_no_variable_of_its_caller(call: str, tmp_path: Path) -> None:
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for tool, body in STANDINS.items():
        (bin_ / tool).write_text(f"#!/bin/sh\n{body}\n")
        (bin_ / tool).chmod(0o755)
    net = tmp_path / "net"
    (net / "eth0").mkdir(parents=True)
    (tmp_path / "cmdline").write_text("kh.eth0=10.3.0.7/16 kh.gw=10.3.0.1 kh.web=1 quiet\n")
    script = (f". {FILES / 'kh-boot.sh'}; . {FILES / 'kh-aoe.sh'}; . {FILES / 'kh-root.sh'}\n"
              f"set > {tmp_path / 'before'}\n{call} >/dev/null 2>&1\n"
              f"set > {tmp_path / 'after'}\n")
    r = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=20,
                       env={"PATH": f"{bin_}:/usr/bin:/bin", "T": str(tmp_path),
                            "KH_CMDLINE": str(tmp_path / "cmdline"),
                            "KH_SYS_NET": str(net), "KH_SYSNET": str(net),
                            "KH_CHANNEL_HOME": str(tmp_path / "channel")})
    assert r.returncode == 0, r.stderr
    before = variables((tmp_path / "before").read_text())
    after = variables((tmp_path / "after").read_text())
    changed = sorted(k for k in before.keys() | after.keys()
                     if before.get(k) != after.get(k) and not OUTPUTS.match(k))
    assert changed == [], f"{call.split()[0]} leaves {changed} set in its caller"
