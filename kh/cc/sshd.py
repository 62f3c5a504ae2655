"""The control channel's ssh server (paramiko), run by khd.

User ``con<ID>`` is allocation ID; ``con<ID>.<N>`` is node N of it alone. Authentication: the
owning principal's credential as password, or a public key the principal registered (for
itself, or for this allocation only: that is how a channel is handed to another party).
What a session may ask for is in docs/control-channel.md.
"""

from __future__ import annotations

import base64
import logging
import re
import socket
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko

from kh.admission import AuthError
from kh.cc.channel import Hub, Output
from kh.errors import KhError
from kh.hw import memload
from kh.model import NodeState

log = logging.getLogger("kh.sshd")
USER_RE = re.compile(r"^con(\d+)(?:\.(\d+))?$")
MAX_LOAD = 256 * 1024 * 1024
QUIET = 1.0  # after the client's EOF, wait for this much silence before closing
MAX_DRAIN = 30.0


@dataclass(frozen=True)
class Target:
    alloc: int
    principal: str
    node: int | None  # a single-node session


class Access:
    """What the ssh server needs from the service (kept small so it can be tested alone)."""

    def __init__(self, service: Any) -> None:
        self.svc = service
        self.hubs: dict[int, Hub] = {}
        self.lock = threading.Lock()

    def target(self, username: str) -> Target | None:
        m = USER_RE.match(username)
        if not m:
            return None
        row = self.svc.store.allocation(int(m[1]))
        if row is None or row.released is not None:
            return None
        node = int(m[2]) if m[2] else None
        if node is not None and node not in self.nodes(row.id):
            return None
        return Target(row.id, row.principal, node)

    def nodes(self, alloc: int) -> list[int]:
        return [r.number for r in self.svc.store.nodes_of(alloc, NodeState.ALLOCATED)]

    def members(self, alloc: int) -> list[int]:
        """Every node of the allocation, failed ones too (a load names what it missed)."""
        return [r.number for r in self.svc.store.nodes_of(alloc)]

    def password_ok(self, t: Target, password: str) -> bool:
        try:
            self.svc.authenticate(t.principal, password, register=False)
            return True
        except (AuthError, KhError):
            return False

    def key_ok(self, t: Target, key: paramiko.PKey) -> bool:
        blob = f"{key.get_name()} {key.get_base64()}"
        for _id, principal, alloc, stored, _comment in self.svc.store.keys(t.principal):
            if principal == t.principal and (alloc is None or alloc == t.alloc) and \
                    " ".join(stored.split()[:2]) == blob:
                return True
        return False

    def consoles(self, t: Target) -> dict[int, Any]:
        nodes = [t.node] if t.node is not None else self.nodes(t.alloc)
        running = self.svc.nodes.running
        return {n: running[n].console for n in nodes if n in running}

    def hub(self, t: Target) -> Hub:
        with self.lock:
            h = self.hubs.get(t.alloc)
            running = self.svc.nodes.running
            writers = {n: running[n].writer for n in self.nodes(t.alloc) if n in running}
            if h is None or h.writers != dict(sorted(writers.items())):
                h = Hub(t.alloc, writers)
                self.hubs[t.alloc] = h
            return h

    def ram(self, node: int) -> Path:
        """The node's RAM file (see memload)."""
        running = self.svc.nodes.running.get(node)
        if running is None:
            raise memload.LoadError("the node is not running")
        return memload.ram_file(running.pid)

    def mem_limit(self) -> int:
        return int(self.svc.cfg.mem_mib) * 1024 * 1024 - 16 * 1024 * 1024


class _Iface(paramiko.ServerInterface):
    def __init__(self, access: Access) -> None:
        self.access = access
        self.target: Target | None = None
        self.requests: dict[int, str] = {}
        self.ready: dict[int, threading.Event] = {}

    def get_allowed_auths(self, username: str) -> str:
        return "password,publickey"

    def check_auth_password(self, username: str, password: str) -> int:
        t = self.access.target(username)
        if t is not None and self.access.password_ok(t, password):
            self.target = t
            return paramiko.AUTH_SUCCESSFUL
        return paramiko.AUTH_FAILED

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        t = self.access.target(username)
        if t is not None and self.access.key_ok(t, key):
            self.target = t
            return paramiko.AUTH_SUCCESSFUL
        return paramiko.AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session":
            self.ready[chanid] = threading.Event()
            return paramiko.OPEN_SUCCEEDED
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_pty_request(self, *args: Any) -> bool:
        return True

    def check_channel_window_change_request(self, *args: Any) -> bool:
        return True

    def check_channel_env_request(self, *args: Any) -> bool:
        return True

    def check_channel_shell_request(self, channel: paramiko.Channel) -> bool:
        self.requests[channel.get_id()] = ""
        self.ready[channel.get_id()].set()
        return True

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        self.requests[channel.get_id()] = command.decode("utf-8", "replace").strip()
        self.ready[channel.get_id()].set()
        return True


