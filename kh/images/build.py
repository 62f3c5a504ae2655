"""Build recipes into the content-addressed cache and publish them to images/out.

A finished build lives in ``<cache>/images/<name>-<key>/``; it is built in a temporary
directory beside it and renamed into place whole, so an interrupted build leaves nothing that
looks finished. images/out only ever receives complete files (written, then renamed).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import inspect
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kh.appliance import builder as appliance_builder
from kh.appliance import spec as appliance_spec
from kh.errors import ImageError
from kh.images import apt, builders, packages, qemubuild, recipe, rootfs
from kh.settings import Paths

log = logging.getLogger("kh.images")
ROOT_RECIPE = "root"


@dataclass(frozen=True)
class Built:
    name: str
    key: str
    dir: Path
    cached: bool
    seconds: float  # of the build that made it (0 when never measured)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """One image build at a time per cache (two `make` runs must not race)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


BUILD = {**builders.BUILD, "package": packages.build_package, "root": rootfs.build_root,
         "qemu": qemubuild.build_qemu}


def _facts(r: recipe.Recipe, paths: Paths) -> list[str]:
    if r.builder == "package":
        return packages.facts(r, paths.cache)
    if r.builder == "qemu":
        return qemubuild.facts(r)
    return rootfs.facts(r) if r.builder == "root" else builders.facts(r)


def _apt_stamp(paths: Paths) -> str:
    """Changes whenever what apt or dpkg would answer can have changed."""
    parts = []
    for p in [Path("/var/lib/apt/lists"), Path("/var/lib/dpkg/status"),
              *sorted((paths.cache / "apt").glob("*/lists"))]:
        try:
            st = p.stat()
            parts.append(f"{p}:{st.st_mtime_ns}:{st.st_size}")
        except OSError:
            parts.append(f"{p}:-")
    return "|".join(parts)


class Facts:
    """The Debian versions each recipe takes, asked of apt/dpkg only when their state changed
    (one `apt-get source --print-uris` per recipe is most of a cached no-op build)."""

    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self.file = paths.cache / "facts.json"
        self.stamp = _apt_stamp(paths)
        try:
            data = json.loads(self.file.read_text())
        except (OSError, ValueError):
            data = {}
        self.known: dict[str, list[str]] = (data.get("facts", {})
                                            if data.get("stamp") == self.stamp else {})

    def of(self, r: recipe.Recipe) -> list[str]:
        k = hashlib.sha256(r.text.encode()).hexdigest()
        if k not in self.known:
            self.known[k] = _facts(r, self.paths)
            self.stamp = _apt_stamp(self.paths)  # a first use of a suite fetches its lists
        return self.known[k]

    def save(self) -> None:
        _write_json(self.file, {"stamp": self.stamp, "facts": self.known})


def _builder_code(r: recipe.Recipe) -> bytes:
    """The code a recipe's build runs, part of its key (package builds: packages.py too)."""
    code = inspect.getsource(builders).encode() + inspect.getsource(apt).encode()
    if r.builder == "package":
        code += inspect.getsource(packages).encode()
    if r.builder == "root":
        code += inspect.getsource(rootfs).encode()
    if r.builder == "qemu":
        code += inspect.getsource(qemubuild).encode()
    return code


def _closure(r: recipe.Recipe, recipes: dict[str, recipe.Recipe]) -> list[str]:
    """Every recipe ``r`` depends on, directly or not."""
    seen: list[str] = []
    todo = list(r.depends)
    while todo:
        d = todo.pop()
        if d not in seen:
            seen.append(d)
            todo.extend(recipes[d].depends)
    return sorted(seen)


def _stats(paths: Paths) -> dict[str, int]:
    try:
        return dict(json.loads((paths.cache / "stats.json").read_text()))
    except (OSError, ValueError):
        return {}


