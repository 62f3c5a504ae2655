"""Image recipes: one small TOML file per thing to build, and the key that names its build.

The key is a hash of everything the build reads: the recipe, the repo files it names (config
fragments, patches), the versions of the Debian packages it takes, the builder's own code and
its dependencies' keys. Same key, same image: the cache never rebuilds an unchanged recipe.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kh.errors import SpecError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# builder name → (required keys, optional keys). Paths in values are relative to the repo.
BUILDERS: dict[str, tuple[set[str], set[str]]] = {
    "u-boot": ({"source", "defconfig", "fragment"}, {"patches", "artifact"}),
    "linux": ({"package", "tarball", "base", "fragment"}, {"target", "artifact"}),
    "busybox": ({"source", "base", "fragment"}, set()),
    "root": ({"runtime"}, {"packages", "debs", "overlay"}),
    "package": ({"source"}, {"style", "configure", "make", "install", "pre", "post", "env",
                             "keep", "drop", "subdir", "patches", "suite"}),
    "qemu": ({"source", "fragment", "configure"}, {"patches", "artifact"}),
}
COMMON = {"name", "builder", "description", "depends"}


@dataclass(frozen=True)
class Recipe:
    name: str
    builder: str
    path: Path
    text: str
    params: dict[str, Any] = field(hash=False)
    depends: tuple[str, ...] = ()

    def repo_file(self, key: str, repo: Path) -> Path:
        p = repo / str(self.params[key])
        if not p.exists():
            raise SpecError(f"recipe {self.name}: {key} {self.params[key]} does not exist")
        return p

    def input_files(self, repo: Path) -> list[Path]:
        """Repo files whose contents are part of the key."""
        files: list[Path] = []
        for key in ("fragment", "patches", "overlay"):
            if key in self.params:
                p = self.repo_file(key, repo)
                files.extend(sorted(q for q in p.rglob("*") if q.is_file() or q.is_symlink())
                             if p.is_dir() else [p])
        return files


def parse(text: str, path: Path) -> Recipe:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: not valid TOML: {e}") from None
    builder = raw.get("builder")
    if builder not in BUILDERS:
        raise SpecError(f"{path}: unknown builder {builder!r}",
                        f"known: {', '.join(sorted(BUILDERS))}")
    required, optional = BUILDERS[builder]
    missing = sorted(required - set(raw))
    if missing:
        raise SpecError(f"{path}: missing key `{missing[0]}` for builder {builder}")
    unknown = sorted(set(raw) - required - optional - COMMON)
    if unknown:
        raise SpecError(f"{path}: unknown key `{unknown[0]}` for builder {builder}")
    name = raw.get("name", path.stem)
    depends = raw.get("depends", [])
    if builder == "root":
        depends = list(depends) + [p for p in raw.get("packages", []) if p not in depends]
    if not isinstance(depends, list) or not all(isinstance(d, str) for d in depends):
        raise SpecError(f"{path}: `depends` must be a list of recipe names")
    params = {k: v for k, v in raw.items() if k not in COMMON}
    return Recipe(name=name, builder=builder, path=path, text=text, params=params,
                  depends=tuple(depends))


def load_all(recipes_dir: Path) -> dict[str, Recipe]:
    recipes: dict[str, Recipe] = {}
    for p in sorted(recipes_dir.glob("*.toml")):
        r = parse(p.read_text(encoding="utf-8"), p)
        if r.name in recipes:
            raise SpecError(f"two recipes named {r.name}")
        recipes[r.name] = r
    for r in recipes.values():
        for d in r.depends:
            if d not in recipes:
                raise SpecError(f"recipe {r.name} depends on unknown recipe {d}")
    return recipes


def order(recipes: dict[str, Recipe], wanted: list[str] | None = None) -> list[Recipe]:
    """Dependencies first; a cycle is an error."""
    out: list[Recipe] = []
    state: dict[str, int] = {}

    def visit(n: str, chain: tuple[str, ...]) -> None:
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            raise SpecError(f"recipe dependency cycle: {' -> '.join(chain + (n,))}")
        if n not in recipes:
            raise SpecError(f"no image recipe named {n!r}",
                            f"known: {', '.join(sorted(recipes))}")
        state[n] = 1
        for d in recipes[n].depends:
            visit(d, chain + (n,))
        state[n] = 2
        out.append(recipes[n])

    for n in wanted or sorted(recipes):
        visit(n, ())
    return out


def key(recipe: Recipe, repo: Path, facts: list[str], dep_keys: list[str],
        builder_code: bytes) -> str:
    """The content address of a recipe's build."""
    h = hashlib.sha256()

    def part(label: str, data: bytes) -> None:
        h.update(label.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)

    part("recipe", recipe.text.encode())
    for f in recipe.input_files(repo):
        if f.is_symlink():  # an overlay's link: its text, never what it points to on the host
            part(f"link:{f.relative_to(repo)}", os.readlink(f).encode())
        else:
            mode = "x" if os.access(f, os.X_OK) else "-"
            part(f"file:{f.relative_to(repo)}:{mode}", f.read_bytes())
    for fact in facts:
        part("fact", fact.encode())
    for dk in dep_keys:
        part("dep", dk.encode())
    part("builder", builder_code)
    return h.hexdigest()
