"""Where kh keeps things: the repo's data directories, the image cache, runtime sockets."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path


def _repo_root() -> Path:
    env = os.environ.get("KH_REPO")
    if env:
        return Path(env).resolve()
    return Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Paths:
    """Every directory kh reads or writes, resolved once."""

    repo: Path
    cache: Path
    out: Path
    runtime: Path

    @property
    def recipes(self) -> Path:
        return self.repo / "images" / "recipes"

    @property
    def specs(self) -> Path:
        return self.repo / "appliance-builder" / "specs"


def paths() -> Paths:
    repo = _repo_root()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    cache = Path(os.environ.get("KH_CACHE", str(Path(xdg) / "kh")))
    out = Path(os.environ.get("KH_IMAGES_OUT", str(repo / "images" / "out")))
    runtime = Path(os.environ.get("KH_RUNTIME") or os.environ.get("XDG_RUNTIME_DIR")
                   or tempfile.gettempdir())
    return Paths(repo=repo, cache=cache, out=out, runtime=runtime)
