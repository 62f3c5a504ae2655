"""The reconcile plan (issue 15): old state + new file -> steps, pure; the dry run's text."""

from __future__ import annotations

from pathlib import Path

import pytest

from kh.lab import dryrun, plan
from kh.lab.model import Lab, load_lab
from kh.lab.plan import Act, AddToken, Boot, Khget, Release, Reset, RmDomain, RmToken
from kh.lab.state import AllocRec, GroupRec, LabState
from tests.unit.test_lab import BASE, lab_file

GOLDEN = Path(__file__).parent / "golden"


def lab_of(tmp_path: Path, text: str = BASE) -> Lab:
    return load_lab(lab_file(tmp_path, text))


def running(lab: Lab, allocs: dict[str, list[tuple[int, tuple[int, ...]]]],
            **extra: object) -> LabState:
    """The state as `kh up` leaves ``lab``: each group's allocations (id, nodes), booted."""
    groups = {}
    for g in lab.groups:
        recs = tuple(AllocRec(i, nodes, f"con{i}@x\nnodes: {' '.join(map(str, nodes))}\n",
                              True) for i, nodes in allocs[g.name])
        groups[g.name] = GroupRec(g.name, g.principal, sum(len(n) for _, n in allocs[g.name]),
                                  g.domains, g.appliance, g.kernel, g.keys, allocations=recs,
                                  ready=True, **extra.get(g.name, {}))  # type: ignore[arg-type]
    return LabState(lab.name, str(lab.path), "/run/kh/khd.sock",
                    {"alice": str(lab.principals[0].credential)}, {"net": 5}, {"net": "alice"},
                    groups=groups)


def test_first_up(tmp_path: Path) -> None:
    lab = lab_of(tmp_path)
    p = plan.up(lab, None)
    assert p.steps == (
        Khget("srv", "alice", 1, False, True, (), ("net",)),
        Khget("cli", "alice", 3, False, False, ("net",), ()),
        Boot("srv", "alice", "fileserver", "uImage"),
        Boot("cli", "alice", "worker", "uImage"),
    )
    assert p.nodes == 4


def test_unchanged_is_empty(tmp_path: Path) -> None:
    lab = lab_of(tmp_path)
    p = plan.up(lab, running(lab, {"srv": [(1, (2,))], "cli": [(2, (3, 4, 5))]}))
    assert p.empty and p.notes == ()


def test_count_up_adds_an_allocation_only(tmp_path: Path) -> None:
    old = running(lab_of(tmp_path), {"srv": [(1, (2,))], "cli": [(2, (3, 4, 5))]})
    lab = lab_of(tmp_path, BASE.replace("count: 3", "count: 5"))
    p = plan.up(lab, old)
    assert p.steps == (Khget("cli", "alice", 2, False, False, ("net",), ()),
                       Boot("cli", "alice", "worker", "uImage"))
    assert p.notes == ("cli: 3 -> 5 nodes: 2 added in a new allocation; nodes 3 4 5 untouched",)


def test_count_down_releases_the_newest(tmp_path: Path) -> None:
    lab5 = lab_of(tmp_path, BASE.replace("count: 3", "count: 5"))
    old = running(lab5, {"srv": [(1, (2,))], "cli": [(2, (3, 4, 5)), (7, (8, 9))]})
    p = plan.up(lab_of(tmp_path, BASE.replace("count: 3", "count: 2")), old)
    assert p.steps == (Release("cli", "alice", 7), Release("cli", "alice", 2, (5,)))
    assert p.notes == ("cli: 5 -> 2 nodes: 5 8 9 released",)


def test_appliance_change_reboots_that_group_only(tmp_path: Path) -> None:
    old = running(lab_of(tmp_path), {"srv": [(1, (2,))], "cli": [(2, (3, 4, 5))]})
    p = plan.up(lab_of(tmp_path, BASE.replace("fileserver", "nfsroot")), old)
    assert p.steps == (Reset("srv", "alice", (2,)), Boot("srv", "alice", "nfsroot", "uImage"))
    assert p.notes == ("srv: re-booted: appliance 'fileserver' -> 'nfsroot'",)


