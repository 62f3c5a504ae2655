"""What another host's `kh fabric` prints is bounded (TRIAL16, issue 16): khd reads a far
host's answer (`kh fabric underlays`, `stretch`, `wire`) whole, and a far host that prints
without end must not fill khd's memory; its error line is cut and has no control characters."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kh import proc
from kh.errors import KhError, ProcessError
from kh.hw import span
from kh.hw.stretch import StretchError
from kh.service import hosts

FLOOD = [sys.executable, "-c", "import sys\nwhile True: sys.stdout.write('x' * 65536)"]
ERR_FLOOD = [sys.executable, "-c", "import sys\nwhile True: sys.stderr.write('y' * 65536)"]


@pytest.mark.parametrize("argv", [FLOOD, ERR_FLOOD])
def test_a_program_printing_past_the_limit_is_stopped_and_named(argv):
    with pytest.raises(ProcessError, match="printed more than 1048576 bytes"):
        proc.run(argv, timeout=60, limit=1 << 20, what="the flood")


def test_output_under_the_limit_and_input_pass_as_before():
    r = proc.run([sys.executable, "-c", "import sys; d = sys.stdin.read(); print(d * 2); "
                  "print('e', file=sys.stderr)"], input=b"ab", timeout=30, limit=1 << 20)
    assert (r.stdout, r.stderr) == ("abab\n", "e\n")
    with pytest.raises(ProcessError) as e:
        proc.run([sys.executable, "-c", "import sys; print('kh: no', file=sys.stderr); "
                  "sys.exit(3)"], timeout=30, limit=1 << 20)
    assert e.value.returncode == 3 and "kh: no" in e.value.output_tail


def test_a_far_hosts_error_line_is_cut_and_printable():
    e = ProcessError("x failed", output_tail="kh: \x1b[2J\x1b[31mEVIL " + "y" * 300000 + "\n")
    line = str(span._remote_error("hostc", e))
    assert len(line) < 400 and "\x1b" not in line and "EVIL" in line


def test_kh_host_adds_check_reads_a_bounded_answer(monkeypatch):
    """`kh host add`'s `kh fabric underlays` there: a flood is one refusal naming the host."""
    seen = {}
    real = proc.run

    def run(argv, **kw):
        seen.update(kw)
        return real(FLOOD, **kw)

    monkeypatch.setattr(proc, "run", run)
    from kh.service.hostspec import HostSpec
    spec = HostSpec("hostc", "qemu:///system", prefix="kh", runner=())
    with pytest.raises(KhError, match=r"host hostc: .*printed more than"):
        hosts.Hosts._far_underlay(None, spec)  # type: ignore[arg-type]
    assert seen["limit"] <= span.REMOTE_OUTPUT


def test_every_far_kh_fabric_call_is_bounded(monkeypatch):
    """span's far side (stretch, unstretch) and RemoteFabric (wire, unwire) pass the limit."""
    seen = []

    def run(argv, **kw):
        seen.append(kw.get("limit"))
        raise ProcessError("stopped here")

    monkeypatch.setattr(proc, "run", run)
    from kh.hw.stretch import Peer, Underlay
    side = span.remote(["true"], "kh", Underlay("khul0", "192.0.2.2"), "b")
    for call in (lambda: side.ensure(3, [Peer("a", "192.0.2.1")]), lambda: side.remove(3, False),
                 lambda: span.RemoteFabric(["true"], "kh", "b").wire(7, [3, None]),
                 lambda: span.RemoteFabric(["true"], "kh", "b").unwire(7, 2)):
        with pytest.raises(KhError):
            call()
    assert len(seen) == 4 and all(s is not None and s <= span.REMOTE_OUTPUT for s in seen), seen


def _answer(monkeypatch, text):
    monkeypatch.setattr(proc, "run", lambda argv, **kw: subprocess.CompletedProcess(
        argv, 0, text, ""))


def _far(spec_name="hostc"):
    from kh.service.hostspec import HostSpec
    return hosts.Hosts._far_underlay(
        None, HostSpec(spec_name, "qemu:///system", prefix="kh", runner=()))  # type: ignore


@pytest.mark.parametrize("entry", [
    {"ifname": "khul0", "address": "192.0.2.2", "mtu": 10 ** 24},   # khd's 500 before
    {"ifname": "khul0", "address": "192.0.2.2", "mtu": 0},
    {"ifname": "khul0", "address": "192.0.2.2", "mtu": -1},
    {"ifname": "khul0", "address": "192.0.2.2", "mtu": 1300},       # nodes below 1280
    {"ifname": "khul0", "address": "192.0.2.2", "mtu": True},
    {"ifname": "x; rm -rf /", "address": "192.0.2.2", "mtu": 1500},
    {"ifname": "k" * 5000, "address": "192.0.2.2", "mtu": 1500},
    {"ifname": "khul0", "address": "not-an-address", "mtu": 1500},
    {"ifname": "khul0", "address": "127.0.0.1", "mtu": 1500},
])
def test_a_far_underlay_answer_out_of_range_is_one_refusal_naming_the_host(monkeypatch, entry):
    _answer(monkeypatch, json.dumps([entry]))
    with pytest.raises(hosts.HostRefused, match="host hostc: "):
        _far()


def test_a_far_underlay_answer_of_too_many_entries_is_refused(monkeypatch):
    _answer(monkeypatch, json.dumps([{"ifname": f"khul{i}", "address": f"192.0.2.{i + 1}",
                                      "mtu": 1500} for i in range(100)]))
    with pytest.raises(hosts.HostRefused, match="host hostc: "):
        _far()
    _answer(monkeypatch, json.dumps([{"ifname": "khul0", "address": "192.0.2.2", "mtu": 1500}]))
    assert _far() == {"ifname": "khul0", "address": "192.0.2.2", "mtu": 1500}


@pytest.mark.parametrize("answer", ['[{"ifname": "khul0"}]', '{"taps": [1, 2]}', '"x"',
                                    '{"taps": ["kh7s0", "x; rm -rf /"]}', "not json"])
def test_a_far_wire_answer_of_another_shape_is_one_line_naming_the_host(monkeypatch, answer):
    _answer(monkeypatch, answer)
    with pytest.raises(StretchError, match="host b: "):
        span.RemoteFabric(["true"], "kh", "b").wire(7, [3, None])


def test_a_far_host_that_did_not_answer_gives_one_hint():
    e = ProcessError("kh fabric underlays on hostc printed more than 1048576 bytes",
                     "is that the program kh expects there?")
    line = span._remote_error("hostc", e)
    assert line.message.count("(") == 0 and line.hint, line
