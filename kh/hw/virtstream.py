"""libvirt's streams as kh uses them: a node's console, and writes into a node's RAM.

- ``ConsolePump``: libvirt's console stream (``virDomainOpenConsole``: works over a remote
  connection) joined to one end of a socket pair, so kh.hw.console.Console reads and writes the
  other end exactly as it does QEMU's unix socket (its reader, log, history, subscribers and
  ``unsent`` are the same for both backends). Two threads copy, one each way; blocking streams.
- ``VolumeRam``: guest RAM that is a file in the libvirt host's ``memory_backing_dir``, seen as
  a volume of a ``dir`` storage pool over that directory: ``virStorageVolUpload`` at an offset
  writes into the live guest's RAM (no truncation), with no agent in the guest and no file
  access on the libvirt host beyond libvirt's own (docs/libvirt.md has the measurements).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from typing import Any
from xml.etree import ElementTree
from xml.sax.saxutils import escape

import libvirt

from kh.errors import KhError
from kh.hw.libvirtd import RAM_DIR
from kh.hw.memload import LoadError

log = logging.getLogger("kh.virtstream")
_loop_lock = threading.Lock()
_loop_started = False


def event_loop() -> None:
    """libvirt's default event loop, once per process, in a thread of its own: it delivers
    lifecycle events and keepalives. Must run before the first connection is opened."""
    global _loop_started
    with _loop_lock:
        if _loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, daemon=True, name="libvirt-events").start()
        _loop_started = True


def error_text(e: libvirt.libvirtError) -> str:
    return str(e.get_error_message() or e)


def connect(uri: str, host: str) -> libvirt.virConnect:
    """A connection to ``uri``; KhError naming ``host`` when it does not answer."""
    event_loop()
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as e:
        raise KhError(f"host {host}: cannot reach libvirt at {uri} ({error_text(e)})",
                      "is its libvirtd running, and the URI right?") from None
    if conn is None:
        raise KhError(f"host {host}: cannot reach libvirt at {uri}")
    return conn


def check_ppc(conn: libvirt.virConnect, host: str, machine: str = "ppce500") -> str:
    """The emulator path of the host's ``ppc`` guests that offer ``machine`` (from libvirt's
    capabilities); KhError naming the host when it has none (no qemu-system-ppc there)."""
    try:
        caps = ElementTree.fromstring(conn.getCapabilities())
    except (libvirt.libvirtError, ElementTree.ParseError) as e:
        raise KhError(f"host {host}: cannot read libvirt's capabilities ({e})") from None
    for guest in caps.findall("guest"):
        arch = guest.find("arch")
        if arch is None or arch.get("name") != "ppc":
            continue
        if any(m.text == machine for m in arch.findall("machine")):
            return arch.findtext("emulator") or ""
    raise KhError(f"host {host}: libvirt there offers no ppc {machine} guest",
                  "install qemu-system-ppc on that host")


RECV = 65536  # bytes asked of the stream at a time


class ConsolePump:
    """Copies between a libvirt console stream and ``console_end``'s peer. The socket pair
    outlives the stream: when the libvirt daemon restarts (or the connection to a remote host
    is made again) ``attach`` puts a new stream in the old one's place, and the Console reading
    ``console_end`` never sees its node go. Input written while no stream is attached waits."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.console_end, self._ours = socket.socketpair()
        self._closed = threading.Event()
        self._lock = threading.Condition()
        self._stream: Any = None
        self._in_thread = threading.Thread(target=self._in, daemon=True, name=f"vcon-in-{name}")
        self._in_thread.start()

    def attach(self, conn: libvirt.virConnect, dom: libvirt.virDomain) -> None:
        """Open ``dom``'s console (FORCE: a khd or daemon that went away may still hold it)
        and copy from it; libvirtError when libvirt refuses. The stream is non-blocking and
        read from libvirt's event loop: a thread blocked in a stream's recv would hold up
        every other call on the connection (measured: a khget took 15 s, not 0.7)."""
        stream = conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
        try:
            dom.openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
            stream.eventAddCallback(libvirt.VIR_STREAM_EVENT_READABLE
                                    | libvirt.VIR_STREAM_EVENT_ERROR
                                    | libvirt.VIR_STREAM_EVENT_HANGUP, self._readable, None)
        except libvirt.libvirtError:
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()
            raise
        with self._lock:
            old, self._stream = self._stream, stream
            self._lock.notify_all()
        if old is not None:
            self._drop(old)

    def _readable(self, stream: Any, events: int, opaque: object) -> None:
        """Node -> kh (in libvirt's event loop), until this stream ends (the domain stopped,
        the connection went)."""
        if events & libvirt.VIR_STREAM_EVENT_READABLE:
            try:
                data = stream.recv(RECV)
            except libvirt.libvirtError as e:
                if not self._closed.is_set():
                    log.info("%s: console stream ended: %s", self.name, e)
                data = b""
            if data == -2:  # nothing after all
                return
            if isinstance(data, bytes) and data:
                try:
                    self._ours.sendall(data)
                    return
                except OSError:
                    data = b""
        with self._lock:
            if self._stream is stream:
                self._stream = None
        self._drop(stream)

    @staticmethod
    def _drop(stream: Any) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            stream.eventRemoveCallback()
        with contextlib.suppress(libvirt.libvirtError):
            stream.abort()

    def _in(self) -> None:
        """kh -> node: what the Console writes, piece by piece, into the current stream."""
        while True:
            try:
                data = self._ours.recv(4096)
            except OSError:
                return
            if not data:
                return
            view = memoryview(data)
            while view and not self._closed.is_set():
                with self._lock:
                    while self._stream is None and not self._closed.is_set():
                        self._lock.wait(1.0)
                    stream = self._stream
                if stream is None:
                    return
                try:
                    sent = stream.send(view.tobytes())
                    if sent == -2:  # the stream's buffer is full: U-Boot echoes slowly
                        time.sleep(0.005)
                        continue
                except libvirt.libvirtError as e:
                    log.info("%s: console input: %s", self.name, e)
                    with self._lock:
                        if self._stream is stream:
                            self._stream = None
                    continue
                view = view[max(sent, 0):]

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            stream, self._stream = self._stream, None
            self._lock.notify_all()
        if stream is not None:
            self._drop(stream)
        with contextlib.suppress(OSError):
            self._ours.shutdown(socket.SHUT_RDWR)
        self._in_thread.join(timeout=2)
        self._ours.close()


