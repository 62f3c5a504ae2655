"""The control channel with real nodes: stock OpenSSH, khdo and Listing 1, mrw and bulk loads."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

import paramiko
import pytest

from kh import textobj
from kh.cc.client import ChannelClient, ChannelError
from kh.service import control
from kh.service.config import ServiceConfig
from tests.integration.conftest import allocate, credfile, env, kh, khget, ps, release, wait_free

pytestmark = pytest.mark.guest
REPO = Path(__file__).resolve().parents[2]


def ssh(cfg: ServiceConfig, user: str, password: str | None, *args: str,
        stdin: bytes = b"", key: Path | None = None, tmp: Path | None = None
        ) -> subprocess.CompletedProcess[bytes]:
    """Stock OpenSSH, non-interactive; the password comes through SSH_ASKPASS."""
    e = {**os.environ}
    opts = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", "-o", "NumberOfPasswordPrompts=1", "-p", str(cfg.ssh_port)]
    if password is not None:
        assert tmp is not None
        askpass = tmp / "askpass"
        askpass.write_text(f"#!/bin/sh\necho '{password}'\n")
        askpass.chmod(0o700)
        e.update(SSH_ASKPASS=str(askpass), SSH_ASKPASS_REQUIRE="force")
        opts += ["-o", "PubkeyAuthentication=no"]
    if key is not None:
        opts += ["-i", str(key), "-o", "PasswordAuthentication=no", "-o", "IdentitiesOnly=yes"]
    return subprocess.run(["setsid", "ssh", *opts, f"{user}@127.0.0.1", *args], input=stdin,
                          env=e, capture_output=True, timeout=120)


def khdo(cfg: ServiceConfig, nodes: str, *args: str, cred: str | None = None,
         cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    e = env(cfg)
    if cfg.uplink_netns:  # the principal's "host" is the test's outside world
        e["KHDO_NETNS"] = cfg.uplink_netns
    if cred:
        e["KH_CREDENTIAL"] = cred
    return subprocess.run([sys.executable, "-m", "kh.cli.khdo", *args], input=nodes, env=e,
                          capture_output=True, text=True, timeout=300, cwd=cwd)


def tagged(cfg: ServiceConfig, alloc: int, cred: str, line: str, tmp: Path) -> dict[int, str]:
    """Send one line to every node; their answers by node."""
    r = ssh(cfg, f"con{alloc}", cred, "tagged", stdin=line.encode() + b"\n", tmp=tmp)
    assert r.returncode == 0, r.stderr
    out: dict[int, str] = {}
    for ln in r.stdout.decode(errors="replace").replace("\r", "").splitlines():
        m = re.match(r"^node(\d+): (.*)$", ln)
        if m:
            out[int(m[1])] = out.get(int(m[1]), "") + m[2] + "\n"
    return out


@pytest.mark.parametrize("count", [1, 4])
def test_listing_1_as_written(khd, tmp_path, count):
    """nodes=$(khget -x ...); khdo loadkernel; loadramdisk; write "run kboot";
    peripcmd "wget http://%ip%/" from the outside world."""
    wait_free(khd, count)
    r = khget(khd, "-x", "-c", credfile("l1cred"), "listing", str(count))
    assert r.returncode == 0, r.stderr
    nodes = r.stdout
    obj = textobj.parse(nodes)
    alloc = obj.id
    out = khd.images
    r = khdo(khd, nodes, "loadkernel", "./uImage", cred="l1cred", cwd=out)
    assert r.returncode == 0, r.stderr
    assert r.stdout == nodes  # passed through, so calls chain
    assert r.stderr.count("bytes at 0x08000000") == count
    r = khdo(khd, nodes, "loadramdisk", "./shell.cpio.gz.uimg", cred="l1cred", cwd=out)
    assert r.returncode == 0 and r.stderr.count("bytes at 0x0a000000") == count, r.stderr
    r = khdo(khd, nodes, "write", "run kboot", cred="l1cred")
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 60
    while r.stderr.count("kh-ready: shell") < count and time.monotonic() < deadline:
        r2 = khdo(khd, nodes, "readcon", "1", cred="l1cred")
        r = subprocess.CompletedProcess(r.args, 0, r.stdout, r.stderr + r2.stderr)
    answers = tagged(khd, alloc, "l1cred", "uname -m; hostname", tmp_path)
    numbers = [n.number for n in obj.nodes]
    for n in numbers:
        assert "ppc" in answers.get(n, ""), answers
        assert f"node{n}" in answers[n]
    r = khdo(khd, nodes, "peripcmd", "wget -q -T 10 -O - http://%ip%/", cred="l1cred")
    assert r.returncode == 0, r.stderr
    for n in numbers:
        assert f"<h1>node{n}</h1>" in r.stderr, r.stderr
    r = khdo(khd, nodes, "pernodecmd", "echo answered %node%", cred="l1cred")
    assert r.returncode == 0 and r.stderr.count("answered") == count
    release(khd, "listing", "l1cred", alloc)


def test_openssh_password_key_refusals_and_handing_over(khd, tmp_path):
    wait_free(khd, 2)
    alloc, nodes, _ = allocate(khd, "-c", credfile("ocred"), "olga", "2")
    # Password login reaches every node. Tagged, since raw mode interleaves the nodes' bytes
    # as they come (two echoes once gave "U-Boversion...") and a count over it can miss.
    answers = tagged(khd, alloc, "ocred", "version", tmp_path)
    assert all("U-Boot 2023.01" in answers.get(n, "") for n in nodes), answers
    # the wrong credential, another principal's credential, a released allocation: refused
    assert khget(khd, "-c", credfile("pcred"), "pete").returncode == 0
    assert ssh(khd, f"con{alloc}", "wrong", "nodes", tmp=tmp_path).returncode == 255
    assert ssh(khd, f"con{alloc}", "pcred", "nodes", tmp=tmp_path).returncode == 255
    # a key registered by the principal, then one handed to another party for this
    # allocation only, then revoked
    key = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    r = kh(khd, "key", "add", "-u", "olga", "-c", credfile("ocred"), "--allocation", str(alloc),
           str(key) + ".pub")
    assert r.returncode == 0, r.stderr
    kid = int(r.stdout.split()[1])
    r = ssh(khd, f"con{alloc}", None, "nodes", key=key)
    assert r.returncode == 0 and r.stdout.split() == [str(n).encode() for n in nodes]
    r = ssh(khd, f"con{alloc}.{nodes[1]}", None, "nodes", key=key)  # single-node session
    assert r.stdout.split() == [str(nodes[1]).encode()]
    assert kh(khd, "key", "rm", "-u", "olga", "-c", credfile("ocred"), str(kid)).returncode == 0
    assert ssh(khd, f"con{alloc}", None, "nodes", key=key).returncode == 255
    release(khd, "olga", "ocred", alloc)
    assert ssh(khd, f"con{alloc}", "ocred", "nodes", tmp=tmp_path).returncode == 255


def test_mrw_64k_and_bulk_load_checked_on_every_node(khd, tmp_path):
    wait_free(khd, 3)
    alloc, nodes, lines = allocate(khd, "-c", credfile("qcred"), "quinn", "3")
    text = "\n".join(lines) + "\n"
    blob = bytes(range(256)) * 64 + os.urandom(65536 - 256 * 64)
    (tmp_path / "blob").write_bytes(blob)
    r = khdo(khd, text, "loadfile", "0x9000000", str(tmp_path / "blob"), cred="qcred")
    assert r.returncode == 0, r.stderr
    answers = tagged(khd, alloc, "qcred", "crc32 0x9000000 10000", tmp_path)
    for n in nodes:
        assert f"==> {zlib.crc32(blob):08x}" in answers[n], answers
    big = os.urandom(12 << 20)
    (tmp_path / "big").write_bytes(big)
    r = khdo(khd, text, "loadramdisk", str(tmp_path / "big"), cred="qcred")
    assert r.returncode == 0, r.stderr
    answers = tagged(khd, alloc, "qcred", "crc32 0xa000000 c00000", tmp_path)
    for n in nodes:
        assert f"==> {zlib.crc32(big):08x}" in answers[n], answers
    # beyond the nodes' memory: refused with a reason, nothing written
    r = ssh(khd, f"con{alloc}", "qcred", "load", "0xf800000", stdin=big, tmp=tmp_path)
    assert r.returncode == 2 and b"beyond" in r.stderr
    release(khd, "quinn", "qcred", alloc)


def test_garbage_and_dropped_connections_do_not_hurt_khd(khd, tmp_path):
    wait_free(khd, 2)
    a, (na,), _ = allocate(khd, "-c", credfile("rcred"), "rita")
    b, (nb,), _ = allocate(khd, "-c", credfile("scred"), "sam")
    junk = os.urandom(256 * 1024) + b"x" * (200 * 1024) + b"\n"  # binary garbage, huge line
    proc_ = subprocess.Popen(["setsid", "ssh", "-o", "StrictHostKeyChecking=no", "-o",
                              "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                              "-p", str(khd.ssh_port), "-o", "PubkeyAuthentication=no",
                              f"con{a}@127.0.0.1"], stdin=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "SSH_ASKPASS_REQUIRE": "force",
                                  "SSH_ASKPASS": str(_askpass(tmp_path, "rcred"))})
    assert proc_.stdin is not None
    proc_.stdin.write(junk[:100000])
    proc_.kill()  # dropped mid-stream
    proc_.wait()
    s = socket.create_connection(("127.0.0.1", khd.ssh_port))
    s.sendall(os.urandom(5000))  # not even ssh
    s.close()
    # the other principal's channel still works, and so does the service
    answers = tagged(khd, b, "scred", "version", tmp_path)
    assert "U-Boot" in answers[nb]
    assert control.pid_of(khd)
    # rita's node can be reset and used again after the garbage
    assert kh(khd, "reset", "-u", "rita", "-c", credfile("rcred"), str(na)).returncode == 0
    answers = tagged(khd, a, "rcred", "printenv khargs", tmp_path)
    assert f"kh.node={na}" in answers[na]
    release(khd, "rita", "rcred", a)
    release(khd, "sam", "scred", b)


def _askpass(tmp: Path, password: str) -> Path:
    p = tmp / f"askpass-{password}"
    p.write_text(f"#!/bin/sh\necho '{password}'\n")
    p.chmod(0o700)
    return p


def test_khdo_bad_input_one_line(khd, tmp_path):
    r = khdo(khd, "garbage\n", "write", "x")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "con<ID>@<host>" in r.stderr
    obj = "con1@127.0.0.1\nprotocol: uboot\nnodes: 1\n"
    r = khdo(khd, obj, "loadkernel", str(tmp_path / "missing"), cred="x")
    assert r.returncode == 2 and "does not exist" in r.stderr and r.stderr.count("\n") == 1
    r = khdo(khd, obj, "frobnicate", cred="x")
    assert r.returncode == 2 and "unknown function" in r.stderr


def test_console_logs_survive_a_khd_restart(khd, tmp_path):
    wait_free(khd, 1)
    alloc, (node,), _ = allocate(khd, "-c", credfile("tcred"), "tina")
    tagged(khd, alloc, "tcred", "echo marker-before-restart", tmp_path)
    control.stop(khd)
    control.start(khd)
    tagged(khd, alloc, "tcred", "echo marker-after-restart", tmp_path)
    r = kh(khd, "logs", str(node))
    assert r.returncode == 0
    assert "marker-before-restart" in r.stdout and "marker-after-restart" in r.stdout
    assert re.search(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ", r.stdout, re.MULTILINE)
    release(khd, "tina", "tcred", alloc)


def test_a_node_that_fails_mid_load_is_named_and_the_others_complete(khd, tmp_path):
    wait_free(khd, 2)
    alloc, (bad, good), lines = allocate(khd, "-c", credfile("ucred"), "uma", "2")
    text = "\n".join(lines) + "\n"
    # The bad node's QEMU dies as the load starts ...
    big = os.urandom(8 << 20)
    (tmp_path / "big").write_bytes(big)
    os.kill(int(next(n["pid"] for n in ps(khd)["nodes"] if n["node"] == bad)), 9)
    r = khdo(khd, text, "loadkernel", str(tmp_path / "big"), cred="ucred")
    assert r.returncode == 1
    assert f"node {bad}: load failed" in r.stderr, r.stderr
    assert f"node {good}: {len(big)} bytes at 0x08000000 crc32 {zlib.crc32(big):08x}" in r.stderr
    answers = tagged(khd, alloc, "ucred", "crc32 0x8000000 800000", tmp_path)
    assert f"==> {zlib.crc32(big):08x}" in answers[good], answers
    # ... khd marks it failed; the other node stays usable and resettable.
    deadline = time.monotonic() + 30
    while next(n["state"] for n in ps(khd)["nodes"] if n["node"] == bad) != "failed":
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert kh(khd, "reset", "-u", "uma", "-c", credfile("ucred"), str(good)).returncode == 0
    assert "U-Boot" in tagged(khd, alloc, "ucred", "version", tmp_path)[good]
    release(khd, "uma", "ucred", alloc)


# -- authorization on every use (issue 10, finding 2) -------------------------------------------
def _open(c: ChannelClient, command: str = "tagged") -> paramiko.Channel:
    t = c.client.get_transport()
    assert t is not None
    ch = t.open_session(timeout=10)
    ch.exec_command(command)
    return ch


def _ended(ch: paramiko.Channel, timeout: float = 30) -> bytes:
    """Wait for khd to end the session (a bound, not a timing): what it said on stderr."""
    deadline = time.monotonic() + timeout
    while not ch.exit_status_ready():
        assert time.monotonic() < deadline, "khd did not end the session"
        time.sleep(0.1)
    assert ch.recv_exit_status() == 1
    return ch.makefile_stderr().read()


def _refused(c: ChannelClient) -> bool:
    """True when the connection can no longer open a channel."""
    try:
        _open(c, "nodes").close()
    except (paramiko.SSHException, EOFError, OSError):
        return True
    return False


def _read_until(ch: paramiko.Channel, marker: bytes, timeout: float = 30) -> bytes:
    ch.settimeout(timeout)
    got = b""
    while marker not in got:
        data = ch.recv(65536)
        assert data, got
        got += data
    return got


def test_release_revocation_and_a_node_leaving_end_what_depended_on_them(khd, tmp_path):
    """A connection opened before a release, a key revocation or a node's release could go on
    reading and writing those nodes (they were the next principal's soon after): each ends its
    sessions with one line on stderr, and no new channel opens."""
    wait_free(khd, 3)
    alloc, (n1, n2, n3), _ = allocate(khd, "-c", credfile("vcred"), "vera", "3")
    key = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    r = kh(khd, "key", "add", "-u", "vera", "-c", credfile("vcred"), "--allocation", str(alloc),
           str(key) + ".pub")
    assert r.returncode == 0, r.stderr
    kid = int(r.stdout.split()[1])
    port = khd.ssh_port
    whole = ChannelClient(f"con{alloc}", "127.0.0.1", port, password="vcred")
    single = ChannelClient(f"con{alloc}.{n3}", "127.0.0.1", port, password="vcred")
    by_key = ChannelClient(f"con{alloc}.{n1}", "127.0.0.1", port, key_file=key)
    released = False
    try:
        s_whole, s_single, s_key = _open(whole), _open(single), _open(by_key)
        s_whole.sendall(b"version\n")
        _read_until(s_whole, b"node%d: U-Boot" % n2)
        # the key is revoked: its session ends, the credential's go on
        assert kh(khd, "key", "rm", "-u", "vera", "-c", credfile("vcred"),
                  str(kid)).returncode == 0
        assert _ended(s_key) == b"kh: key %d was revoked; this session ends\n" % kid
        assert _refused(by_key)
        assert not s_whole.exit_status_ready() and not s_single.exit_status_ready()
        # node n3 is released alone: the sessions that reach it end
        r = kh(khd, "release", "-u", "vera", "-c", credfile("vcred"), str(alloc), str(n3))
        assert r.returncode == 0, r.stderr
        gone = b"kh: node %d left allocation %d; this session ends\n" % (n3, alloc)
        assert _ended(s_single) == gone
        assert _ended(s_whole) == gone
        assert _refused(single)
        # the allocation is still live: a new session reaches the two nodes left
        ch = _open(whole, "nodes")
        assert ch.makefile().read().split() == [b"%d" % n1, b"%d" % n2]
        s_whole = _open(whole)
        release(khd, "vera", "vcred", alloc)
        released = True
        assert _ended(s_whole) == b"kh: allocation %d was released; this session ends\n" % alloc
        assert _refused(whole)
        with pytest.raises(ChannelError, match="refused our credential"):
            ChannelClient(f"con{alloc}", "127.0.0.1", port, password="vcred")
    finally:
        for c in (whole, single, by_key):
            c.close()
        if not released:
            release(khd, "vera", "vcred", alloc)


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


def test_half_open_logins_cost_khd_no_thread_and_end(khd):
    """Finding 4: each unauthenticated ssh connection held khd threads, with no end."""
    pid = control.pid_of(khd)
    assert pid
    before = _threads(pid)
    held = []
    for _ in range(50):
        s = socket.create_connection(("127.0.0.1", khd.ssh_port))
        s.settimeout(60)
        held.append(s)
    for s in held:
        assert s.recv(100).startswith(b"SSH-2.0-")
    # up to the per-source cap (64) more are taken; the ones after it are refused at once
    more = [socket.create_connection(("127.0.0.1", khd.ssh_port)) for _ in range(20)]
    refused = 0
    for s in more:
        s.settimeout(60)
        refused += s.recv(200).startswith(b"kh: too many ssh logins under way from loopback")
    # (at least: a login that just ended may still count for an instant)
    assert refused >= 20 - (64 - 50)
    assert _threads(pid) < before + 10  # khd's own threads come and go; 70 would be one each
    for s in held + more:  # all of them end at the login timeout (20 s)
        while True:
            try:
                if not s.recv(4096):
                    break
            except ConnectionResetError:
                break
        s.close()
    # and a login works again
    wait_free(khd, 1)
    alloc, _, _ = allocate(khd, "-c", credfile("wcred"), "wes")
    try:
        c = ChannelClient(f"con{alloc}", "127.0.0.1", khd.ssh_port, password="wcred")
        c.close()
    finally:
        release(khd, "wes", "wcred", alloc)
