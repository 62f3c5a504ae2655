"""Lab files (issue 15): parsing, schema errors with their line, templates, bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kh.lab import template
from kh.lab.model import load_lab
from kh.lab.source import LabError

REPO = Path(__file__).resolve().parents[2]


def lab_file(tmp_path: Path, text: str, creds: tuple[str, ...] = ("alice",)) -> Path:
    for c in creds:
        (tmp_path / f"{c}cred").write_text("s3cret-but-only-in-a-file\n")
    p = tmp_path / "t.yaml"
    p.write_text(text)
    return p


BASE = """\
lab: t
principals:
  alice: {credential: ./alicecred}
domains:
  net: {}
groups:
  srv:
    domains: [public, net]
    appliance: fileserver
  cli:
    count: 3
    domains: [net]
    appliance: worker
    keys: kh.nfs={{ nodes.srv[0].ip.net }}:/export n={{ index }}
    after: [srv]
"""


def error_of(tmp_path: Path, text: str, creds: tuple[str, ...] = ("alice",)) -> str:
    with pytest.raises(LabError) as e:
        load_lab(lab_file(tmp_path, text, creds))
    return str(e.value)


def test_parses_groups_domains_order(tmp_path: Path) -> None:
    lab = load_lab(lab_file(tmp_path, BASE))
    assert lab.name == "t" and [g.name for g in lab.groups] == ["srv", "cli"]
    srv, cli = lab.groups
    assert srv.interfaces == ("public", "net") and srv.count == 1 and srv.kernel == "uImage"
    assert cli.count == 3 and cli.after == ("srv",) and cli.principal == "alice"
    assert lab.domain("net").created_by == "srv" and lab.domain("net").owner == "alice"
    assert lab.principals[0].credential == tmp_path / "alicecred"
    assert cli.at.line == 10 and cli.src["keys"].line == 14


def test_order_follows_after(tmp_path: Path) -> None:
    text = BASE.replace("  srv:\n", "  srv:\n    after: [cli2]\n") + \
        "  cli2:\n    domains: [external]\n    appliance: apache\n"
    lab = load_lab(lab_file(tmp_path, text))
    assert [g.name for g in lab.order()] == ["cli2", "srv", "cli"]
    assert lab.group("cli2").implicit_private and lab.group("cli2").interfaces == ("external", "")


def test_unknown_key_names_line_and_key(tmp_path: Path) -> None:
    msg = error_of(tmp_path, BASE.replace("    appliance: worker\n",
                                          "    appliance: worker\n    colour: blue\n"))
    assert f"{tmp_path}/t.yaml:14: key groups.cli.colour: unknown key 'colour'" in msg


def test_wrong_type_names_line_and_key(tmp_path: Path) -> None:
    msg = error_of(tmp_path, BASE.replace("count: 3", "count: three"))
    assert "t.yaml:11: key groups.cli.count: 'three' is not of type integer" in msg


def test_template_naming_a_missing_node(tmp_path: Path) -> None:
    msg = error_of(tmp_path, BASE.replace("nodes.srv[0]", "nodes.srv[1]"))
    assert "t.yaml:14: key groups.cli.keys: template names something that does not exist" in msg


def test_template_naming_a_missing_domain(tmp_path: Path) -> None:
    msg = error_of(tmp_path, BASE.replace("ip.net }}", "ip.pnet }}"))
    assert "t.yaml:14: key groups.cli.keys" in msg and "pnet" in msg


def test_template_naming_a_missing_group(tmp_path: Path) -> None:
    msg = error_of(tmp_path, BASE.replace("nodes.srv[0]", "nodes.fs[0]"))
    assert "groups.cli.keys" in msg and "fs" in msg


def test_cycle_is_named(tmp_path: Path) -> None:
    msg = error_of(tmp_path, BASE.replace("  srv:\n", "  srv:\n    after: [cli]\n"))
    assert "a cycle in after: " in msg
    assert "srv -> cli -> srv" in msg and "t.yaml:16: key groups.cli.after[0]" in msg


def test_missing_credential_file(tmp_path: Path) -> None:
    msg = error_of(tmp_path, BASE, creds=())
    assert "t.yaml:3: key principals.alice.credential: credential file './alicecred' is " \
           "missing" in msg


def test_unknown_domain_and_group(tmp_path: Path) -> None:
    assert "t.yaml:12: key groups.cli.domains[0]: no domain 'nett'" in \
        error_of(tmp_path, BASE.replace("domains: [net]", "domains: [nett]"))
    assert "t.yaml:15: key groups.cli.after[0]: no group 'svr'" in \
        error_of(tmp_path, BASE.replace("after: [srv]", "after: [svr]"))


def test_another_principals_domain(tmp_path: Path) -> None:
    text = BASE.replace("  alice: {credential: ./alicecred}\n",
                        "  alice: {credential: ./alicecred}\n  bob: {credential: ./bobcred}\n")
    text = text.replace("    count: 3\n", "    count: 3\n    principal: bob\n")
    msg = error_of(tmp_path, text, creds=("alice", "bob"))
    assert "key groups.cli.domains[0]: domain 'net' is alice's, not bob's" in msg


def test_not_yaml_and_duplicate_key(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "lab: t\nprincipals: {\n  x: [\n")
    assert msg.startswith(f"{tmp_path}/t.yaml:") and ": not YAML" in msg
    msg = error_of(tmp_path, BASE + "  srv:\n    appliance: x\n")
    assert "t.yaml:16: key groups.srv: given twice" in msg


def test_too_many_interfaces(tmp_path: Path) -> None:
    text = BASE.replace("domains: [public, net]", "domains: [external, public, net]")
    load_lab(lab_file(tmp_path, text))  # 3 of 4
    text = BASE + "  more:\n    domains: [external, public]\n    appliance: worker\n"
    assert load_lab(lab_file(tmp_path, text)).group("more").interfaces == \
        ("external", "public", "")  # and the principal's first private domain
    text = BASE.replace("domains:\n  net: {}", "domains:\n  net: {}\n  a: {}\n  b: {}")
    text = text.replace("domains: [public, net]", "domains: [external, public, net, a, b]")
    assert "groups.srv.domains" in error_of(tmp_path, text)


def test_check_on_a_missing_node(tmp_path: Path) -> None:
    text = BASE + "checks:\n  - name: x\n    on: cli[3]\n    run: \"true\"\n"
    assert "t.yaml:18: key checks[0].on: group cli has 3 nodes: no cli[3]" in \
        error_of(tmp_path, text)


def test_render_per_node(tmp_path: Path) -> None:
    lab = load_lab(lab_file(tmp_path, BASE))
    facts = template.Facts({"srv": (5,), "cli": (6, 7, 8)},
                           {"external": 0, "public": 1, "net": 9})
    cli = lab.group("cli")
    assert template.node_keys(lab, facts, cli, 2) == "kh.nfs=10.9.0.5:/export n=2"
    sym = template.node_keys(lab, template.symbolic(lab), cli, 0)
    assert sym == "kh.nfs=<srv[0].ip.net>:/export n=0"


def test_template_cannot_reach_python(tmp_path: Path) -> None:
    text = BASE.replace("n={{ index }}", "{{ ''.__class__.__mro__ }}")
    assert "groups.cli.keys" in error_of(tmp_path, text)


@pytest.mark.parametrize("name", ["webfarm", "intranet"])
def test_examples_load(tmp_path: Path, name: str) -> None:
    shutil.copy(REPO / "examples" / f"{name}.yaml", tmp_path)
    for c in ("webfarm", "corp1", "corp2"):
        (tmp_path / f"{c}cred").write_text("x\n")
    lab = load_lab(tmp_path / f"{name}.yaml")
    assert lab.name == name and lab.checks
    if name == "intranet":
        assert [g.name for g in lab.order()] == ["gw", "ds", "fs", "web", "workers"]
        assert lab.group("fs").interfaces == ("pnet", "disknet")
        assert lab.group("ds").token is not None and lab.nodes == 6


def test_schema_is_valid_json_schema() -> None:
    import jsonschema

    from kh.lab.source import schema
    jsonschema.Draft202012Validator.check_schema(schema())


def test_kh_up_refuses_a_bad_file_in_one_line(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys
    f = lab_file(tmp_path, BASE.replace("count: 3", "count: -1"))
    env = {**os.environ, "KH_LAB_DIR": str(tmp_path / "labs"),
           "KH_STATE_DIR": str(tmp_path / "nokhd")}
    r = subprocess.run([sys.executable, "-m", "kh.cli.main", "up", str(f)], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [f"kh: {f}:11: key groups.cli.count: -1 is less than the "
                                     "minimum of 1"]
    assert not (tmp_path / "labs").exists()


def test_the_docs_15_line_lab_loads(tmp_path: Path) -> None:
    doc = (REPO / "docs" / "labs.md").read_text()
    text = doc[doc.index("```yaml\n") + 8:doc.index("```", doc.index("```yaml\n") + 8)]
    assert len(text.splitlines()) <= 15
    lab = load_lab(lab_file(tmp_path, text))
    assert [g.name for g in lab.order()] == ["gw", "web"] and lab.nodes == 4
    web = lab.group("web")
    assert template.node_keys(lab, template.symbolic(lab), web, 2) == \
        "kh.httpd=1 kh.gw=<gw[0].ip.back>"


def test_schema_error_on_a_large_value_says_what_is_wrong(tmp_path: Path) -> None:
    groups = "".join(f"  g{i}:\n    appliance: worker\n    keys: {'k' * 60}\n" for i in range(33))
    msg = error_of(tmp_path, "principals:\n  alice: {credential: ./alicecred}\ngroups:\n"
                   + groups)
    assert msg.startswith(f"{tmp_path / 't.yaml'}:3: key groups: {{'g0': ")
    assert msg.endswith("... has too many properties") and len(msg) < 300


@pytest.mark.parametrize("keys,error", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     "templates take over 1 s to render"),
    ("{{ ('x' * 10**10) | length }}", "templates take over 512 MiB to render"),
    ("{{ ('x' | center(3 * 10**9)) | length }}", "templates take over 512 MiB to render")])
def test_a_template_cannot_take_the_hosts_cpu_or_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keys: str, error: str) -> None:
    """Jinja2's sandbox bounds neither time nor memory; a lab file is read (kh topo LAB,
    kh up --dry-run) before anything runs, so reading one must not hang or exhaust the host."""
    import resource
    import signal
    monkeypatch.setattr(template, "ALL_SECONDS", 1.0)
    before = resource.getrlimit(resource.RLIMIT_AS), signal.getsignal(signal.SIGALRM)
    msg = error_of(tmp_path, BASE.replace("keys: kh.nfs={{ nodes.srv[0].ip.net }}:/export "
                                          "n={{ index }}", f"keys: \"{keys}\""))
    assert msg == f"{tmp_path / 't.yaml'}:14: key groups.cli.keys: {error}" + (
        " (a loop too many?)" if "s to" in error else "")
    assert (resource.getrlimit(resource.RLIMIT_AS), signal.getsignal(signal.SIGALRM)) == before