def build_recipes(paths: Paths, names: list[str] | None = None, *, force: bool = False,
                  quiet: bool = False) -> list[Built]:
    recipes = recipe.load_all(paths.recipes)
    todo = recipe.order(recipes, names)
    keys: dict[str, str] = {}
    done: dict[str, Built] = {}
    images = paths.cache / "images"
    images.mkdir(parents=True, exist_ok=True)
    stats = _stats(paths)
    facts = Facts(paths)
    with locked(paths.cache / "images.lock"):
        for r in todo:
            k = recipe.key(r, paths.repo, facts.of(r), [keys[d] for d in r.depends],
                           _builder_code(r))
            keys[r.name] = k
            final = images / f"{r.name}-{k[:16]}"
            meta_file = final / "meta.json"
            if meta_file.exists() and not force:
                meta = json.loads(meta_file.read_text())
                done[r.name] = Built(r.name, k, final, True, float(meta.get("seconds", 0)))
                if not quiet:
                    print(f"{r.name:<10} cached  {k[:16]}", file=sys.stderr)
                continue
            done[r.name] = _build_one(r, k, final, paths, stats,
                                      {d: done[d].dir for d in _closure(r, recipes)}, quiet)
    facts.save()
    (paths.cache / "stats.json").write_text(json.dumps(stats, indent=1, sort_keys=True))
    return [done[r.name] for r in todo]


def _build_one(r: recipe.Recipe, k: str, final: Path, paths: Paths, stats: dict[str, int],
               deps: dict[str, Path], quiet: bool) -> Built:
    logs = paths.cache / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_file = logs / f"{r.name}-{k[:16]}.log"
    log_file.write_text("")
    started = time.monotonic()
    from kh.progress import Progress
    ctx = builders.Context(
        repo=paths.repo, sources=paths.cache / "sources", jobs=os.cpu_count() or 2,
        log=log_file, deps=deps, line_estimate=stats,
        progress=lambda label, total: Progress(label, total, enabled=not quiet))
    tmp_root = Path(tempfile.mkdtemp(prefix=f".{r.name}-", dir=final.parent))
    try:
        work = tmp_root / "work"
        dest = tmp_root / "out"
        work.mkdir()
        dest.mkdir()
        if not quiet:
            print(f"{r.name:<10} building {k[:16]} (log: {log_file})", file=sys.stderr)
        line_count = _line_count_of(log_file)
        BUILD[r.builder](r, ctx, work, dest)
        seconds = time.monotonic() - started
        stats[r.name] = max(_line_count_of(log_file) - line_count, 1)
        meta = {"name": r.name, "key": k, "seconds": round(seconds, 1),
                "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (dest / "meta.json").write_text(json.dumps(meta, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.rename(dest, final)
        if not quiet:
            print(f"{r.name:<10} built in {seconds:.0f} s", file=sys.stderr)
        return Built(r.name, k, final, False, seconds)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)


def _line_count_of(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _publish_file(src: Path, dest: Path) -> None:
    """Copy ``src`` to ``dest`` (contents and mode: kh's QEMU is a program) unless the same."""
    if (dest.exists() and dest.stat().st_size == src.stat().st_size
            and dest.stat().st_mode == src.stat().st_mode and sha256(dest) == sha256(src)):
        return
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    try:
        shutil.copyfile(src, tmp)
        shutil.copymode(src, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _publish_link(target: Path, dest: Path) -> None:
    if dest.is_symlink() and os.readlink(dest) == str(target):
        return
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, dest)


def build_appliances(paths: Paths, root: Built, names: list[str] | None = None,
                     quiet: bool = False) -> list[tuple[appliance_builder.Result, bool]]:
    """Build (or take from the cache) every appliance spec against the built root."""
    stage = root.dir / "stage"
    root_size = appliance_builder.tree_size(stage)
    code = inspect.getsource(appliance_builder).encode()
    results = []
    spec_paths = ([appliance_spec.find(n, paths.specs) for n in names] if names
                  else sorted(paths.specs.glob("*.toml")))
    cache = paths.cache / "appliances"
    for sp in spec_paths:
        spec = appliance_spec.load(sp)
        # The resolved spec (includes merged) and every file it takes from the repo.
        h = hashlib.sha256(root.key.encode() + code
                           + repr(spec).replace(str(paths.repo), "").encode()
                           + spec.init.read_bytes())
        for _dest, f in spec.extra:
            h.update(f.read_bytes())
        k = h.hexdigest()[:16]
        cdir = cache / f"{spec.name}-{k}"
        cached = (cdir / f"{spec.name}.cpio.gz.uimg").exists()
        if not cached:
            res = appliance_builder.build(spec, stage, cdir, root_size=root_size)
        else:
            img = cdir / f"{spec.name}.cpio.gz.uimg"
            res = appliance_builder.Result(spec.name, img, img.stat().st_size, 0, root_size, 0)
        results.append((res, cached))
        if not quiet:
            print(f"{spec.name:<10} {'cached  ' if cached else 'built   '}"
                  f"{res.size / 1e6:6.2f} MB  {res.share * 100:5.2f}% of the root "
                  f"({root_size / 1e6:.1f} MB)", file=sys.stderr)
    return results


def build(paths: Paths, *, force: bool = False, quiet: bool = False,
          appliances: bool = True) -> dict[str, Path]:
    """Build every recipe and appliance; publish to images/out; return name → published path."""
    built = build_recipes(paths, force=force, quiet=quiet)
    out = paths.out
    out.mkdir(parents=True, exist_ok=True)
    published: dict[str, Path] = {}
    manifest: list[dict[str, object]] = []
    for b in built:
        art = b.dir / "artifacts"
        if art.is_dir():
            for f in sorted(art.iterdir()):
                _publish_file(f, out / f.name)
                published[f.name] = out / f.name
                manifest.append({"image": f.name, "recipe": b.name, "key": b.key[:16],
                                 "seconds": b.seconds})
        if b.name == ROOT_RECIPE:
            _publish_link(b.dir / "stage", out / "root")
            published["root"] = out / "root"
            manifest.append({"image": "root", "recipe": b.name, "key": b.key[:16],
                             "seconds": b.seconds})
    root = next((b for b in built if b.name == ROOT_RECIPE), None)
    if appliances and root is not None:
        for res, _cached in build_appliances(paths, root, quiet=quiet):
            dest = out / res.path.name
            _publish_file(res.path, dest)
            published[res.name] = dest
            manifest.append({"image": res.path.name, "recipe": f"appliance {res.name}",
                             "key": res.path.parent.name.rsplit("-", 1)[-1], "seconds": 0,
                             "share": round(res.share, 4)})
    _write_json(out / "manifest.json", manifest)
    _write_json(out / "builds.json", [{"recipe": b.name, "key": b.key[:16],
                                        "seconds": round(b.seconds, 1)} for b in built])
    return published


def _write_json(dest: Path, data: object) -> None:
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, dest)


