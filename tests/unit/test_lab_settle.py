"""A lab's leftovers are its own (issue 15): an interrupted `kh up` settled by `kh down` (or
the next `kh up`) releases what its step made, never another lab's allocations or domains,
nor what its principal made after the step had to end; a lab file named like a running lab
from another file does not undo it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from kh.errors import UsageError
from kh.lab import commands
from kh.lab import state as state_mod
from kh.lab.run import Runner
from kh.lab.state import AllocRec, GroupRec, LabState, Pending

TEXT = ("con{id}@127.0.0.1\nprotocol: uboot\nnetwork {net} : eth0\n"
        "nodeinfo: {n} {n} 10.{net}.0.{n}\nnodes: {n}\n")


@pytest.fixture
def labs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KH_LAB_DIR", str(tmp_path / "labs"))
    monkeypatch.setenv("KH_STATE_DIR", str(tmp_path / "khd"))
    return tmp_path


def group(name: str, alloc: int, net: int, node: int) -> GroupRec:
    return GroupRec(name, "alice", 1, (), "worker", "uImage", "",
                    allocations=(AllocRec(alloc, (node,),
                                          TEXT.format(id=alloc, net=net, n=node), True),))


class FakeScenario:
    def __init__(self, released: list[int]) -> None:
        self.released = released

    def release(self, alloc: int) -> None:
        self.released.append(alloc)


def test_settle_releases_only_what_the_interrupted_step_made(labs: Path) -> None:
    svc = commands.service()
    # lab a: its khget of group w was cut short at t=1000 (limit 300 s + slack)
    a = LabState("a", "/x/a.yaml", svc, {"alice": "/x/alicecred"},
                 pending=Pending("alice", (5,), (3,), "w", 1000.0, 1360.0))
    state_mod.save(a)
    # lab b, up since with alice too: con6 in alice's domain 3 (khget's default) and its
    # own domain 7
    state_mod.save(LabState("b", "/x/b.yaml", svc, {"alice": "/x/alicecred"},
                            domains={"bnet": 7}, groups={"v": group("v", 6, 3, 2)}))
    view = {"allocations": [{"id": 5, "created": 900.0},    # before the step
                            {"id": 6, "created": 1100.0},   # lab b's
                            {"id": 8, "created": 1010.0},   # the step's own
                            {"id": 9, "created": 5000.0}],  # a khget by hand, hours later
            "domains": [{"netid": d, "kind": "private", "owner": "alice"}
                        for d in (3, 7, 10)]}
    released: list[int] = []
    removed: list[str] = []
    said: list[str] = []
    r = Runner(a, None, said.append)
    r.view = lambda principal, unknown_empty=False: view  # type: ignore[method-assign]
    r.sc = lambda principal: FakeScenario(released)  # type: ignore[method-assign,assignment,return-value]

    def kh2(principal: str, group: str, sub: str, *args: str, check: bool = True) -> Any:
        removed.append(f"{group} {sub} {' '.join(args)}")
    r.kh2 = kh2  # type: ignore[method-assign,assignment]
    r.settle_pending()
    assert released == [8]
    assert removed == ["domain rm 10"]
    st = state_mod.load("a")
    assert st is not None and st.pending is None


def test_a_domain_another_lab_uses_is_kept_at_down(labs: Path) -> None:
    from kh.lab.plan import RmDomain
    svc = commands.service()
    a = LabState("a", "/x/a.yaml", svc, {"alice": "/x/alicecred"}, implicit=(("alice", 3),))
    state_mod.save(a)
    state_mod.save(LabState("b", "/x/b.yaml", svc, {"alice": "/x/alicecred"},
                            groups={"v": group("v", 6, 3, 2)}))
    removed: list[str] = []
    said: list[str] = []
    r = Runner(a, None, said.append)

    def kh2(principal: str, group: str, sub: str, *args: str, check: bool = True) -> Any:
        import subprocess
        removed.append(f"{group} {sub} {' '.join(args)}")
        return subprocess.CompletedProcess([], 0, "", "")
    r.kh2 = kh2  # type: ignore[method-assign,assignment]
    r.step(RmDomain("", "alice", 3))
    assert removed == [] and r.st.implicit == ()
    assert said == ["domain 3 (3) kept: lab b uses it and removes it at its kh down"]
    b = state_mod.load("b")  # lab b took it over: its kh down removes it, nothing is left
    assert b is not None and b.implicit == (("alice", 3),)
    state_mod.remove("a")
    rb = Runner(b, None, said.append)
    rb.kh2 = kh2  # type: ignore[method-assign,assignment]
    rb.step(RmDomain("", "alice", 3))
    assert removed == ["domain rm 3"]


def test_a_lab_named_like_a_running_one_from_another_file_is_refused(
        labs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(labs)
    cred = labs / "bobcred"
    cred.write_text("bobs-secret\n")
    f = labs / "shop.yaml"
    f.write_text("principals:\n  bob: {credential: ./bobcred}\ngroups:\n  db:\n"
                 "    appliance: worker\n")
    state_mod.save(LabState("shop", "/home/alice/shop.yaml", commands.service(),
                            {"alice": "/home/alice/alicecred"},
                            groups={"web": group("web", 2, 3, 2)}))
    said: list[str] = []
    with pytest.raises(UsageError, match=r"lab shop is up from another file, "
                       r"/home/alice/shop.yaml; .*shop.yaml would undo it"):
        commands.up(f, said.append, dry_run=True)
    assert said == []
    assert commands.up(f, said.append, dry_run=True, take_over=True) == 0
    assert any("web: gone from the file" in line for line in said)
    # nor do down, status, check or restart act on it through this file
    for arg in (str(f), "shop.yaml"):  # the path, or the name of a file here (cwd: labs)
        with pytest.raises(UsageError) as e:
            commands.resolve(arg)
        assert str(e.value).startswith("lab shop is up from another file, "
                                       f"/home/alice/shop.yaml, not {arg} ")
    assert commands.resolve("shop") == ("shop", None)


class FakeClient:
    """khd's answers: 10 nodes free; alice holds 1 node of 3 and 1 domain of 2 (``held``);
    carol is not registered."""

    held = (1, 1)

    def __init__(self, socket: object) -> None:
        pass

    def call(self, method: str, path: str, body: Any = None, as_json: bool = False) -> str:
        import json

        from kh.admission import AuthError
        if path == "/v1/status":
            return "khd running: 12 nodes, 10 free, 2 allocated\n"
        if body["user"] != "alice":
            raise AuthError(f"credential refused for principal {body['user']}")
        return json.dumps({"quota": {"nodes": [self.held[0], 3], "domains": [self.held[1], 2]}})


QUOTA_LAB = """\
principals:
  alice: {credential: ./alicecred}
  carol: {credential: ./alicecred}
