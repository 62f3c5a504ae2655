"""kh.scenario without guests: the principal's commands stood in (what khget printed, what kh ps
says), the control channel a stream of tagged lines. What the harness does with them is real:
the text object read by kh.textobj, ready lines per node, release on every way out."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from kh import scenario_consoles, textobj
from kh.errors import Stopped
from kh.scenario import Principal, Scenario, ScenarioError


class FakeChan:
    """A tagged session: ``say`` queues bytes for recv; close ends it."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.cond = threading.Condition()
        self.closed = False

    def say(self, data: bytes) -> None:
        with self.cond:
            self.chunks.append(data)
            self.cond.notify()

    def recv(self, size: int) -> bytes:
        with self.cond:
            while not self.chunks and not self.closed:
                self.cond.wait()
            return self.chunks.pop(0) if self.chunks else b""

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()


class FakeService:
    """khget, khdo and kh as the harness runs them: allocations by id, releases recorded."""

    def __init__(self, held: set[int]) -> None:
        self.held = set(held)
        self.next = 5
        self.released: list[int] = []
        self.calls: list[tuple[str, ...]] = []
        self.chans: dict[str, FakeChan] = {}
        self.on_kboot: tuple[bytes, ...] = ()  # what the tagged session says after run kboot
        self.fail_release: set[int] = set()

    def cli(self, module: str, *args: str, stdin: str | None = None, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
        self.calls.append((module, *args))
        out, code = "", 0
        if module == "khget":
            aid, self.next = self.next, self.next + 2
            self.held.add(aid)
            out = (f"con{aid}@127.0.0.1\nprotocol: uboot\nnetwork Internal : eth0\n"
                   f"nodeinfo: 3 3 10.1.0.3\nnodeinfo: 4 4 10.1.0.4\nnodes: 3 4\n")
        elif module == "khdo" and args[-2:] == ("write", "run kboot"):
            assert stdin is not None
            for chunk in self.on_kboot:
                self.chans[f"con{textobj.parse(stdin).id}"].say(chunk)
        elif module == "main" and args[0] == "ps":
            out = json.dumps({"allocations": [{"id": a} for a in sorted(self.held)]})
        elif module == "main" and args[0] == "release":
            aid = int(args[-1])
            if aid in self.fail_release:
                code = 1
            else:
                self.released.append(aid)
                self.held.discard(aid)
        if check and code:
            raise ScenarioError(f"{module} exited {code}")
        return subprocess.CompletedProcess([module, *args], code, out, "")

    def client(self, user: str, host: str, port: int, **kw: object) -> object:
        svc = self

        class Client:
            def open(self, command: str) -> FakeChan:
                assert command == "tagged"
                return svc.chans.setdefault(user, FakeChan())

            def close(self) -> None:
                pass
        return Client()


@pytest.fixture
def svc(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeService:
    s = FakeService(held={1})
    monkeypatch.setattr(Scenario, "cli", lambda self, *a, **kw: s.cli(*a, **kw))
    monkeypatch.setattr(scenario_consoles, "ChannelClient", s.client)
    return s


@pytest.fixture
def principal(tmp_path: Path) -> Principal:
    cred = tmp_path / "cred"
    cred.write_text("secret\n")
    return Principal("corp1", cred)


def test_ready_lines_come_per_node_and_a_failed_node_is_named(svc, principal, tmp_path):
    # Lines cut anywhere by the transport; nodes' lines interleaved.
    svc.on_kboot = (b"node3: Linux version 6.1\r\nnode4: kh-fai", b"led: no disk\r\nnode3: kh-r",
                    b"eady: apache node3 port=80\r\n")
    logs = tmp_path / "logs"
    with pytest.raises(ScenarioError) as e, Scenario(principal, logs=logs) as sc:
        a = sc.khget("-i", count=2)
        assert a.nodes == (3, 4) and a.netid(0) == 1 and a.address(4) == "10.1.0.4"
        sc.boot(a, "apache", timeout=5)
    assert "node 4: the appliance failed: no disk" in str(e.value)
    assert "node 3" not in str(e.value)
    assert "kh-ready: apache node3 port=80" in (logs / "node3.console.log").read_text()
    assert [c[-2:] for c in svc.calls if c[0] == "khdo"] == [
        ("loadkernel", str(sc.images / "uImage")),
        ("loadramdisk", str(sc.images / "apache.cpio.gz.uimg")), ("write", "run kboot")]
    assert svc.released == [5]
    rep = json.loads((logs / "report.json").read_text())
    assert rep["ok"] is False and rep["steps"][0]["name"] == "boot apache on con5"


def test_ready_lines_are_returned(svc, principal):
    with Scenario(principal) as sc:
        a = sc.khget(count=2)
        svc.on_kboot = (b"node4: kh-ready: shell node4\r\nnode3: junk\r\n"
                        b"node3: kh-ready: shell node3\r\n",)
        assert sc.boot(a, "shell", timeout=5) == {3: "kh-ready: shell node3",
                                                  4: "kh-ready: shell node4"}
        logs = sc.logs
        assert logs.is_dir()
    assert not logs.exists()  # made by the Scenario, and it passed


def test_a_node_that_never_comes_is_a_timeout_naming_it(svc, principal, tmp_path):
    svc.on_kboot = (b"node3: kh-ready: shell node3\r\n",)
    with pytest.raises(ScenarioError, match=r"node 4: node4: no appliance ready line within"), \
            Scenario(principal, logs=tmp_path) as sc:
        sc.boot(sc.khget(count=2), "shell", timeout=0.5)


def test_everything_the_principal_gained_is_released_when_the_body_raises(svc, principal,
                                                                          tmp_path):
    with pytest.raises(RuntimeError), Scenario(principal, logs=tmp_path) as sc:
        sc.khget()
        sc.khget()
        svc.held.add(42)  # made from inside a node (khgetdisk), the principal's too
        raise RuntimeError("a step failed")
    assert svc.released == [42, 7, 5]  # not 1: it was there before the scenario
    assert json.loads((tmp_path / "report.json").read_text())["error"] == \
        "RuntimeError: a step failed"


def test_sigterm_in_the_body_releases_and_stops(svc, principal, tmp_path):
    with pytest.raises(Stopped), Scenario(principal, logs=tmp_path) as sc:
        sc.khget()
        os.kill(os.getpid(), signal.SIGTERM)
        threading.Event().wait(5)  # the handler raises here
    assert svc.released == [5]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_failed_release_is_reported_after_the_others_are_released(svc, principal, tmp_path):
    svc.fail_release = {5}
    with pytest.raises(ScenarioError, match=r"release failed: con5"), \
            Scenario(principal, logs=tmp_path) as sc:
        sc.khget()
        sc.khget()
    assert svc.released == [7]
    assert (tmp_path / "report.txt").read_text().startswith("scenario: FAILED")


def test_kept_allocations_outlive_the_scenario(svc, principal, tmp_path):
    with Scenario(principal, logs=tmp_path) as sc:
        a = sc.khget()
        svc.held.add(42)
        sc.keep()
    assert svc.released == [] and svc.held == {1, a.id, 42}
    assert svc.chans[f"con{a.id}"].closed  # its console watch is closed all the same