def listing(paths: Paths) -> list[dict[str, object]]:
    """Every published image with its size and content hash (what `kh images list` shows)."""
    try:
        manifest = json.loads((paths.out / "manifest.json").read_text())
    except FileNotFoundError:
        raise ImageError("no images have been built", "run `kh images build`") from None
    rows = []
    for m in manifest:
        p = paths.out / str(m["image"])
        if not os.path.lexists(p):
            rows.append({**m, "size": None, "sha256": None, "missing": True})
            continue
        if p.is_dir():
            size = appliance_builder.tree_size(p)
            digest = str(m["key"])
        else:
            size = p.stat().st_size
            digest = sha256(p)[:16]
        rows.append({**m, "path": str(p), "size": size, "sha256": digest})
    return rows


def prune(paths: Paths, *, dry_run: bool = False) -> list[Path]:
    """Remove cached builds and logs that no current recipe or appliance would use.

    Builds the current recipes first (normally all cached), so what is kept is exactly what
    `kh images build` would take from the cache now.
    """
    recipes_built = build_recipes(paths, quiet=True)
    keep_recipes = {b.dir.name for b in recipes_built}
    root = next((b for b in recipes_built if b.name == ROOT_RECIPE), None)
    keep_appliances = ({res.path.parent.name for res, _ in
                        build_appliances(paths, root, quiet=True)} if root else set())
    with locked(paths.cache / "images.lock"):
        gone = stale(paths.cache, keep_recipes, keep_appliances)
        if not dry_run:
            for p in gone:
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()
    return gone


def stale(cache: Path, keep_recipes: set[str], keep_appliances: set[str]) -> list[Path]:
    """Cache entries (`<name>-<key>` builds, appliances and their logs) not in the keep sets;
    half-finished builds (dot-directories) belong to a running build and are left alone."""
    gone: list[Path] = []
    for d, keep in ((cache / "images", keep_recipes), (cache / "appliances", keep_appliances)):
        for p in sorted(d.glob("*")) if d.is_dir() else []:
            if p.is_dir() and not p.name.startswith(".") and p.name not in keep:
                gone.append(p)
    logs = cache / "logs"
    for p in sorted(logs.glob("*-*.log")) if logs.is_dir() else []:
        if p.stem not in keep_recipes and not p.name.startswith("kh-"):
            gone.append(p)
    return gone
