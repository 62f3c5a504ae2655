"""The node backend seam: everything khd's service does to a node, as one small typed interface.

A backend runs nodes numbered by the service: it starts one to its U-Boot prompt (started
paused, console attached, then resumed, so no output is lost), stops and resets it, holds its
console stream (a kh.hw.console.Console, read all the time and logged) and a writer feeding it,
writes bytes at a guest-physical address of its RAM (bulk loads), raises and cuts the carrier of
each of its NICs, and says what its emulator used (for metering). The service, the pool, the
control channel's access and the meter use only this interface:

- ``qemu`` (kh.service.nodes.NodeManager, the default): khd runs each QEMU itself in kh's
  fabric namespace; the console is QEMU's unix socket, RAM a shared memfd, links QMP's
  ``set_link``, accounting a cgroup per node.
- ``libvirt`` (kh.service.libvirt_nodes): each node a libvirt domain on one of the service's
  hosts (``qemu:///system`` or ``qemu+ssh://``); the console is libvirt's console stream, RAM a
  file-backed memory exposed as a storage volume (written with volume upload at an offset),
  links ``virDomainUpdateDeviceFlags`` (domif-setlink), accounting libvirt's CPU time.

Errors: StartFailed (one-line ``reason``), StartAborted (khd is stopping), LoadError for RAM,
KhError for anything else the host refused.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol

from kh.allocation import NIC_SLOTS
from kh.errors import BootError, KhError
from kh.hw.cgroup import Usage
from kh.hw.console import Console
from kh.hw.uboot import UBOOT_PROMPT

if TYPE_CHECKING:
    from kh.cc.channel import NodeWriter
    from kh.hw.fabric import Fabric


class StartFailed(BootError):
    """A node did not come to the U-Boot prompt; ``reason`` says why in one line."""

    def __init__(self, number: int, reason: str) -> None:
        super().__init__(f"node {number} failed to start: {reason}")
        self.number = number
        self.reason = reason


class StartAborted(BootError):
    """khd is going away: the node's start was stopped, its emulator ended."""


class Ram(Protocol):
    """One node's memory, opened for one load."""

    def write(self, offset: int, data: bytes) -> None:
        """Put ``data`` at guest-physical ``offset``; LoadError if it does not fit."""

    def close(self) -> None: ...


class Node(Protocol):
    """A running node as the service sees it."""

    number: int
    console: Console  # read all the time by the backend; the channel subscribes to it
    writer: NodeWriter  # the one queue feeding the console (kh.cc.channel)
    lock: threading.Lock  # held while the service drives U-Boot or resets the node

    @property
    def pid(self) -> int:
        """What the state records to find the node again after a khd restart (the QEMU's
        PID for ``qemu``; the libvirt domain's ID for ``libvirt``)."""

    def alive(self) -> bool: ...

    def death_reason(self) -> str:
        """Why a node that is no longer ``alive`` is gone, in one line."""


class Backend(Protocol):
    """What the service does to nodes. Node numbers are the service's; a backend keeps no
    state of its own beyond what it needs to find its nodes again (``reattach``)."""

    name: str  # "qemu" or "libvirt"
    fabric: Fabric  # kh's bridges and taps (the pool watches it)

    @property
    def running(self) -> Mapping[int, Node]: ...

    def start(self, number: int, timeout: float = 30.0,
              on_spawn: Callable[[int], None] = lambda pid: None) -> Node:
        """Start node ``number`` paused, attach its console, load the service's default
        kernel and appliance, resume it, wait for the U-Boot prompt. Raises StartFailed or
        StartAborted; either way nothing of the attempt is left."""

    def reattach(self, number: int, pid: int) -> Node | None:
        """After a khd restart: the node that kept running (``pid`` as recorded), or None."""

    def kill_recorded(self, number: int, pid: int | None) -> bool:
        """Stop what a start khd did not finish left running, only if ``pid`` is still it."""

    def stop_orphans(self) -> list[str]:
        """After ``reattach``: stop this khd's nodes that the state does not know; say what."""

    def stop(self, number: int) -> None: ...

    def detach_all(self) -> None:
        """khd is going away; nodes keep running."""

    def abort_starts(self, wait: float | None = None) -> None:
        """Refuse new starts and end those under way (see NodeManager.abort_starts)."""

    def uboot(self, number: int, line: str, timeout: float = 10.0) -> str:
        """Run one U-Boot command line on the node's console; its output."""

    def reset(self, number: int, timeout: float = 30.0) -> None:
        """Reset to the U-Boot prompt with the default images loaded again."""

    def set_links(self, number: int, used: int) -> None:
        """Carrier up on NICs 0..used-1, down on the others."""

    def set_link(self, number: int, slot: int, up: bool) -> None: ...

    def open_ram(self, number: int) -> Ram:
        """The node's RAM for one load (LoadError: not running, cannot be opened)."""

    def usage(self, number: int) -> Usage | None:
        """CPU and memory the node's emulator used (None: not known / not running)."""


def reset_to_prompt(console: Console, paused_reset: Callable[[], object],
                    resume: Callable[[], object], timeout: float) -> None:
    """A node's reset, at its U-Boot prompt again: ``paused_reset`` pauses the node, resets it
    and loads its default images; what the old run printed is then read (Console.settle)
    before the console's mark is taken, so none of it counts as the prompt after the reset
    (a node printing ``=> `` until it was paused made the reset pass before U-Boot was up);
    then ``resume`` and back_at_prompt from that mark. BootError/KhTimeout naming the stage."""
    paused_reset()
    console.settle()
    start = console.mark()
    resume()
    back_at_prompt(console, start, timeout)


def back_at_prompt(console: Console, start: int, timeout: float) -> None:
    """After a reset that resumed the node: wait (from console offset ``start``) for U-Boot's
    prompt, then clear the line with Ctrl-C (what the emulator already held may have reached
    the prompt) and wait for the prompt again. BootError/KhTimeout naming the stage."""
    console.expect(UBOOT_PROMPT, timeout, stage="U-Boot prompt after reset", start=start)
    console.wait_sent(10)
    start = console.mark()
    console.write(b"\x03")
    console.expect(UBOOT_PROMPT, 5, stage="U-Boot prompt after Ctrl-C", start=start)


def fresh_taps(fabric: Fabric, number: int) -> None:
    """Node ``number``'s taps in kh's fabric, made if missing and in no domain, before its
    emulator starts: a node starts cut off. StartFailed when the fabric refuses."""
    try:
        for slot in range(NIC_SLOTS):
            fabric.ensure_tap(number, slot)
            fabric.attach(number, slot, None)
    except KhError as e:
        raise StartFailed(number, str(e)) from e
