"""The outside world (issue 12, item 1): by default khd makes and owns `<prefix>-outside`, an
operator's --uplink-netns replaces it, --no-outside has none; `kh service status` names it;
`kh outside` and khdo's peripcmd/pernodecmd run there. No root needed here (the namespace
itself is tested by the guest test)."""

from __future__ import annotations

import argparse
import json
import subprocess

import pytest
from click.testing import CliRunner

from kh.cli import khdo
from kh.cli import outside as outside_cli
from kh.cli.main import main as kh_main
from kh.errors import KhError, UsageError
from kh.service import config, control, preflight
from kh.service.config import ServiceConfig
from tests.unit.fake_khd import get, make_service, serving, text_of


def test_kh_owns_an_outside_world_unless_told_otherwise(tmp_path):
    own = ServiceConfig(state_dir=tmp_path, images=tmp_path, prefix="kz")
    assert own.fabric.uplink_netns == "kz-outside" and own.fabric.own_outside
    assert own.outside_netns == "kz-outside"
    theirs = ServiceConfig(state_dir=tmp_path, images=tmp_path, prefix="kz", uplink_netns="w")
    assert theirs.fabric.uplink_netns == "w" and not theirs.fabric.own_outside
    none = ServiceConfig(state_dir=tmp_path, images=tmp_path, prefix="kz", outside=False)
    assert none.fabric.uplink_netns is None and none.outside_netns is None
    with pytest.raises(UsageError, match="--uplink-netns names an outside world and "
                                         "--no-outside asks for none"):
        ServiceConfig(state_dir=tmp_path, images=tmp_path, uplink_netns="w", outside=False)


def test_the_setting_reaches_khd_and_a_running_khd_is_compared_with_it(tmp_path):
    cfg = ServiceConfig(state_dir=tmp_path / "s", images=tmp_path, outside=False)
    ap = argparse.ArgumentParser()
    config.add_options(ap)
    assert config.from_options(ap.parse_args(config.to_argv(cfg))) == cfg
    assert config.parse_argv(config.to_argv(cfg)).outside is False
    asked = ServiceConfig(state_dir=tmp_path / "s", images=tmp_path)
    assert control.mismatch(cfg, asked, {"outside"}) == \
        "khd already running with an outside world off, not on"


def test_an_operator_namespace_may_not_take_kh_s_own_name(tmp_path):
    cfg = ServiceConfig(state_dir=tmp_path, images=tmp_path, prefix="kz",
                        uplink_netns="kz-outside")
    with pytest.raises(KhError, match="--uplink-netns kz-outside names kh's own outside "
                                      "world"):
        preflight.check_uplink(cfg)


def test_status_names_the_outside_world(tmp_path, monkeypatch):
    for kw, text, data in [
        ({}, "outside world: network namespace ku-outside (kh's; `kh outside CMD` runs there)",
         {"netns": "ku-outside", "own": True}),
        ({"uplink_netns": "theirs"}, "outside world: network namespace theirs (the "
         "operator's; `kh outside CMD` runs there)", {"netns": "theirs", "own": False}),
        ({"outside": False}, "outside world: none (khd runs with --no-outside)", None),
    ]:
        svc = make_service(tmp_path / str(len(kw)) / text[15:20], monkeypatch, **kw)
        try:
            with serving(svc, svc.cfg.socket) as sock:
                assert text in text_of(get(sock, "/v1/status")[1])
                got = json.loads(text_of(get(sock, "/v1/status?format=json")[1]))
                assert got["outside"] == data
        finally:
            svc.store.close()


class FakeClient:
    def __init__(self, outside: object) -> None:
        self.outside = outside

    def call(self, method: str, path: str, body: object = None, *, as_json: bool = False
             ) -> str:
        assert (method, path, as_json) == ("GET", "/v1/status", True)
        return json.dumps({"running": True, "outside": self.outside})


def test_kh_outside_enters_khd_s_namespace_and_passes_the_command_on(monkeypatch):
    ran: list[list[str]] = []
    monkeypatch.setattr(outside_cli.os, "geteuid", lambda: 0)
    monkeypatch.setattr(outside_cli.nsutil, "exists", lambda name: name == "ku-outside")
    monkeypatch.setattr(outside_cli.proc, "replace", lambda argv: ran.append(list(argv)))
    monkeypatch.setattr(outside_cli, "client",
                        lambda: FakeClient({"netns": "ku-outside", "own": True}))
    r = CliRunner().invoke(kh_main, ["outside", "--", "wget", "-qO-", "http://10.0.0.4/"])
    assert r.exit_code == 0, r.output
    assert ran == [["nsenter", "--net=/run/netns/ku-outside", "--", "wget", "-qO-",
                    "http://10.0.0.4/"]]
    # without --, options are the command's too
    r = CliRunner().invoke(kh_main, ["outside", "ip", "-br", "addr"])
    assert r.exit_code == 0 and ran[-1][-3:] == ["ip", "-br", "addr"], r.output


