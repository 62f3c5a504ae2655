"""The control channel's ssh host key is pinned for in-node clients (issue 11, item 3): khd hands
it to nodes in the kh.channel boot key, kh-boot.sh writes it where dbclient looks, and
khgetdisk's dbclient (its `ch` function, run here as the node runs it, with Debian's dropbear
client of the same version as the node's, 2022.83) talks only to a channel showing that key.

A dropbear server on loopback plays the channel: Debian's dbclient sends a guessed key-exchange
packet that khd's paramiko server mistakes (the node's is built without it:
images/recipes/dropbear.toml), and only the host-key check is at stake here."""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from kh.allocation import boot_keys
from kh.hw.uboot import LINE_MAX
from kh.model import Domain, DomainKind
from kh.service.pins import channel_boot_key, channel_key

FILES = Path(__file__).resolve().parents[2] / "appliance-builder" / "files"
BOOT_SH = FILES / "kh-boot.sh"
KHGETDISK = FILES / "khgetdisk"

needs_dbclient = pytest.mark.skipif(shutil.which("dbclient") is None,
                                    reason="dropbear-bin (tools/packages) is not installed")


def key_file(tmp: Path, name: str, bits: int = 1024) -> Path:
    p = tmp / name
    paramiko.RSAKey.generate(bits).write_private_key_file(str(p))
    return p


def pin(boot_key: str, home: Path, tmp: Path) -> subprocess.CompletedProcess[str]:
    """kh-boot.sh reading a command line with ``boot_key``, as a node's /init does."""
    (tmp / "cmdline").write_text(f"console=ttyS0 {boot_key}\n")
    return subprocess.run(
        ["sh", "-c", f'. {BOOT_SH}; kh_read_keys; echo "channel=$(kh_key channel)"'],
        env={"PATH": "/usr/bin:/bin", "KH_CMDLINE": str(tmp / "cmdline"),
             "KH_CHANNEL_HOME": str(home)}, capture_output=True, text=True, timeout=10)


def khgetdisk_ch() -> str:
    """khgetdisk's own `ch` function (one control-channel session), as it is in the file."""
    m = re.search(r"^ch\(\) \{.*?^\}$", KHGETDISK.read_text(), re.M | re.S)
    assert m, "khgetdisk has no ch() function"
    return m.group(0)


def ch(port: int, home: Path, user: str, command: str, password: str
       ) -> subprocess.CompletedProcess[str]:
    script = (f'fail() {{ echo "khgetdisk: $*" >&2; exit 1; }}\n{khgetdisk_ch()}\n'
              f'cport={port} chost=127.0.0.1\nch {user} {command}; rc=$?\n'
              'cat /tmp/khgetdisk.err >&2; exit $rc\n')
    env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "KH_CHANNEL_HOME": str(home),
           "DROPBEAR_PASSWORD": password}
    # stdin as khgetdisk's commands to a node: an unknown key's question must not be answered
    return subprocess.run(["sh", "-c", script], input="setenv khargs x\n", env=env,
                          capture_output=True, text=True, timeout=60)


def test_boot_key_carries_the_channels_public_key(tmp_path):
    k = key_file(tmp_path, "ssh_host_rsa_key", 2048)
    value = channel_boot_key("10.1.255.254:7422", k)
    host, _, key = value.partition("#")
    assert host == "10.1.255.254:7422"
    kind, _, b64 = key.partition(":")
    loaded = paramiko.RSAKey.from_private_key_file(str(k))
    assert (kind, b64) == (loaded.get_name(), loaded.get_base64())
    assert channel_key(tmp_path / "none") is None
    assert channel_boot_key("10.1.255.254:7422", tmp_path / "none") == "10.1.255.254:7422"


def test_the_longest_khargs_fits_one_uboot_line(tmp_path):
    """Four domains, the largest node number and port: `setenv khargs '...'` stays within what
    U-Boot takes on one line (the full RSA key is about 380 characters of it)."""
    k = key_file(tmp_path, "ssh_host_rsa_key", 2048)
    doms = tuple(Domain(n, DomainKind.PRIVATE, "alice") for n in (0, 1, 253, 252))
    keys = boot_keys(doms, 65000, "10.1.255.254:65535",
                     channel_boot_key("10.1.255.254:65535", k))
    line = f"setenv khargs '{keys}'"
    assert "#ssh-rsa:" in line and len(line) <= LINE_MAX - 120  # room for kh.server's pin


def test_kh_boot_writes_the_pinned_key_where_dbclient_reads_it(tmp_path):
    k = key_file(tmp_path, "key")
    home = tmp_path / "home"
    r = pin(f"kh.channel={channel_boot_key('10.1.255.254:7422', k)}", home, tmp_path)
    assert "channel=10.1.255.254:7422\n" in r.stdout, r
    key = paramiko.RSAKey.from_private_key_file(str(k))
    known = (home / ".ssh" / "known_hosts").read_text()
    # dropbear matches the host name alone (no port), then the type and the whole key
    assert known == f"10.1.255.254 ssh-rsa {key.get_base64()}\n"


