from pathlib import Path

import pytest

from kh.appliance import spec
from kh.errors import SpecError


@pytest.fixture
def d(tmp_path):
    (tmp_path / "init").write_text("#!/bin/sh\n")
    (tmp_path / "f").write_text("x\n")
    return tmp_path


def parse(d: Path, text: str):
    return spec.parse(text, d / "x.toml")


def test_good_spec(d):
    s = parse(d, """
name = "web"
init = "init"
programs = ["/bin/busybox"]
nss = ["files"]
devices = ["/dev/null c 1 3 0666"]
[extra]
"/etc/x" = "f"
""")
    assert s.name == "web" and s.programs == ("/bin/busybox",)
    assert s.devices[0].major == 1 and s.devices[0].mode == 0o666
    assert s.extra == (("/etc/x", (d / "f").resolve()),)


@pytest.mark.parametrize("text,msg", [
    ('name = "a"\ninit = "init"\nprogramz = []', "unknown key `programz`"),
    ('init = "init"', "`name`"),
    ('name = "Bad Name"\ninit = "init"', "`name`"),
    ('name = "a"', "`init`"),
    ('name = "a"\ninit = "nope"', "init file nope does not exist"),
    ('name = "a"\ninit = "init"\nprograms = "bin/sh"', "must be a list"),
    ('name = "a"\ninit = "init"\nprograms = ["bin/sh"]', "absolute path"),
    ('name = "a"\ninit = "init"\nfiles = ["/../etc"]', "'..'"),
    ('name = "a"\ninit = "init"\ndevices = ["/dev/null x 1 3 0666"]', "malformed"),
    ('name = "a"\ninit = "init"\n[extra]\n"/etc/x" = "missing"', "extra file missing"),
    ('name = = "a"', "not valid TOML"),
])
def test_bad_specs_name_the_problem(d, text, msg):
    with pytest.raises(SpecError, match=msg.replace("(", r"\(").replace("[", r"\[")):
        parse(d, text)


def test_find(tmp_path):
    (tmp_path / "shell.toml").write_text("")
    assert spec.find("shell", tmp_path) == tmp_path / "shell.toml"
    with pytest.raises(SpecError, match="known: shell"):
        spec.find("nope", tmp_path)


def test_shipped_specs_parse():
    specs = Path(__file__).resolve().parents[2] / "appliance-builder" / "specs"
    found = list(specs.glob("*.toml"))
    assert found
    for p in found:
        assert spec.load(p).name == p.stem


def test_include_merges_the_base_spec_and_keeps_its_own_init(tmp_path):
    from kh.appliance import spec as sp
    (tmp_path / "init-a").write_text("#!/bin/sh\n")
    (tmp_path / "init-b").write_text("#!/bin/sh\n")
    (tmp_path / "f1").write_text("one")
    (tmp_path / "f2").write_text("two")
    (tmp_path / "base.toml").write_text(
        'name = "base"\ninit = "init-a"\nprograms = ["/bin/busybox"]\n'
        'devices = ["/dev/null c 1 3 0666"]\n[extra]\n"/etc/a" = "f1"\n"/etc/b" = "f1"\n')
    s = sp.parse('name = "top"\ninit = "init-b"\ninclude = ["base"]\n'
                 'programs = ["/usr/sbin/lvm", "/bin/busybox"]\n[extra]\n"/etc/b" = "f2"\n',
                 tmp_path / "top.toml")
    assert s.init == (tmp_path / "init-b").resolve()
    assert s.programs == ("/bin/busybox", "/usr/sbin/lvm")
    assert [d.path for d in s.devices] == ["/dev/null"]
    assert dict(s.extra) == {"/etc/a": (tmp_path / "f1").resolve(),
                             "/etc/b": (tmp_path / "f2").resolve()}
    with pytest.raises(SpecError, match="included spec 'nope'"):
        sp.parse('name = "x"\ninit = "init-b"\ninclude = ["nope"]\n', tmp_path / "x.toml")
    (tmp_path / "loop.toml").write_text('name = "loop"\ninit = "init-a"\ninclude = ["loop"]\n')
    with pytest.raises(SpecError, match="cycle"):
        sp.load(tmp_path / "loop.toml")
