"""The in-node khget (appliance-builder/files/khget), run by the host's POSIX shell.

With a dbclient that records what it was asked: the request goes over the control channel's
ssh as ``api+USER`` to the pinned host (kh.channel), the secret (-t, a file, $KH_TOKEN, the
boot key kh.token=, or -c) only in dbclient's environment, never in an argv, never by wget;
no pin, no request; khd's one-line reason is shown as it came.

With Debian's real dbclient (the node's version, 2022.83): against khd's own ssh server and
the real Service, an allocation by token end to end; against a dropbear server showing another
host key, nothing is sent (a dbclient run with -y would log in: the test would fail)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import paramiko
import pytest

from kh.service import tokens
from kh.service.access import ServiceAccess
from kh.service.pins import channel_boot_key
from tests.unit.fake_khd import make_service, post, serving_tcp, text_of
from tests.unit.sshd_fakes import serve
from tests.unit.test_channel_pin import dropbear, key_file, pin, server_key

KHGET = Path(__file__).resolve().parents[2] / "appliance-builder" / "files" / "khget"
CHANNEL = "kh.channel=10.1.255.254:7422#ssh-rsa:AAAAB3NzaC1yc2EAAAADAQABAAABAQC"
FAKE_DBCLIENT = """#!/bin/sh
# records its argv (one word a line), the secret and HOME it was given, and what stdin held;
# answers like khd over the channel (or fails as dbclient or khd do)
printf '%s\\n' "$@" > "$LOG"
printf '%s\\n' "$DROPBEAR_PASSWORD" > "$LOG.password"
printf '%s\\n' "$HOME" > "$LOG.home"
cat > "$LOG.stdin"
if [ -n "$DB_STDERR" ]; then
    printf '%s\\n' "$DB_STDERR" >&2
    exit "$DB_STATUS"
fi
printf 'con1@10.1.255.254\\nprotocol: uboot\\n'
"""
FAKE_WGET = """#!/bin/sh
echo "wget $*" >> "$LOG.wget"
exit 1
"""


def khget(tmp: Path, *args: str, cmdline: str = CHANNEL, pinned: bool = True,
          env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str],
                                                       dict[str, object] | None]:
    """Run khget ARGS → (its result, what dbclient was given: argv, password, home, stdin;
    None when it was not run)."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("dbclient", FAKE_DBCLIENT), ("wget", FAKE_WGET)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp / "cmdline").write_text(cmdline + "\n")
    home = tmp / "channel"
    if pinned:
        (home / ".ssh").mkdir(parents=True, exist_ok=True)
        (home / ".ssh" / "known_hosts").write_text("10.1.255.254 ssh-rsa AAAAB3NzaC1yc2EAAAAD\n")
    log = tmp / "dbclient.log"
    for f in tmp.glob("dbclient.log*"):
        f.unlink()
    e = {"PATH": f"{bin_dir}:/usr/bin:/bin", "KH_CMDLINE": str(tmp / "cmdline"),
         "KH_CHANNEL_HOME": str(home), "LOG": str(log), "DB_STATUS": "1", **(env or {})}
    r = subprocess.run(["sh", str(KHGET), *args], env=e, capture_output=True, text=True,
                       timeout=20)
    assert not (tmp / "dbclient.log.wget").exists(), "khget used wget"
    if not log.exists():
        return r, None
    return r, {"argv": log.read_text().splitlines(),
               "password": (tmp / "dbclient.log.password").read_text().rstrip("\n"),
               "home": (tmp / "dbclient.log.home").read_text().rstrip("\n"),
               "stdin": (tmp / "dbclient.log.stdin").read_text()}


TOKEN = tokens.new_secret()


def test_a_token_goes_over_the_pinned_channel_never_in_an_argv(tmp_path):
    r, db = khget(tmp_path, "-t", TOKEN, "-n", "5", "alice", "2")
    assert r.returncode == 0 and r.stdout == "con1@10.1.255.254\nprotocol: uboot\n", r.stderr
    assert db is not None and db["argv"] == [
        "-T", "-p", "7422", "api+alice@10.1.255.254", "khget", "-p", "0", "-n", "5", "2"]
    assert db["password"] == TOKEN and db["home"] == str(tmp_path / "channel")
    assert db["stdin"] == "n\n"  # not the terminal: a key question is answered no
    _, db = khget(tmp_path, "-t", TOKEN, "-p", "1", "-i", "-x", "alice")
    assert db is not None and db["argv"][4:] == ["khget", "-p", "1", "-i", "-x", "1"]