domains:
  n1: {}
  n2: {}
groups:
  a:
    count: 1
    domains: [n1]
    appliance: worker
  b:
    count: COUNT
    domains: [n2]
    appliance: worker
  c:
    principal: carol
    count: 5
    appliance: worker
"""


@pytest.mark.parametrize("count,error", [
    ("2", "t.yaml:13: key groups.b.count: principal alice would hold 4 nodes, over its node "
          "quota of 3; nothing was allocated"),
    ("1", "t.yaml:14: key groups.b.domains: principal alice would own 3 private domains, "
          "over its quota of 2; nothing was allocated")])
def test_a_lab_over_its_principals_quota_allocates_nothing(
        labs: Path, monkeypatch: pytest.MonkeyPatch, count: str, error: str) -> None:
    from kh.lab import plan
    from kh.lab.model import load_lab
    from kh.lab.source import LabError
    (labs / "alicecred").write_text("s3cret-in-a-file\n")
    f = labs / "t.yaml"
    f.write_text(QUOTA_LAB.replace("COUNT", count))
    images = labs / "images"
    images.mkdir()
    for name in ("uImage", "worker.cpio.gz.uimg"):
        (images / name).write_bytes(b"x")
    monkeypatch.setattr(commands, "Client", FakeClient)
    lab = load_lab(f)
    with pytest.raises(LabError) as e:
        commands.preflight(lab, plan.up(lab, None, None), images, None)
    assert str(e.value).startswith(f"{labs / error}")
    if count == "1":  # carol (not registered yet: khget registers her) is not refused
        lab = load_lab(f)
        monkeypatch.setattr(FakeClient, "held", (0, 0))
        commands.preflight(lab, plan.up(lab, None, None), images, None)


class SilentScenario:
    """A principal's scenario whose kh ps fails as it does when khd is busy or slow."""

    def kh(self, *args: str, check: bool = True) -> Any:
        import subprocess
        return subprocess.CompletedProcess(["kh", *args], 1, "",
                                           "kh: khd did not answer within 30 s\n")