@pytest.mark.parametrize("outside, root, words", [
    (None, True, "kh: khd runs without an outside world (it was started with --no-outside)"),
    ({"netns": "gone-outside", "own": True}, True, "kh: khd's outside world gone-outside is "
     "gone"),
    ({"netns": "ku-outside", "own": True}, False, "kh: kh outside needs root"),
])
def test_kh_outside_says_why_it_cannot(monkeypatch, outside, root, words):
    monkeypatch.setattr(outside_cli.os, "geteuid", lambda: 0 if root else 1000)
    monkeypatch.setattr(outside_cli.nsutil, "exists", lambda name: name == "ku-outside")
    monkeypatch.setattr(outside_cli.proc, "replace", lambda argv: pytest.fail("ran"))
    monkeypatch.setattr(outside_cli, "client", lambda: FakeClient(outside))
    r = CliRunner().invoke(kh_main, ["outside", "true"])
    assert r.exit_code != 0 and words in r.output, r.output
    r = CliRunner().invoke(kh_main, ["outside"])
    assert r.exit_code == 2 and "kh outside needs a command to run" in r.output


def test_kh_outside_without_khd_says_it_is_not_running(tmp_path, monkeypatch):
    monkeypatch.setattr(outside_cli.os, "geteuid", lambda: 0)
    monkeypatch.setenv("KH_STATE_DIR", str(tmp_path))
    r = CliRunner().invoke(kh_main, ["outside", "true"])
    assert r.exit_code != 0 and "kh: khd is not running" in r.output, r.output


OBJ = ("con12@127.0.0.1\nprotocol: uboot\nnetwork External : eth0\nnodeinfo: 3 3 10.0.0.3\n"
       "nodeinfo: 4 4 10.0.0.4\nnodes: 3 4\n")


@pytest.fixture
def started(monkeypatch) -> list[list[str]]:
    """The argvs khdo's peripcmd starts (each really run, as `true`)."""
    argvs: list[list[str]] = []
    real = khdo.proc.start

    def start(argv, **kw):  # type: ignore[no-untyped-def]
        argvs.append([str(a) for a in argv])
        return real(["true"], **kw)
    monkeypatch.setattr(khdo.proc, "start", start)
    return argvs


def run_khdo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    r = CliRunner().invoke(khdo.main, list(args), input=OBJ,
                           env={"KH_CREDENTIAL": "secret-credential", **(env or {})})
    return subprocess.CompletedProcess(args, r.exit_code, r.output)


def test_khdo_runs_per_node_commands_in_khd_s_outside_world(monkeypatch, started):
    monkeypatch.setattr(khdo.os, "geteuid", lambda: 0)
    monkeypatch.setattr("kh.cli.outside.nsutil.exists", lambda name: True)
    monkeypatch.setattr("kh.client.Client.call", lambda self, *a, **k: json.dumps(
        {"outside": {"netns": "ku-outside", "own": True}}))
    r = run_khdo("peripcmd", "wget -qO- http://%ip%/")
    assert r.returncode == 0, r.stdout
    assert started == [["nsenter", "--net=/run/netns/ku-outside", "--", "/bin/sh", "-c",
                        f"wget -qO- http://10.0.0.{n}/"] for n in (3, 4)]
    # --netns and KHDO_NETNS still win; --host runs on the host
    started.clear()
    assert run_khdo("--netns", "mine", "pernodecmd", "echo %node%").returncode == 0
    assert [a[:2] for a in started] == [["nsenter", "--net=/run/netns/mine"]] * 2
    started.clear()
    assert run_khdo("pernodecmd", "echo %node%", env={"KHDO_NETNS": "env"}).returncode == 0
    assert [a[:2] for a in started] == [["nsenter", "--net=/run/netns/env"]] * 2
    started.clear()
    assert run_khdo("--host", "pernodecmd", "echo %node%").returncode == 0
    assert started == [["/bin/sh", "-c", "echo 3"], ["/bin/sh", "-c", "echo 4"]]
    r = run_khdo("--host", "--netns", "x", "pernodecmd", "echo")
    assert r.returncode == 2 and "--host and --netns" in r.stdout


def test_khdo_runs_on_the_host_when_it_cannot_enter_or_khd_does_not_answer(tmp_path,
                                                                        monkeypatch, started):
    monkeypatch.setattr(khdo.os, "geteuid", lambda: 1000)  # not root: the host, no word
    assert run_khdo("pernodecmd", "echo %node%").returncode == 0
    assert started[0] == ["/bin/sh", "-c", "echo 3"]
    started.clear()
    monkeypatch.setattr(khdo.os, "geteuid", lambda: 0)
    monkeypatch.setenv("KH_STATE_DIR", str(tmp_path))  # no khd there
    r = run_khdo("pernodecmd", "echo %node%")
    assert r.returncode == 0 and started[0] == ["/bin/sh", "-c", "echo 3"]
    assert "khdo: khd is not running" in r.stdout and "running on the host" in r.stdout
