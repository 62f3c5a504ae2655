from pathlib import Path

import pytest

from kh.errors import SpecError
from kh.images import recipe

REPO = Path(__file__).resolve().parents[2]


def write(d: Path, name: str, text: str) -> None:
    (d / f"{name}.toml").write_text(text)


def test_shipped_recipes_load_and_order():
    rs = recipe.load_all(REPO / "images" / "recipes")
    names = [r.name for r in recipe.order(rs)]
    assert names.index("busybox") < names.index("root")
    assert set(names) >= {"u-boot", "linux", "busybox", "root"}


def test_key_changes_with_fragment(tmp_path):
    (tmp_path / "frag").write_text("CONFIG_A=y\n")
    r = recipe.parse('builder = "busybox"\nsource = "busybox"\nbase = "b"\nfragment = "frag"\n',
                     tmp_path / "bb.toml")
    k1 = recipe.key(r, tmp_path, ["v1"], [], b"code")
    assert k1 == recipe.key(r, tmp_path, ["v1"], [], b"code")
    (tmp_path / "frag").write_text("CONFIG_A=n\n")
    k2 = recipe.key(r, tmp_path, ["v1"], [], b"code")
    assert k1 != k2
    assert k2 != recipe.key(r, tmp_path, ["v2"], [], b"code")
    assert k2 != recipe.key(r, tmp_path, ["v1"], ["dep"], b"code")
    assert k2 != recipe.key(r, tmp_path, ["v1"], [], b"code2")


@pytest.mark.parametrize("text,msg", [
    ('builder = "nope"', "unknown builder"),
    ('builder = "busybox"\nsource = "b"\nbase = "x"', "missing key `fragment`"),
    ('builder = "root"\nruntime = []\nflavour = 1', "unknown key `flavour`"),
])
def test_bad_recipes(tmp_path, text, msg):
    with pytest.raises(SpecError, match=msg):
        recipe.parse(text, tmp_path / "r.toml")


def test_cycles_and_unknown_deps(tmp_path):
    write(tmp_path, "a", 'builder = "root"\nruntime = []\npackages = ["b"]\n')
    write(tmp_path, "b", 'builder = "root"\nruntime = []\npackages = ["a"]\n')
    rs = recipe.load_all(tmp_path)
    with pytest.raises(SpecError, match="cycle"):
        recipe.order(rs)
    write(tmp_path, "b", 'builder = "root"\nruntime = []\npackages = ["zzz"]\n')
    with pytest.raises(SpecError, match="unknown recipe zzz"):
        recipe.load_all(tmp_path)