def test_keys_change_reboots(tmp_path: Path) -> None:
    old = running(lab_of(tmp_path), {"srv": [(1, (2,))], "cli": [(2, (3, 4, 5))]})
    p = plan.up(lab_of(tmp_path, BASE.replace("n={{ index }}", "m={{ index }}")), old)
    assert p.steps == (Reset("cli", "alice", (3, 4, 5)), Boot("cli", "alice", "worker",
                                                              "uImage"))


def test_domains_change_reallocates_and_reboots_who_names_it(tmp_path: Path) -> None:
    old = running(lab_of(tmp_path), {"srv": [(1, (2,))], "cli": [(2, (3, 4, 5))]})
    lab = lab_of(tmp_path, BASE.replace("[public, net]", "[external, public, net]"))
    p = plan.up(lab, old)
    assert p.steps == (
        Release("srv", "alice", 1),
        Khget("srv", "alice", 1, True, True, ("net",), ()),
        Boot("srv", "alice", "fileserver", "uImage"),
        Reset("cli", "alice", (3, 4, 5)),
        Boot("cli", "alice", "worker", "uImage"),
    )
    assert "cli: re-booted: it names srv, allocated again" in p.notes


def test_group_gone_and_its_domain(tmp_path: Path) -> None:
    text = BASE + "  extra:\n    domains: [public]\n    appliance: worker\n" \
                  "    token: {allocate_on: net, max_nodes: 2}\n    actions: [khgetdisk 1]\n"
    old = running(lab_of(tmp_path, text), {"srv": [(1, (2,))], "cli": [(2, (3, 4, 5))],
                                           "extra": [(3, (6,))]},
                  extra={"token_ids": (4,), "gained": (9,)})
    p = plan.up(lab_of(tmp_path), old)
    assert p.steps == (Release("extra", "alice", 9), Release("extra", "alice", 3),
                       RmToken("extra", "alice", 4))
    lone = BASE.replace("[public, net]", "[public]").replace("domains: [net]",
                                                             "domains: [public]")
    lone = lone.replace("kh.nfs={{ nodes.srv[0].ip.net }}", "kh.nfs={{ nodes.srv[0].ip.public }}")
    lone = lone.replace("domains:\n  net: {}\n", "")
    p = plan.up(lab_of(tmp_path, lone), running(lab_of(tmp_path), {"srv": [(1, (2,))],
                                                                   "cli": [(2, (3, 4, 5))]}))
    assert p.steps[-1] == RmDomain("net", "alice", 5)


def test_new_group_with_token_and_actions(tmp_path: Path) -> None:
    old = running(lab_of(tmp_path), {"srv": [(1, (2,))], "cli": [(2, (3, 4, 5))]})
    text = BASE + "  ds:\n    domains: [net]\n    appliance: diskserver\n" \
                  "    token: {allocate_on: net, max_nodes: 2}\n    actions: [khgetdisk 2]\n"
    p = plan.up(lab_of(tmp_path, text), old)
    assert p.steps == (Khget("ds", "alice", 1, False, False, ("net",), ()),
                       AddToken("ds", "alice", "net", 2),
                       Boot("ds", "alice", "diskserver", "uImage"),
                       Act("ds", "alice", ("khgetdisk 2",)))


def test_only_one_group(tmp_path: Path) -> None:
    p = plan.up(lab_of(tmp_path), None, only="cli")
    assert p.steps == (Khget("cli", "alice", 3, False, False, (), ("net",)),
                       Boot("cli", "alice", "worker", "uImage"))


def test_unfinished_group_is_rebooted(tmp_path: Path) -> None:
    lab = lab_of(tmp_path)
    old = running(lab, {"srv": [(1, (2,))], "cli": [(2, (3, 4, 5))]})
    old = old.with_group(GroupRec(**{**old.groups["cli"].__dict__, "ready": False}))
    p = plan.up(lab, old)
    assert p.steps == (Reset("cli", "alice", (3, 4, 5)), Boot("cli", "alice", "worker",
                                                              "uImage"))


