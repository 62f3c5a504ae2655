"""The top-level Vagrantfile (issue 16, item 5): `vagrant validate` accepts it, offline, with a
HOME of the test's own (Debian's vagrant package, tools/packages; skipped without it), and it
holds what the README promises: a Debian 12 box, the libvirt provider, the repository synced in,
`make setup` and the README's commands as provisioners."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

VAGRANTFILE = Path(__file__).resolve().parents[2] / "Vagrantfile"
GEMS = Path("/usr/share/rubygems-integration/all/specifications")  # Debian's vagrant plugins
needs_vagrant = pytest.mark.skipif(
    shutil.which("vagrant") is None or not any(GEMS.glob("vagrant-libvirt-*.gemspec")),
    reason="vagrant or vagrant-libvirt is not installed (make setup installs them)")


def validate(text: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    """`vagrant validate` on ``text`` as a Vagrantfile in a directory of its own, with a HOME
    of its own and no network use (no version checks, no plugin or box downloads)."""
    project = tmp / "project"
    project.mkdir()
    (project / "Vagrantfile").write_text(text)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp),
           "VAGRANT_HOME": str(tmp / "vagrant.d"), "VAGRANT_CHECKPOINT_DISABLE": "1",
           "VAGRANT_CWD": str(project), "VAGRANT_DEFAULT_PROVIDER": "libvirt",
           "LANG": "C.UTF-8"}
    return subprocess.run(["vagrant", "validate"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=120)


@needs_vagrant
def test_vagrant_validates_the_vagrantfile(tmp_path: Path) -> None:
    r = validate(VAGRANTFILE.read_text(), tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "validated successfully" in r.stdout


@needs_vagrant
def test_vagrant_validate_refuses_a_broken_one(tmp_path: Path) -> None:
    """The check can fail, and it reads the libvirt provider's block (vagrant-libvirt)."""
    broken = VAGRANTFILE.read_text().replace("lv.cpus = ", "lv.no_such_option = 1\n    lv.cpus = ")
    assert broken != VAGRANTFILE.read_text()
    r = validate(broken, tmp_path)
    assert r.returncode != 0 and "no_such_option" in r.stdout + r.stderr


def test_vagrantfile_is_debian_12_on_libvirt_running_the_readmes_commands() -> None:
    text = VAGRANTFILE.read_text()
    assert re.search(r'config\.vm\.box = "debian/bookworm64"', text)
    assert "config.vm.provider :libvirt" in text
    assert re.search(r'synced_folder "\.", "/home/vagrant/kh", type: "rsync"', text)
    provisioners = re.findall(r'config\.vm\.provision "(\w+)".*?SHELL\n(.*?)\n\s*SHELL', text,
                              re.S)
    commands = {name: [ln.strip() for ln in body.splitlines()] for name, body in provisioners}
    assert "make setup" in commands["setup"]
    assert "make demo" in commands["demo"] and "make test" in commands["test"]
    readme = (VAGRANTFILE.parent / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme and "vagrant up" in readme