def test_the_token_from_a_file_the_environment_or_the_boot_key(tmp_path):
    f = tmp_path / "tok"
    f.write_text(TOKEN + "\n")
    for args, env, cmdline in ((["-t", str(f)], {}, CHANNEL),
                               ([], {"KH_TOKEN": TOKEN}, CHANNEL),
                               ([], {}, f"{CHANNEL} kh.token={TOKEN}")):
        r, db = khget(tmp_path, *args, "alice", env=env, cmdline=cmdline)
        assert r.returncode == 0 and db is not None and db["password"] == TOKEN, r.stderr
        assert not any(TOKEN in w for w in db["argv"])  # type: ignore[union-attr]


def test_a_credential_is_sent_without_the_boot_token(tmp_path):
    _, db = khget(tmp_path, "-c", "secret", "alice", cmdline=f"{CHANNEL} kh.token={TOKEN}")
    assert db is not None and db["password"] == "secret"
    assert "secret" not in db["argv"] and "api+alice@10.1.255.254" in db["argv"]  # type: ignore[operator]


@pytest.mark.parametrize("args", [["-c", "secret", "-t", TOKEN, "alice"],
                                  ["-t", "kht_short", "alice"],
                                  ["-t", TOKEN + "x", "alice"],
                                  ["-t", TOKEN, "Alice@evil"],
                                  ["-t", TOKEN, "-n", "3;reboot", "alice"],
                                  ["alice"]])  # no secret at all
def test_refused_before_sending(tmp_path, args):
    r, db = khget(tmp_path, *args)
    assert r.returncode == 2 and db is None and r.stderr.startswith("khget: "), r.stderr


@pytest.mark.parametrize(("cmdline", "pinned"), [
    ("console=ttyS0 kh.server=10.1.255.254:7480", False),  # no kh.channel
    (CHANNEL, False),  # a kh.channel whose key kh-boot.sh found malformed: nothing pinned
    ("console=ttyS0", True)])
def test_no_pin_no_secret(tmp_path, cmdline, pinned):
    r, db = khget(tmp_path, "-t", TOKEN, "alice", cmdline=cmdline, pinned=pinned)
    assert r.returncode == 1 and db is None
    assert "no pinned host key" in r.stderr and "the secret is not sent" in r.stderr, r.stderr


def test_khds_reason_is_shown_as_it_came(tmp_path):
    r, _ = khget(tmp_path, "-t", TOKEN, "-n", "4", "alice", env={
        "DB_STDERR": "kh: a token may not allocate on domain 4 (its domains are 3)",
        "DB_STATUS": "3"})
    assert r.returncode == 3 and r.stdout == ""
    assert r.stderr == "khget: a token may not allocate on domain 4 (its domains are 3)\n"


@pytest.mark.parametrize(("said", "says"), [
    ("dbclient: Connection to api+alice@10.1.255.254:7422 exited: \n\nHost key mismatch for "
     "10.1.255.254 !", "showed a host key other than the pinned one; nothing was sent"),
    ("dbclient: Connection to api+alice@10.1.255.254:7422 exited: No auth methods could be "
     "used.", "refused the login of alice"),
    ("dbclient: Connection to api+alice@10.1.255.254:7422 exited: Connect failed: Connection "
     "refused", "cannot reach the service's channel at 10.1.255.254:7422")])
def test_dbclients_failures_are_named(tmp_path, said, says):
    r, _ = khget(tmp_path, "-t", TOKEN, "alice", env={"DB_STDERR": said})
    assert r.returncode == 1 and says in r.stderr and r.stderr.count("\n") == 1, r.stderr


# -- with the real dbclient ------------------------------------------------------------------
needs_dbclient = pytest.mark.skipif(shutil.which("dbclient") is None,
                                    reason="dropbear-bin (tools/packages) is not installed")


