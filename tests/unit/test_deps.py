"""kh's host dependencies: one table (tools/packages) that set-up installs and errors name."""

import shutil
import subprocess

import pytest

from kh import deps, proc
from kh.errors import ProcessError


def test_table_parses_with_programs_and_reasons():
    rows = deps.packages()
    names = [r.name for r in rows]
    assert len(names) == len(set(names)), "a package listed twice"
    assert {"qemu-system-ppc", "nftables", "util-linux", "openssh-client"} <= set(names)
    assert all(r.needed_by for r in rows), "every package says what needs it"
    assert deps.provider("qemu-system-ppc") == "qemu-system-ppc"
    assert deps.provider("/usr/bin/nsenter") == "util-linux"
    assert deps.provider("mkimage") == "u-boot-tools"
    assert deps.provider("no-such-program") is None


def test_setup_apt_installs_exactly_the_table():
    """tools/setup-apt takes its list from the table, nothing beside it."""
    script = deps.table_file().parent / "setup-apt"
    out = subprocess.run(["bash", "-c", f"source <(sed -n '/^mapfile/p' {script}); "
                          'printf "%s\\n" "${PACKAGES[@]}"'],
                         capture_output=True, text=True, check=True, cwd=script.parent)
    assert out.stdout.split() == [r.name for r in deps.packages()]


@pytest.mark.skipif(not shutil.which("dpkg-query"), reason="not a Debian host")
def test_every_listed_program_is_there_after_setup():
    """What the table promises is true on this machine (make test runs tools/setup-apt first):
    each package is installed and each program it lists is on PATH."""
    missing = []
    for r in deps.packages():
        st = subprocess.run(["dpkg-query", "-W", "-f=${Status}", r.name],
                            capture_output=True, text=True)
        if "install ok installed" not in st.stdout:
            missing.append(f"package {r.name}")
        missing += [f"{p} ({r.name})" for p in r.programs if shutil.which(p) is None]
    assert not missing, f"listed in tools/packages but not on this machine: {missing}"


def test_a_missing_program_names_its_package(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH: qemu-system-ppc is missing
    with pytest.raises(ProcessError) as e:
        proc.run(["qemu-system-ppc", "--version"])
    assert "cannot start qemu-system-ppc" in str(e.value)
    assert "Debian package qemu-system-ppc" in str(e.value)
    with pytest.raises(ProcessError, match="make setup"), \
            proc.spawn([str(tmp_path / "kh-no-such-tool")]):
        pass
