from pathlib import Path

import pytest

from kh import proc
from kh.errors import ImageError, ProcessError, SpecError
from kh.images import apt, packages, recipe

REPO = Path(__file__).resolve().parents[2]


def pkg(text: str, tmp: Path) -> recipe.Recipe:
    return recipe.parse('builder = "package"\nsource = "foo"\n' + text, tmp / "foo.toml")


def test_bad_package_recipes_are_refused_by_key(tmp_path):
    with pytest.raises(SpecError, match="unknown style 'cmake'"):
        packages.validate(pkg('style = "cmake"\n', tmp_path))
    with pytest.raises(SpecError, match="`pre` must be a list of argument lists"):
        packages.validate(pkg('pre = ["autoreconf -fi"]\n', tmp_path))
    with pytest.raises(SpecError, match="`configure` must be a list of strings"):
        packages.validate(pkg('configure = "--disable-nls"\n', tmp_path))
    with pytest.raises(SpecError, match="unknown key `flavour`"):
        pkg('flavour = "x"\n', tmp_path)


def test_every_shipped_package_recipe_is_valid():
    rs = recipe.load_all(REPO / "images" / "recipes")
    ps = [r for r in rs.values() if r.builder == "package"]
    assert {"apache2", "lvm2", "nfs-utils", "vblade", "iptables", "dropbear"} <= {
        r.name for r in ps}
    for r in ps:
        packages.validate(r)
        assert r.text.startswith("#"), f"{r.name}: say why it is built this way"
    root = rs["root"]
    assert {r.name for r in ps} <= set(root.depends), "the root takes every package"


def test_install_splits_into_sysroot_and_a_stage_without_dev_files(tmp_path):
    inst = tmp_path / "install"
    for rel, data in {"usr/include/foo.h": "h", "usr/lib/libfoo.so.1": "lib",
                      "usr/lib/libfoo.la": "la", "usr/lib/libfoo.a": "a",
                      "usr/lib/pkgconfig/foo.pc": "pc", "usr/share/man/man8/foo.8": "man",
                      "usr/sbin/foo": "#!/bin/sh\n", "etc/foo.conf": "conf"}.items():
        (inst / rel).parent.mkdir(parents=True, exist_ok=True)
        (inst / rel).write_text(data)
    (inst / "usr/lib/libfoo.so").symlink_to("libfoo.so.1")
    dest = tmp_path / "dest"
    packages._finish(pkg('drop = ["etc/*"]\n', tmp_path), inst, dest)
    staged = sorted(str(p.relative_to(dest / "stage")) for p in (dest / "stage").rglob("*")
                    if not p.is_dir())
    assert staged == ["usr/lib/libfoo.so", "usr/lib/libfoo.so.1", "usr/sbin/foo"]
    assert (dest / "sysroot/usr/include/foo.h").exists()
    assert (dest / "sysroot/usr/lib/pkgconfig/foo.pc").exists()
    assert not (dest / "sysroot/usr/lib/libfoo.la").exists()  # libtool archives mislead


def test_keep_selects_only_what_is_named(tmp_path):
    inst = tmp_path / "install"
    (inst / "usr/bin").mkdir(parents=True)
    (inst / "usr/bin/a").write_text("a")
    (inst / "usr/bin/b").write_text("b")
    packages._finish(pkg('keep = ["usr/bin/a"]\n', tmp_path), inst, tmp_path / "d")
    assert [p.name for p in (tmp_path / "d/stage/usr/bin").iterdir()] == ["a"]


def test_an_empty_install_is_an_error(tmp_path):
    (tmp_path / "install").mkdir()
    with pytest.raises(ImageError, match="foo installed nothing"):
        packages._finish(pkg("", tmp_path), tmp_path / "install", tmp_path / "d")


def test_cross_env_points_the_build_at_the_dependencies(tmp_path):
    env = packages.cross_env(tmp_path, {"ac_cv_x": "yes"})
    assert env["CC"] == "powerpc-linux-gnu-gcc"
    assert f"-I{tmp_path}/usr/include" == env["CPPFLAGS"]
    assert f"-L{tmp_path}/usr/lib" in env["LDFLAGS"] and "max-page-size=0x1000" in env["LDFLAGS"]
    assert env["PKG_CONFIG_SYSROOT_DIR"] == str(tmp_path) and env["ac_cv_x"] == "yes"
    assert packages._subst("{sysroot}/x -j{jobs}", {"sysroot": "/s", "jobs": "2"}) == "/s/x -j2"


def test_a_missing_source_package_is_named(monkeypatch):
    def fail(argv, **kw):  # type: ignore[no-untyped-def]
        raise ProcessError("apt-get failed", output_tail="E: Unable to find a source package")
    monkeypatch.setattr(proc, "run", fail)
    with pytest.raises(ImageError, match="Debian source package nosuchpkg is not available"):
        apt.source_version("nosuchpkg", None)


def test_an_unknown_suite_is_refused(tmp_path):
    with pytest.raises(ImageError, match="unknown Debian suite 'sid'"):
        apt.config(tmp_path, "sid")


def test_prune_keeps_current_builds_and_running_ones(tmp_path):
    from kh.images import build
    for d in ("images/linux-aaaa", "images/linux-bbbb", "images/.linux-tmp123",
              "appliances/shell-1111", "appliances/shell-2222", "logs"):
        (tmp_path / d).mkdir(parents=True)
    for f in ("logs/linux-aaaa.log", "logs/linux-bbbb.log", "logs/kh-boot-console.log"):
        (tmp_path / f).write_text("")
    gone = build.stale(tmp_path, {"linux-aaaa"}, {"shell-1111"})
    assert [str(p.relative_to(tmp_path)) for p in gone] == [
        "images/linux-bbbb", "appliances/shell-2222", "logs/linux-bbbb.log"]


def test_runstatedir_only_for_configure_scripts_that_know_it():
    # tar's 2.69 script names the variable but has no such option.
    old = packages.autotools_args("# Autoconf 2.69\nrunstatedir='${localstatedir}/run'\n")
    assert not any(a.startswith("--runstatedir") for a in old)
    new = packages.autotools_args("  --runstatedir=DIR       modifiable per-process data\n")
    assert "--runstatedir=/run" in new and len(new) == len(old) + 1