@pytest.mark.parametrize("value", [
    "10.1.255.254:7422",                          # no key: nothing pinned, no channel
    "10.1.255.254:7422#ssh-rsa:",
    "10.1.255.254:7422#ssh-dss:AAAAB3NzaC1kc3MAAACBAP",
    "10.1.255.254:7422#ssh-rsa:AAAA$(reboot)AAAAAAAAAAAAAAA",
    "10.1.255.300:7422#ssh-rsa:AAAAB3NzaC1yc2EAAAADAQABAAAB",
    "10.1.255.254:99999#ssh-rsa:AAAAB3NzaC1yc2EAAAADAQABAAAB",
    "nohost#ssh-rsa:AAAAB3NzaC1yc2EAAAADAQABAAAB"])
def test_a_malformed_channel_key_is_named_and_nothing_pinned(tmp_path, value):
    home = tmp_path / "home"
    r = pin(f"kh.channel={value}", home, tmp_path)
    assert "boot key kh.channel=" in r.stdout and "is malformed" in r.stdout, r
    assert "channel=\n" in r.stdout  # the diskserver then refuses to start khgetdisk
    assert not (home / ".ssh" / "known_hosts").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def dropbear(tmp: Path, key: Path) -> Iterator[tuple[int, Path]]:
    """A dropbear server on loopback showing ``key`` (an OpenSSH/PEM private key, converted),
    password logins off: a client that accepts its host key gets as far as being refused a
    login, and the server's log (the second value) says so ("Login attempt")."""
    converted = tmp / f"{key.name}.dropbear"
    subprocess.run(["dropbearconvert", "openssh", "dropbear", str(key), str(converted)],
                   check=True, capture_output=True)
    log = tmp / "dropbear.log"
    for _ in range(5):  # a free port may be taken between the look and dropbear's bind
        port = free_port()
        with log.open("wb") as out:
            proc = subprocess.Popen(["dropbear", "-F", "-E", "-s", "-r", str(converted),
                                     "-p", f"127.0.0.1:{port}"], stderr=out,
                                    stdin=subprocess.DEVNULL)
        try:
            for _ in range(100):
                if proc.poll() is not None:
                    break
                with socket.socket() as c:
                    if c.connect_ex(("127.0.0.1", port)) == 0:
                        yield port, log
                        return
                time.sleep(0.05)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:  # seen once in a loaded fresh root
                proc.kill()
                proc.wait(10)
    raise AssertionError(f"dropbear did not start: {log.read_text()}")


def server_key(tmp: Path, kind: str, pinned: Path) -> Path:
    if kind == "pinned":
        return pinned
    if kind == "other-rsa":
        return key_file(tmp, "other")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "ed")],
                   check=True)
    return tmp / "ed"


@needs_dbclient
@pytest.mark.parametrize("shown", ["pinned", "other-rsa", "ed25519"])
def test_khgetdisk_talks_only_to_the_pinned_channel(tmp_path, shown):
    """The channel showing the pinned key gets as far as a login; one showing another RSA key,
    or a key of another type (which dbclient would ask a tty to accept), is left before any
    login is tried (so no credential is ever offered to it)."""
    pinned = key_file(tmp_path, "pinned")
    home = tmp_path / "home"
    with dropbear(tmp_path, server_key(tmp_path, shown, pinned)) as (port, log):
        pin(f"kh.channel={channel_boot_key(f'127.0.0.1:{port}', pinned)}", home, tmp_path)
        try:
            r = ch(port, home, "con1", "nodes", "s3cret")
        finally:
            Path("/tmp/khgetdisk.err").unlink(missing_ok=True)
        time.sleep(0.2)  # dropbear's log line of the connection's end
        seen = log.read_text()
    assert r.returncode != 0  # dropbear here lets no one in
    if shown == "pinned":
        assert "No auth methods could be used" in r.stderr, r.stderr
        assert "Login attempt" in seen, seen
    else:
        assert "Login attempt" not in seen, seen
        assert ("host key mismatch" in r.stderr if shown == "other-rsa"
                else "Didn't validate host key" in r.stderr), r.stderr


@needs_dbclient
def test_khgetdisk_refuses_without_a_pinned_key(tmp_path):
    with dropbear(tmp_path, key_file(tmp_path, "k")) as (port, log):
        try:
            r = ch(port, tmp_path / "empty", "con1", "nodes", "s3cret")
        finally:
            Path("/tmp/khgetdisk.err").unlink(missing_ok=True)
        seen = log.read_text()
    assert r.returncode != 0
    assert "khgetdisk: no pinned host key for the channel" in r.stderr
    # the one connection dropbear saw is dropbear()'s own probe of its port
    assert seen.lower().count("connection from") <= 1 and "Login attempt" not in seen, seen
