"""Debian source packages: what `apt-get source` would fetch, and fetching it.

Every recipe's source goes through here. A recipe may also take its source from a suite the
host does not follow: some of bookworm's source files are missing from the archive this
machine reaches (libtirpc's and rpcbind's orig tarballs answer 404), so their recipes take the
next suite's source (`suite = "trixie"`). Adding that suite to the host's sources would move
every other package too, so kh keeps a private APT configuration per suite under its cache: its
own source list, package lists and downloads, used only for `apt-get source`.
"""

from __future__ import annotations

from pathlib import Path

from kh import proc
from kh.errors import ImageError, ProcessError

MIRROR = "http://deb.debian.org/debian"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
SUITES = ("trixie",)


def config(cache: Path, suite: str) -> Path:
    """The APT_CONFIG file for ``suite`` (made, and its lists fetched, on first use)."""
    if suite not in SUITES:
        raise ImageError(f"unknown Debian suite {suite!r}", f"known: {', '.join(SUITES)}")
    d = cache / "apt" / suite
    conf = d / "apt.conf"
    lists = d / "lists"
    if conf.exists() and any(lists.glob("*Sources*")):
        return conf
    (d / "parts").mkdir(parents=True, exist_ok=True)
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    (d / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    (d / "parts" / f"{suite}-src.sources").write_text(
        f"Types: deb-src\nURIs: {MIRROR}\nSuites: {suite}\nComponents: main\n"
        f"Signed-By: {KEYRING}\n")
    conf.write_text(
        'Dir::Etc::SourceList "/dev/null";\n'
        f'Dir::Etc::SourceParts "{d / "parts"}";\n'
        f'Dir::State::Lists "{lists}";\n'
        f'Dir::Cache "{d / "cache"}";\n'
        'APT::Sandbox::User "root";\n')
    try:
        proc.run(["apt-get", "update", "-qq"], env=env(conf),
                 what=f"apt-get update ({suite} sources for kh)")
    except ProcessError as e:
        raise ImageError(f"cannot fetch Debian {suite}'s source lists",
                         f"{e.message}; apt must reach {MIRROR}") from None
    return conf


def env(conf: Path) -> dict[str, str]:
    return {"APT_CONFIG": str(conf)}


def _uri_of(argv: list[str], suffix: str, conf: Path | None, missing: str, hint: str) -> str:
    """'<file name> <hash>' of the first ``suffix`` file that ``argv --print-uris`` names."""
    try:
        out = proc.run([*argv, "--print-uris", "-qq"], env=env(conf) if conf else None,
                       what=" ".join(argv[:2]) + " --print-uris " + argv[-1]).stdout
    except ProcessError as e:
        raise ImageError(missing, hint) from e
    for line in out.splitlines():
        parts = line.split()  # 'URI' NAME SIZE HASH
        if len(parts) >= 4 and parts[1].endswith(suffix):
            return f"{parts[1]} {parts[3]}"
    raise ImageError(missing, hint)


def source_version(package: str, conf: Path | None) -> str:
    """'<dsc name> <hash>' of the source ``package`` that apt would fetch."""
    return _uri_of(["apt-get", "source", package], ".dsc", conf,
                   f"Debian source package {package} is not available",
                   "`make setup` enables deb-src and runs apt-get update")


def fetch_source(package: str, conf: Path | None, downloads: Path, into: Path) -> Path:
    """Unpack source ``package`` (Debian's patches applied) as ``into``/src."""
    dsc_name = source_version(package, conf).split()[0]
    cache = downloads / package
    cache.mkdir(parents=True, exist_ok=True)
    dsc = cache / dsc_name
    if not dsc.exists():
        try:
            proc.run(["apt-get", "source", "--download-only", "-qq", package], cwd=cache,
                     env=env(conf) if conf else None, what=f"apt-get source {package}")
        except ProcessError as e:
            raise ImageError(f"cannot download Debian source package {package}",
                             e.output_tail or e.message) from None
    if not dsc.exists():
        raise ImageError(f"apt-get source {package} did not produce {dsc_name}")
    dest = into / "src"
    proc.run(["dpkg-source", "--no-check", "-x", str(dsc), str(dest)], cwd=into,
             what=f"dpkg-source -x {dsc_name}")
    return dest


def binary_version(package: str) -> str:
    """'<deb file name> <hash>' of the binary ``package`` that `apt-get download` would fetch."""
    return _uri_of(["apt-get", "download", package], ".deb", None,
                   f"Debian package {package} is not available", "`make setup` runs apt-get update")


def fetch_deb(package: str, downloads: Path) -> Path:
    """The .deb of ``package``, downloaded once into ``downloads``."""
    name = binary_version(package).split()[0]
    cache = downloads / "debs"
    cache.mkdir(parents=True, exist_ok=True)
    deb = cache / name
    if not deb.exists():
        try:
            proc.run(["apt-get", "download", "-qq", package], cwd=cache,
                     what=f"apt-get download {package}")
        except ProcessError as e:
            raise ImageError(f"cannot download Debian package {package}",
                             e.output_tail or e.message) from None
    if not deb.exists():
        raise ImageError(f"apt-get download {package} did not produce {name}")
    return deb
