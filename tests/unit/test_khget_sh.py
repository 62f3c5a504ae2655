"""The in-node khget (appliance-builder/files/khget), run by the host's POSIX shell with a
wget that records what it was asked: it sends a token (-t, a file, $KH_TOKEN or the boot key
kh.token=) instead of a credential, and never both."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from kh.service import tokens

KHGET = Path(__file__).resolve().parents[2] / "appliance-builder" / "files" / "khget"
FAKE_WGET = """#!/bin/sh
# records its argv, one word a line, and answers like khd (or fails as busybox wget does)
printf '%s\\n' "$@" > "$WGET_LOG"
if [ -n "$WGET_STATUS" ]; then
    echo "wget: server returned error: HTTP/1.1 $WGET_STATUS" >&2
    exit 1
fi
echo 'con1@10.1.255.254'
"""


def khget(tmp: Path, *args: str, cmdline: str = "kh.server=10.1.255.254:7480",
          env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str],
                                                       dict | None]:
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "wget").write_text(FAKE_WGET)
    (bin_dir / "wget").chmod(0o755)
    (tmp / "cmdline").write_text(cmdline + "\n")
    log = tmp / "wget.log"
    log.unlink(missing_ok=True)
    e = {"PATH": f"{bin_dir}:/usr/bin:/bin", "KH_CMDLINE": str(tmp / "cmdline"),
         "WGET_LOG": str(log), **(env or {})}
    r = subprocess.run(["sh", str(KHGET), *args], env=e, capture_output=True, text=True,
                       timeout=10)
    if not log.exists():
        return r, None
    argv = log.read_text().splitlines()
    body = json.loads(argv[argv.index("--post-data") + 1])
    return r, body


TOKEN = tokens.new_secret()


def test_token_by_option_file_environment_and_boot_key(tmp_path):
    r, body = khget(tmp_path, "-t", TOKEN, "-n", "5", "alice", "2")
    assert r.returncode == 0 and r.stdout == "con1@10.1.255.254\n", r.stderr
    assert body == {"user": "alice", "count": 2, "p": 0, "n": "5", "i": False, "x": False,
                    "token": TOKEN}
    f = tmp_path / "tok"
    f.write_text(TOKEN + "\n")
    assert khget(tmp_path, "-t", str(f), "alice")[1]["token"] == TOKEN  # type: ignore[index]
    assert khget(tmp_path, "alice", env={"KH_TOKEN": TOKEN})[1]["token"] == TOKEN  # type: ignore[index]
    _, body = khget(tmp_path, "alice", cmdline=f"kh.server=10.1.255.254:7480 kh.token={TOKEN}")
    assert body is not None and body["token"] == TOKEN and "credential" not in body


def test_a_credential_is_sent_without_the_boot_token(tmp_path):
    _, body = khget(tmp_path, "-c", "secret", "alice",
                    cmdline=f"kh.server=10.1.255.254:7480 kh.token={TOKEN}")
    assert body is not None and body["credential"] == "secret" and "token" not in body


@pytest.mark.parametrize("args", [["-c", "secret", "-t", TOKEN, "alice"],
                                  ["-t", "kht_short", "alice"],
                                  ["-t", TOKEN + "x", "alice"]])
def test_refused_before_sending(tmp_path, args):
    r, body = khget(tmp_path, *args)
    assert r.returncode == 2 and body is None and r.stderr.startswith("khget: ")


def test_no_server_no_request(tmp_path):
    r, body = khget(tmp_path, "-t", TOKEN, "alice", cmdline="console=ttyS0")
    assert r.returncode == 1 and body is None and "kh.server" in r.stderr


@pytest.mark.parametrize(("status", "says"), [("403 Forbidden", "out of the token's scope"),
                                              ("409 Conflict", "the token's node budget"),
                                              ("429 Too Many Requests", "wait and try again")])
def test_a_refusal_says_what_it_can_mean(tmp_path, status, says):
    r, body = khget(tmp_path, "-t", TOKEN, "alice", env={"WGET_STATUS": status})
    assert r.returncode == 1 and body is not None and r.stdout == ""
    assert says in r.stderr and status in r.stderr, r.stderr