class VolumeRam:
    """A node's RAM as a libvirt storage volume, opened for one load (kh.hw.backend.Ram)."""

    def __init__(self, conn: libvirt.virConnect, vol: libvirt.virStorageVol) -> None:
        self.conn = conn
        self.vol = vol
        try:
            self.size = int(vol.info()[1])
        except libvirt.libvirtError as e:
            raise LoadError(f"cannot open the node's RAM ({e.get_error_message()})") from None

    def write(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > self.size:
            raise LoadError(f"0x{offset:x}+{len(data)} is outside the node's "
                            f"{self.size >> 20} MiB")
        if not data:
            return
        stream: Any = self.conn.newStream(0)
        try:
            self.vol.upload(stream, offset, len(data), 0)
            view = memoryview(data)
            while view:
                sent = stream.send(view[:1 << 20].tobytes())
                if sent <= 0:
                    raise LoadError("the node's RAM refused the write")
                view = view[sent:]
            stream.finish()
        except libvirt.libvirtError as e:
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()
            raise LoadError(f"writing the node's RAM failed ({e.get_error_message()})") \
                from None

    def close(self) -> None:
        pass


def ram_volume(conn: libvirt.virConnect, dom: libvirt.virDomain, pool_name: str,
               host: str) -> VolumeRam:
    """The domain's RAM file as the one volume of a transient ``dir`` pool ``pool_name`` over
    its RAM directory (``<memory_backing_dir>/libvirt/qemu/<ID>-<name>``, new at each start:
    a pool over an older one is replaced). LoadError naming ``host`` when libvirt refuses."""
    path = f"{RAM_DIR}/libvirt/qemu/{dom.ID()}-{dom.name()}"  # as libvirt 9.0 names it
    try:
        try:
            pool = conn.storagePoolLookupByName(pool_name)
            if f"<path>{path}</path>" not in pool.XMLDesc(0):
                drop_pool(conn, pool_name)
                raise LookupError(pool_name)
            pool.refresh(0)
        except (libvirt.libvirtError, LookupError):
            xml = (f"<pool type='dir'><name>{escape(pool_name)}</name><target>"
                   f"<path>{escape(path)}</path></target></pool>")
            pool = conn.storagePoolCreateXML(xml, 0)
        vols = pool.listAllVolumes(0)
    except libvirt.libvirtError as e:
        raise LoadError(f"cannot open the node's RAM on host {host} ({error_text(e)})") \
            from None
    if len(vols) != 1:
        raise LoadError(f"the node's RAM directory {path} on host {host} holds {len(vols)} "
                        "files, not its RAM alone")
    return VolumeRam(conn, vols[0])


def drop_pool(conn: libvirt.virConnect, name: str) -> None:
    """Forget the transient pool ``name`` (the RAM file stays: it is the domain's)."""
    with contextlib.suppress(libvirt.libvirtError):
        conn.storagePoolLookupByName(name).destroy()