def test_down_undoes_everything(tmp_path: Path) -> None:
    lab = lab_of(tmp_path)
    old = running(lab, {"srv": [(1, (2,))], "cli": [(2, (3, 4, 5)), (6, (7,))]},
                  srv={"token_ids": (3,), "gained": (8,)})
    old = LabState(**{**old.__dict__, "implicit": (("alice", 9),)})
    assert plan.down(old).steps == (
        Release("cli", "alice", 6), Release("cli", "alice", 2),
        Release("srv", "alice", 8), Release("srv", "alice", 1), RmToken("srv", "alice", 3),
        RmDomain("net", "alice", 5), RmDomain("", "alice", 9))


def test_dry_run_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lab = lab_of(tmp_path)
    # Credential paths are printed relative to the working directory when that is short;
    # from here they are absolute, wherever the checkout and the temporary directory lie.
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    got = dryrun.lines(plan.up(lab, None), lab, None, Path("/img"))
    got = [line.replace(str(tmp_path), "TMP") for line in got]
    want = (GOLDEN / "lab-dry-run.txt").read_text().splitlines()
    assert got == want


def test_dry_run_of_a_count_change(tmp_path: Path) -> None:
    old = running(lab_of(tmp_path), {"srv": [(1, (2,))], "cli": [(2, (3, 4, 5))]})
    lab = lab_of(tmp_path, BASE.replace("count: 3", "count: 4"))
    got = "\n".join(dryrun.lines(plan.up(lab, old), lab, old, Path("/img")))
    assert 'cli_2=$(khget -c ' in got and " -n 5 alice 1)" in got
    assert 'echo "$cli_2" | khdo' in got and "$con2" not in got
    assert "kh.nfs=10.5.0.2:/export n=3" in got  # the new node's keys, srv's real address


def test_state_round_trip_and_mode(tmp_path: Path, monkeypatch) -> None:
    from kh.lab import state
    from kh.lab.state import Pending
    monkeypatch.setenv("KH_LAB_DIR", str(tmp_path / "labs"))
    lab = lab_of(tmp_path)
    st = running(lab, {"srv": [(1, (2,))], "cli": [(2, (3, 4, 5))]},
                 srv={"token_ids": (3,), "gained": (8,), "token": ("net", 2)})
    st = LabState(**{**st.__dict__, "implicit": (("alice", 9),),
                     "pending": Pending("alice", (1, 2), (5,), "cli"),
                     "checks": (("c", False, "why"),)})
    state.save(st)
    assert state.load("t") == st and state.names() == ["t"]
    assert (tmp_path / "labs" / "t.json").stat().st_mode & 0o777 == 0o600
    state.remove("t")
    assert state.load("t") is None


def test_a_check_is_judged_by_status_expect_and_reject(tmp_path: Path) -> None:
    from kh.lab.checks import judge
    text = BASE + ("checks:\n  - name: c\n    on: cli[1]\n    run: x\n    expect: ok\n"
                   "    reject: leak\n")
    c = lab_of(tmp_path, text).checks[0]
    r = {"run": "x", "expect": "ok", "reject": "leak"}
    assert judge(c, r, "all ok\n", 0).ok
    assert judge(c, r, "all ok\n", 1).detail.startswith("exit status 1, not 0")
    assert not judge(c, r, "nothing\n", 0).ok
    bad = judge(c, r, "ok but leak\n", 0)
    assert not bad.ok and "'leak' in its output" in bad.detail and bad.place == "cli[1]"


def test_one_command_at_a_time_on_a_lab(tmp_path: Path, monkeypatch) -> None:
    import pytest

    from kh.errors import UsageError
    from kh.lab import state
    monkeypatch.setenv("KH_LAB_DIR", str(tmp_path))
    with state.locked("t"):
        with pytest.raises(UsageError, match="another kh command is working on lab t"), \
                state.locked("t"):
            pass
        with state.locked("u"):  # another lab is another lock
            pass
    with state.locked("t"):  # released
        pass
