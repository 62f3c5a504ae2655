"""kh topo's model and renderers (issue 15, item 3): golden files for text, DOT, Mermaid and
JSON from a fixed `kh ps --json`; a principal's view; escaping; the SVG is XML; a lab file's
topology without running it. KH_UPDATE_GOLDEN=1 rewrites the golden files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

from kh.topo import render
from kh.topo.model import Interface, TopoAllocation, TopoDomain, Topology, TopoNode, from_ps

GOLDEN = Path(__file__).parent / "golden" / "topo"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def operator_view() -> Topology:
    return from_ps(json.loads((GOLDEN / "ps.json").read_text()), ssh_port=7422)


def alice_view() -> Topology:
    """What POST /v1/ps answers alice (kh.service.views.principal's shape)."""
    data = json.loads((GOLDEN / "ps.json").read_text())
    data["principal"] = "alice"
    data["allocations"] = [a for a in data["allocations"] if a["principal"] == "alice"]
    data["nodes"] = [n for n in data["nodes"] if n["allocation"] == 3]
    data["domains"] = [d for d in data["domains"] if d["owner"] in (None, "alice")]
    data["publishes"] = [p for p in data["publishes"] if p["principal"] == "alice"]
    return from_ps(data, ssh_port=7422)


def check_golden(name: str, got: str) -> None:
    path = GOLDEN / name
    if os.environ.get("KH_UPDATE_GOLDEN"):
        path.write_text(got)
    assert got == path.read_text(), f"{name} differs (KH_UPDATE_GOLDEN=1 rewrites it)"


@pytest.mark.parametrize(("fmt", "name"), [("text", "operator.txt"), ("dot", "operator.dot"),
                                           ("mermaid", "operator.mmd"),
                                           ("json", "operator.json")])
def test_operator_view_matches_golden(fmt, name):
    check_golden(name, render.render(operator_view(), fmt))


def test_principal_view_matches_golden():
    check_golden("alice.txt", render.text(alice_view()))


def test_model_has_interfaces_with_mac_address_and_domain():
    t = operator_view()
    assert [n.number for n in t.nodes] == [5, 6, 7]  # the free node 8 is counted, not drawn
    assert t.free_nodes == 1
    n7 = t.node("n7")
    assert n7.interfaces == (Interface(0, "D1", "52:54:00:00:07:00", "10.1.0.7/16"),
                             Interface(2, "D4", "52:54:00:00:07:02", "10.4.0.7/16"))
    assert t.domain("D3").owner == "alice" and t.domain("D0").gateway == "10.0.255.254"
    assert t.allocations[0].channel == "con3@127.0.0.1 -p 7422"
    assert t.principals == ("alice", "bob")


def test_principal_view_names_nothing_of_another():
    t = alice_view()
    assert t.view == "alice" and t.principals == ("alice",)
    for fmt in render.FORMATS:
        if fmt == "svg":
            continue
        out = render.render(t, fmt)
        assert "bob" not in out and "node 7" not in out and "D4" not in out, fmt


def test_text_fits_100_columns():
    t = operator_view()
    long = TopoNode("x", "node " + "y" * 200, 9, "allocated", "alice", "A3",
                    (Interface(0, "D0", None, None),))
    wide = Topology(t.source, t.view, t.principals,
                    (*t.allocations[:1], TopoAllocation("A3", "allocation 3", "alice",
                                                        "con3@127.0.0.1", ("x",))),
                    (*t.nodes, long), t.domains)
    for out in (render.text(t), render.text(wide)):
        assert max(len(line) for line in out.splitlines()) <= render.WIDTH


HOSTILE = 'a"b\\c<d>&e\n]|#;x'


def hostile() -> Topology:
    d = TopoDomain("D:" + HOSTILE, HOSTILE, None, "private", "alice")
    n = TopoNode(HOSTILE, HOSTILE, None, HOSTILE, "alice", "G:x",
                 (Interface(0, d.key, None, None),))
    return Topology("lab x", "operator", ("alice",),
                    (TopoAllocation("G:x", HOSTILE, "alice", "con?@127.0.0.1", (n.key,)),),
                    (n,), (d,))


def test_dot_escapes_names():
    out = render.dot(hostile())
    assert '"a\\"b\\\\c<d>&e\\n]|#;x"' in out  # a quoted string, as DOT reads it
    assert "a&quot;b\\c&lt;d&gt;&amp;e" in out  # inside the HTML-like node label
    assert "<d>" not in out.split("label=<", 1)[1].split("</TABLE>")[0]


def test_mermaid_escapes_names():
    out = render.mermaid(hostile())
    assert '#quot;' in out and "#lt;d#gt;" in out and '"a"b' not in out
    ids = [line.split("[", 1)[0].split("(", 1)[0].strip() for line in out.splitlines()[1:]
           if "[" in line and "---" not in line and "-->" not in line]
    assert all(i.replace("_", "").replace("subgraph", "").strip().isalnum() for i in ids), ids


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz's dot is not installed "
                    "(tools/setup-apt installs it)")
