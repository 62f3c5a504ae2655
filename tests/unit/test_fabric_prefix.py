"""`kh fabric` acts on the installation KH_PREFIX names, as every other kh command does
(TRIAL16, issue 16): with KH_PREFIX=tq set (docs/libvirt.md's one-machine trial), `kh fabric
show`, `underlay` and `libvirtd` used prefix kh's fabric, another installation's (or none)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from kh.cli.main import main


@pytest.mark.parametrize("args", [["fabric", "libvirtd"], ["fabric", "wire", "7", "3"]])
def test_kh_fabric_takes_its_prefix_from_kh_prefix(args):
    got = CliRunner().invoke(main, args, env={"KH_PREFIX": "zq9"})
    assert got.exit_code != 0
    assert "zq9-fabric" in got.output and "kh-fabric" not in got.output, got.output
    got = CliRunner().invoke(main, [*args[:2], "--prefix", "zq8", *args[2:]],
                             env={"KH_PREFIX": "zq9"})
    assert "zq8-fabric" in got.output, got.output  # --prefix still wins
