import pytest

from kh.errors import ImageError
from kh.images import kconfig


def test_parse_and_merge(tmp_path):
    frag = kconfig.parse("# comment\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=\"x\"\n")
    assert frag == {"CONFIG_A": "y", "CONFIG_B": None, "CONFIG_C": '"x"'}
    cfg = tmp_path / ".config"
    cfg.write_text("# CONFIG_A is not set\nCONFIG_B=y\nCONFIG_D=m\n")
    kconfig.merge(cfg, frag)
    assert cfg.read_text() == ("CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_D=m\n"
                               "CONFIG_C=\"x\"\n")


def test_missing_reports_dropped_options(tmp_path):
    frag = {"CONFIG_NFSD": "y", "CONFIG_X": None, "CONFIG_Y": "y"}
    text = "# CONFIG_NFSD is not set\nCONFIG_X=y\nCONFIG_Y=y\n"
    assert kconfig.missing(text, frag) == ["CONFIG_NFSD=y (got not set)", "CONFIG_X off (got y)"]
    cfg = tmp_path / ".config"
    cfg.write_text(text)
    with pytest.raises(ImageError, match="2 fragment option"):
        kconfig.check(cfg, frag, "recipe linux")


def test_garbage_line_refused():
    with pytest.raises(ImageError, match="line 2"):
        kconfig.parse("CONFIG_A=y\nthis is wrong\n")


@pytest.mark.parametrize("name", ["linux.config", "u-boot.config", "busybox.config"])
def test_shipped_fragments_parse(name):
    from pathlib import Path
    p = Path(__file__).resolve().parents[2] / "buildroot-configs" / name
    assert kconfig.parse(p.read_text())