class SshServer:
    def __init__(self, access: Access, host_key: paramiko.PKey) -> None:
        self.access = access
        self.host_key = host_key
        self.listeners: list[socket.socket] = []
        self._closed = False

    def listen(self, sock: socket.socket) -> None:
        self.listeners.append(sock)
        threading.Thread(target=self._accept, args=(sock,), daemon=True,
                         name="sshd-accept").start()

    def close(self) -> None:
        self._closed = True
        for s in self.listeners:
            s.close()

    def _accept(self, sock: socket.socket) -> None:
        while not self._closed:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=self._connection, args=(conn,), daemon=True,
                             name="sshd-conn").start()

    def _connection(self, conn: socket.socket) -> None:
        t = paramiko.Transport(conn)
        try:
            t.add_server_key(self.host_key)
            iface = _Iface(self.access)
            t.start_server(server=iface)
            while t.is_active():
                chan = t.accept(timeout=1.0)
                if chan is None:
                    continue
                threading.Thread(target=self._session, args=(iface, chan), daemon=True,
                                 name="sshd-session").start()
        except (paramiko.SSHException, EOFError, OSError) as e:
            log.info("ssh connection ended: %s", e)
        finally:
            if not t.is_active():
                t.close()

    def _session(self, iface: _Iface, chan: paramiko.Channel) -> None:
        ev = iface.ready.get(chan.get_id())
        if ev is None or not ev.wait(10) or iface.target is None:
            chan.close()
            return
        command = iface.requests.get(chan.get_id(), "")
        target = iface.target
        try:
            words = command.split()
            if command in ("", "raw"):
                status = self._broadcast(chan, target, tagged=False)
            elif command == "tagged":
                status = self._broadcast(chan, target, tagged=True)
            elif words and words[0] == "load" and len(words) == 2:
                status = self._load(chan, target, words[1])
            elif command == "nodes":
                nodes = [target.node] if target.node else self.access.nodes(target.alloc)
                chan.sendall(" ".join(map(str, nodes)).encode() + b"\n")
                status = 0
            else:
                chan.sendall_stderr(f"kh: unknown channel command {command!r} (try: raw, "
                                    "tagged, load ADDR, nodes)\n".encode())
                status = 2
        except (OSError, EOFError, paramiko.SSHException) as e:
            log.info("session ended: %s", e)
            status = 1
        try:
            chan.send_exit_status(status)
            chan.shutdown_write()
            chan.close()
        except (OSError, EOFError, paramiko.SSHException):
            pass

    def _broadcast(self, chan: paramiko.Channel, t: Target, *, tagged: bool) -> int:
        hub = self.access.hub(t)
        consoles = self.access.consoles(t)
        nodes = None if t.node is None else [t.node]

        def sink(data: bytes) -> None:
            try:
                chan.sendall(data)
            except (OSError, EOFError, paramiko.SSHException):
                pass

        out = Output(consoles, sink, tagged=tagged)
        try:
            while True:
                data = chan.recv(65536)
                if not data:
                    break
                hub.write(data, nodes)
            # The client sent EOF (a script's stdin ended): show the nodes' answers until
            # they have been quiet for a while.
            for w in hub.writers.values():
                w.drain(MAX_DRAIN)
            deadline = time.monotonic() + MAX_DRAIN
            while out.quiet_for() < QUIET and time.monotonic() < deadline and not chan.closed:
                time.sleep(0.05)
            return 0
        finally:
            out.close()

    def _load(self, chan: paramiko.Channel, t: Target, addr_text: str) -> int:
        try:
            addr = int(addr_text, 16)
        except ValueError:
            chan.sendall_stderr(b"kh: load takes a hex address, e.g. load 0x8000000\n")
            return 2
        buf = bytearray()
        while True:
            data = chan.recv(1 << 20)
            if not data:
                break
            buf += data
            if len(buf) > MAX_LOAD:
                chan.sendall_stderr(b"kh: load is larger than a node's memory\n")
                return 2
        if addr + len(buf) > self.access.mem_limit():
            chan.sendall_stderr(f"kh: 0x{addr:x}+{len(buf)} is beyond the nodes' free memory "
                                f"(below 0x{self.access.mem_limit():x})\n".encode())
            return 2
        data = bytes(buf)
        crc = zlib.crc32(buf) & 0xFFFFFFFF
        nodes = [t.node] if t.node is not None else self.access.members(t.alloc)
        hub = self.access.hub(t)

        def one(n: int) -> tuple[int, str | None]:
            w = hub.writers.get(n)
            if w is not None:
                w.drain(60)  # what was typed before the load reaches the node first
            try:
                memload.write(self.access.ram(n), addr, data)
                return n, None
            except KhError as e:
                return n, str(e)

        failed = 0
        with ThreadPoolExecutor(max_workers=8) as ex:
            for n, err in ex.map(one, nodes):
                if err:
                    failed += 1
                    chan.sendall(f"node {n}: load failed: {err}\n".encode())
                else:
                    chan.sendall(f"node {n}: {len(buf)} bytes at 0x{addr:08x} crc32 "
                                 f"{crc:08x}\n".encode())
        return 1 if failed else 0


def host_key(path: Path) -> paramiko.PKey:
    """khd's ssh host key, made on first start and kept in the state directory."""
    if path.exists():
        return paramiko.RSAKey.from_private_key_file(str(path))
    key = paramiko.RSAKey.generate(2048)
    path.parent.mkdir(parents=True, exist_ok=True)
    key.write_private_key_file(str(path))
    path.chmod(0o600)
    return key


def parse_public_key(text: str) -> tuple[str, str]:
    """An OpenSSH public key line → (normalised "type base64", comment)."""
    parts = text.strip().split()
    if len(parts) < 2 or not parts[0].startswith(("ssh-", "ecdsa-")):
        raise KhError("not an OpenSSH public key", "pass the .pub file's line")
    try:
        base64.b64decode(parts[1], validate=True)
    except ValueError:
        raise KhError("not an OpenSSH public key (bad base64)") from None
    return f"{parts[0]} {parts[1]}", " ".join(parts[2:])