def test_svg_is_valid_xml():
    for t in (operator_view(), hostile()):
        root = ElementTree.fromstring(render.svg(t))
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
        texts = " ".join(el.text or "" for el in root.iter("{http://www.w3.org/2000/svg}text"))
        assert "node 5" in texts or HOSTILE.split("\n")[0] in texts


def test_lab_topology_without_running_it(tmp_path):
    pytest.importorskip("kh.lab.model")
    from kh.lab.model import load_lab
    from kh.topo.lab import from_lab
    lab = tmp_path / "intranet.yaml"
    shutil.copy(EXAMPLES / "intranet.yaml", lab)
    for c in ("corp1cred", "corp2cred"):
        (tmp_path / c).write_text("secret-of-" + c + "\n")
        (tmp_path / c).chmod(0o600)
    model = load_lab(lab)
    t = from_lab(model)
    assert t.source == "lab intranet.yaml"
    labels = [n.label for n in t.nodes]
    assert labels == [f"{g.name}[{i}]" for g in model.groups for i in range(g.count)]
    assert {"gw[0]", "workers[1]"} <= set(labels)
    pnet = t.domain("D:pnet")
    assert pnet.owner == "corp1" and pnet.netid is None
    assert [i.domain for i in t.node("gw.0").interfaces] == ["D0", "D1", "D:pnet"]
    assert all(i.mac is None and i.ip is None for n in t.nodes for i in n.interfaces)
    out = render.text(t)
    assert "group workers (2 nodes, after fs gw)" in out and "pnet (corp1)" in out


def test_kh_topo_reads_a_lab_file(tmp_path):
    pytest.importorskip("kh.lab.model")
    lab = tmp_path / "intranet.yaml"
    shutil.copy(EXAMPLES / "intranet.yaml", lab)
    for c in ("corp1cred", "corp2cred"):
        (tmp_path / c).write_text("x" * 20 + "\n")
        (tmp_path / c).chmod(0o600)
    r = subprocess.run([sys.executable, "-m", "kh.cli.main", "topo", "--mermaid", str(lab)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("flowchart LR\n") and "k_gw_2e_0" in r.stdout


def test_kh_topo_of_a_lab_file_needs_no_credential_file(tmp_path):
    """A picture of a plan asks nothing of khd: the credential files need not exist yet
    (kh up still refuses without them)."""
    lab = tmp_path / "intranet.yaml"
    shutil.copy(EXAMPLES / "intranet.yaml", lab)
    r = subprocess.run([sys.executable, "-m", "kh.cli.main", "topo", str(lab)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("kh topology: lab intranet.yaml, as planned, not running\n")
    r = subprocess.run([sys.executable, "-m", "kh.cli.main", "up", "--dry-run", str(lab)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "key principals.corp1.credential: credential file " \
        "'./corp1cred' is missing" in r.stderr


def test_kh_topo_takes_one_format():
    r = subprocess.run([sys.executable, "-m", "kh.cli.main", "topo", "--dot", "--json",
                        "any.yaml"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr == "kh: one format at a time, not dot and json\n"
