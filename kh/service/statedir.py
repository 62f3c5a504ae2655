"""khd's state directory, and what of it `kh clean` may remove.

khd marks each directory it uses, the state directory, ``run/`` and ``logs/``, with a MARKER
file, which says whether kh made the directory or found it there. `kh clean` touches only
directories that carry the marker, removes from them only kh's own files (names it knows: the
database, the ssh host key, the socket, the pidfile, ``node<N>/``, ``khd.log``,
``node<N>.log``, ``node<N>.qemu.log``), and removes a directory itself only when kh made it and
nothing else is left in it. Whatever it leaves, it says what and why, in one line.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from kh.errors import KhError
from kh.service.config import ServiceConfig

MARKER = ".kh-state"
_MADE, _FOUND = "made", "found"


def _mark(d: Path, cfg: ServiceConfig) -> None:
    marker = d / MARKER
    if marker.exists():
        return
    try:
        d.mkdir(parents=True, mode=0o700)  # the operator's alone (a found one keeps its mode)
        how = _MADE
    except FileExistsError:
        how = _FOUND
    if not d.is_dir():
        raise KhError(f"{d} is not a directory", "pick another state directory (KH_STATE_DIR)")
    fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w") as f:
        f.write(f"kh {how} this directory (prefix {cfg.prefix}); `kh clean` removes "
                "kh's files from it, and the directory only if kh made it\n")


def prepare(cfg: ServiceConfig) -> None:
    """Make (or adopt) the state directory, run/ and logs/, each with its marker."""
    for d in (cfg.state_dir, cfg.run, cfg.logs):
        _mark(d, cfg)


def marked(d: Path) -> str | None:
    """"made" or "found" when ``d`` carries kh's marker, else None."""
    try:
        words = (d / MARKER).read_text().split()
    except OSError:
        return None
    return words[1] if len(words) > 1 and words[0] == "kh" and words[1] in (_MADE, _FOUND) \
        else None


def is_kh_file(cfg: ServiceConfig, p: Path) -> bool:
    """True for the files and directories khd makes in its marked directories."""
    if p.name == MARKER:
        return False  # the marker goes last, with its directory
    if p.parent == cfg.state_dir:
        return p in cfg.state_paths
    if p.parent == cfg.run:
        return p in (cfg.socket, cfg.pidfile) or (
            re.fullmatch(r"node[0-9]+", p.name) is not None and p.is_dir()
            and not p.is_symlink())
    if p.parent == cfg.logs:
        # khd.log.1 ... and node<N>.log.1 ... are the logs' rotated parts (kh.service.daemon,
        # kh.hw.console.ConsoleLog); libvirtd.log is kh's own libvirtd's (kh.hw.libvirtd)
        return re.fullmatch(r"(khd|node[0-9]+)\.log(\.[0-9]+)?|node[0-9]+\.qemu\.log"
                            r"|libvirtd\.log", p.name) is not None
    return False


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


def _others(d: Path) -> str:
    names = sorted(c.name for c in d.iterdir() if c.name != MARKER)
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _empty(cfg: ServiceConfig, d: Path, keep: tuple[Path, ...] = ()) -> list[str]:
    """Remove kh's files from the marked directory ``d`` (but ``keep``), then ``d`` itself
    when kh made it and nothing else is in it; one line saying what was done."""
    if not d.exists() and not d.is_symlink():
        return []
    how = marked(d) if d.is_dir() and not d.is_symlink() else None
    if how is None:
        return [f"left {d} alone: it has no {MARKER} marker, so kh did not make it"]
    done = []
    for child in sorted(d.iterdir()):
        if child in keep:
            continue
        if child in (cfg.run, cfg.logs):
            done += _empty(cfg, child)
        elif is_kh_file(cfg, child):
            _remove(child)
            if d == cfg.state_dir:
                done.append(f"removed {child}")
    if keep:
        return done
    if how == _FOUND:
        (d / MARKER).unlink()
        return [*done, f"removed kh's files from {d} (kept the directory: kh did not make it)"]
    others = _others(d)
    if others:  # the marker stays: the next `kh clean` still knows the directory is kh's
        return [*done, f"kept {d}: it holds files that are not kh's ({others})"]
    (d / MARKER).unlink()
    d.rmdir()
    return [*done, f"removed {d}"]


def remove(cfg: ServiceConfig, *, keep_logs: bool = False) -> list[str]:
    """`kh clean`'s part in the state directory (with ``keep_logs``, logs/ stays whole)."""
    return _empty(cfg, cfg.state_dir, (cfg.logs,) if keep_logs else ())