def real_khget(tmp: Path, port: int, home: Path, *args: str, password_env: str = "KH_TOKEN",
               secret: str = "") -> subprocess.CompletedProcess[str]:
    (tmp / "cmdline").write_text(f"kh.channel=127.0.0.1:{port}#x\n")
    env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "KH_CMDLINE": str(tmp / "cmdline"),
           "KH_CHANNEL_HOME": str(home), password_env: secret}
    return subprocess.run(["sh", str(KHGET), *args], env=env, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


@needs_dbclient
def test_end_to_end_over_khds_ssh_server(tmp_path, monkeypatch):
    """The script, Debian's dbclient and khd's ssh server with the real Service: a token
    allocates on its domain, and is refused on another with khd's reason. (Debian's dbclient
    guesses its first key exchange, which khd's server cannot take unless the guess is right:
    here its host key is ed25519 and it knows the RFC 8731 name of curve25519; nodes' dbclient
    makes no guess, images/recipes/dropbear.toml.)"""
    from paramiko.kex_curve25519 import KexCurve25519
    monkeypatch.setattr(paramiko.Transport, "_kex_info", {
        **paramiko.Transport._kex_info, "curve25519-sha256": KexCurve25519})
    monkeypatch.setattr(paramiko.Transport, "_preferred_kex",
                        ("curve25519-sha256", *paramiko.Transport._preferred_kex))
    svc = make_service(tmp_path, monkeypatch, nodes=4)
    try:
        with serving_tcp(svc) as addr:
            status, resp = post(addr, "/v1/allocations", json.dumps(
                {"user": "alice", "credential": "apw", "p": 1}).encode())
            assert status == 201, resp
            status, resp = post(addr, "/v1/tokens?format=json", json.dumps(
                {"user": "alice", "credential": "apw", "allocate_on": [3]}).encode())
            token = json.loads(text_of(resp))["token"]
        host_key = paramiko.Ed25519Key.from_private_key_file(str(ed25519_key(tmp_path)))
        home = tmp_path / "home"
        with serve(ServiceAccess(svc), key=host_key) as srv:  # type: ignore[arg-type]
            r = pin(f"kh.channel=127.0.0.1:{srv.port}#{host_key.get_name()}:"
                    f"{host_key.get_base64()}", home, tmp_path)
            assert (home / ".ssh" / "known_hosts").exists(), r
            r = real_khget(tmp_path, srv.port, home, "-n", "3", "alice", "1", secret=token)
            assert r.returncode == 0 and r.stdout.startswith("con2@"), r.stderr
            assert "network 3 : eth0" in r.stdout, r.stdout
            r = real_khget(tmp_path, srv.port, home, "-n", "4", "alice", "1", secret=token)
            assert r.returncode == 3 and r.stdout == "", r
            assert r.stderr.startswith("khget: ") and "domain 4" in r.stderr, r.stderr
            r = real_khget(tmp_path, srv.port, home, "alice", secret=tokens.new_secret())
            assert r.returncode == 1 and "refused the login of alice" in r.stderr, r.stderr
    finally:
        svc.store.close()


def ed25519_key(tmp: Path) -> Path:
    p = tmp / "ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(p)], check=True)
    return p


@needs_dbclient
@pytest.mark.parametrize("shown", ["pinned", "other-rsa", "ed25519"])
def test_khget_talks_only_to_the_pinned_channel(tmp_path, shown):
    """A dropbear server plays the channel (it lets no one in): showing the pinned key, khget
    gets as far as a refused login; showing another RSA key, or a key of another type (which
    dbclient -y would accept), it leaves before any login, so the token is never offered."""
    pinned = key_file(tmp_path, "pinned")
    home = tmp_path / "home"
    with dropbear(tmp_path, server_key(tmp_path, shown, pinned)) as (port, log):
        pin(f"kh.channel={channel_boot_key(f'127.0.0.1:{port}', pinned)}", home, tmp_path)
        r = real_khget(tmp_path, port, home, "alice", secret=TOKEN)
        seen = log.read_text()
    assert r.returncode == 1 and r.stdout == "", r
    if shown == "pinned":
        assert "refused the login of alice" in r.stderr, r.stderr
        assert "Login attempt" in seen, seen
    else:
        assert "showed a host key other than the pinned one" in r.stderr, r.stderr
        assert "Login attempt" not in seen, seen