def test_khd_not_answering_is_not_everything_gone(labs: Path) -> None:
    from kh.errors import KhError
    from kh.lab.plan import Release
    st = LabState("a", "/x/a.yaml", commands.service(), {"alice": "/x/alicecred"},
                  groups={"w": group("w", 6, 3, 2)})
    state_mod.save(st)
    said: list[str] = []
    r = Runner(st, None, said.append)
    r.sc = lambda principal: SilentScenario()  # type: ignore[method-assign,assignment,return-value]
    for call in (r.forget_gone, lambda: r.step(Release("w", "alice", 6))):
        with pytest.raises(KhError, match=r"cannot see what alice holds .*did not answer"):
            call()
    assert state_mod.load("a") == st and said == []  # the allocation is still the lab's


def test_only_a_group_naming_a_group_not_up_allocates_nothing(labs: Path) -> None:
    """`kh up --only web` while web's keys name gw's node and gw is not up: refused before
    the khget (it used to allocate web's node, then fail rendering its keys)."""
    from kh.lab.source import LabError
    (labs / "alicecred").write_text("s3cret-in-a-file\n")
    f = labs / "shop.yaml"
    f.write_text("principals:\n  alice: {credential: ./alicecred}\ndomains:\n  back: {}\n"
                 "groups:\n  gw:\n    domains: [external, back]\n    appliance: gateway\n"
                 "  web:\n    domains: [back]\n    appliance: worker\n"
                 "    keys: kh.gw={{ nodes.gw[0].ip.back }}\n")
    said: list[str] = []
    with pytest.raises(LabError) as e:
        commands.up(f, said.append, dry_run=True, only="web")
    assert str(e.value).startswith(f"{f}:12: key groups.web.keys: template names something "
                                   "that does not exist: list object has no element 0 ")
    assert e.value.hint is not None and e.value.hint.startswith("groups not up: gw;")
    assert said == [] and state_mod.names() == []
    assert commands.up(f, said.append, dry_run=True, only="gw") == 0


class RefusingScenario:
    """kh ps -u for a principal khd does not know (or whose credential changed)."""

    def kh(self, *args: str, check: bool = True) -> Any:
        import subprocess
        return subprocess.CompletedProcess(
            ["kh", *args], 3, "", "kh: credential refused for principal alice (check -c FILE "
            "or KH_CREDENTIAL; a new principal registers with khget)\n")


def test_a_principal_not_registered_yet_holds_nothing_before_its_first_khget(
        labs: Path) -> None:
    from kh.errors import KhError
    st = LabState("a", "/x/a.yaml", commands.service(), {"alice": "/x/alicecred"})
    state_mod.save(st)
    r = Runner(st, None, [].append)
    r.sc = lambda principal: RefusingScenario()  # type: ignore[method-assign,assignment,return-value]
    with r.pending("alice", "w", 10) as p:  # a new lab's first khget registers alice
        assert (p.allocations, p.domains) == ((), ())
    r.save(replace(r.st, groups={"w": group("w", 6, 3, 2)}))
    with pytest.raises(KhError, match="credential refused"):
        r.forget_gone()  # the lab's allocations are not forgotten on a refusal
