"""Reading kh's U-Boot on a node's console: what ends a `run kboot`."""

import pytest

from kh.hw import uboot


@pytest.mark.parametrize("line,group,text", [
    (b"kh-failed: vblade node1: boot key kh.aoe=12.x is missing or malformed\r\n", "failed",
     b"vblade node1: boot key kh.aoe=12.x is missing or malformed"),
    (b"Kernel panic - not syncing: VFS: Unable to mount root fs\r\n", "panic",
     b"Kernel panic - not syncing: VFS: Unable to mount root fs"),
    (b"Wrong Image Format for bootm command\r\n", "uboot", b"Wrong Image Format for bootm command"),
    (b"kh-ready: apache node3 eth0=10.1.0.3\r\n", "appliance", b"apache"),
])
def test_kboot_outcomes_are_whole_lines(line, group, text):
    # The console can hand over half a line; a half line must not be taken for the message.
    for cut in range(1, len(line) - 2):
        assert uboot.KBOOT_OUTCOME.search(b"Run /init as init process\r\n" + line[:cut]) is None
    m = uboot.KBOOT_OUTCOME.search(b"Run /init as init process\r\n" + line)
    assert m is not None and m.group(group) == text
