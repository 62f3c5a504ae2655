"""What `kh host add` is given, checked (pure; kh.service.hosts acts on it): the host's name,
its libvirt URI, and the runner that reaches it for `kh fabric` (derived from a qemu+ssh URI,
or given). Everything here comes from a client: bounded and checked, each fault one
UsageError naming the value."""

from __future__ import annotations

import ipaddress
import re
import shlex
import urllib.parse
from dataclasses import dataclass

from kh.errors import UsageError
from kh.service.config import PREFIX_RE
from kh.store_hosts import LOCAL

NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,15}")
# A qemu+ssh URI's host and user become words of ssh's command line: a DNS name, an ssh_config
# alias or IPv4 address (an IPv6 one in brackets), a POSIX user name; never an option (a
# leading '-': ProxyCommand=...) nor anything a shell reads.
HOST_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9_])?")
USER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}")
# `--kh`: one path; ssh joins the words into a line for the far shell, so it needs no quoting.
KH_RE = re.compile(r"[A-Za-z0-9_./+][A-Za-z0-9_./+-]{0,511}")
SCHEMES = ("qemu", "qemu+ssh", "qemu+unix")
MAX_URI = 1024
MAX_WORDS, MAX_WORD = 32, 512
MAX_CAPACITY = 256  # nodes on one added host
# Capacity probed from a host's free memory: this much kept for the host itself, and each
# node's QEMU beyond its guest RAM (measured ~40-60 MiB RSS over the guest's at the prompt).
RESERVE_MIB, OVERHEAD_MIB, PROBED_MAX = 1024, 64, 64


@dataclass(frozen=True)
class HostSpec:
    """A host to add, as asked (checked by ``check``)."""

    name: str
    uri: str
    capacity: int | None = None  # None: probed
    underlay: str | None = None  # the far underlay address; None: the one it reports
    prefix: str | None = None  # kh's prefix there; None: khd's own
    kh: str = "kh"
    runner: tuple[str, ...] | None = None  # None: derived from the URI


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise UsageError(f"host name {str(name)[:40]!r} is malformed",
                         "a lowercase letter, then up to 15 lowercase letters, digits or '-'")
    if name == LOCAL:
        raise UsageError("host name local is khd's own host", "give another name")
    return name


def _word(w: object, what: str) -> str:
    if not isinstance(w, str) or not w or len(w) > MAX_WORD or "\0" in w or "\n" in w:
        raise UsageError(f"{what}: {str(w)[:40]!r} is not a word of a command",
                         f"1 to {MAX_WORD} characters, no NUL or newline")
    if "PRIVATE KEY" in w:
        raise UsageError(f"{what} holds key material", "name a key FILE (ssh -i PATH)")
    return w


def parse_uri(uri: object) -> urllib.parse.SplitResult:
    """The URI split; UsageError unless it is a qemu URI (qemu://, qemu+ssh://, qemu+unix://),
    short, with no password."""
    if not isinstance(uri, str) or not uri or len(uri) > MAX_URI or any(
            c.isspace() or ord(c) < 32 for c in uri):
        raise UsageError(f"host URI {str(uri)[:60]!r} is malformed",
                         f"e.g. qemu+ssh://root@HOST/system (at most {MAX_URI} characters)")
    u = urllib.parse.urlsplit(uri)
    if u.scheme not in SCHEMES:
        raise UsageError(f"host URI {uri[:60]!r}: scheme {u.scheme!r} is not one of "
                         f"{', '.join(SCHEMES)}")
    if u.password is not None:
        raise UsageError("host URI holds a password", "use an ssh key (keyfile=PATH)")
    if u.path != "/system":
        raise UsageError(f"host URI {uri[:60]!r}: kh uses libvirt's /system driver")
    try:
        u.port  # noqa: B018 (a malformed port raises)
    except ValueError:
        raise UsageError(f"host URI {uri[:60]!r}: its port is malformed") from None
    if u.scheme == "qemu+ssh" and not u.hostname:
        raise UsageError(f"host URI {uri[:60]!r} names no host")
    if u.hostname and not _host_ok(u.hostname, u.netloc):
        raise UsageError(f"host URI {uri[:60]!r}: host {u.hostname[:40]!r} is not a host name "
                         "or address", "a DNS name (ASCII), A.B.C.D or [IPv6]")
    if u.username is not None and not USER_RE.fullmatch(u.username):
        raise UsageError(f"host URI {uri[:60]!r}: user {u.username[:40]!r} is malformed",
                         "a user name: letters, digits, '_', '.', '-', not first")
    return u


def _host_ok(host: str, netloc: str) -> bool:
    if HOST_RE.fullmatch(host):
        return True
    if f"[{host}]" in netloc:  # an IPv6 literal
        try:
            ipaddress.IPv6Address(host)
            return True
        except ValueError:
            return False
    return False


def runner_from_uri(uri: str) -> tuple[str, ...]:
    """The argv prefix that runs a command on the URI's host the way libvirt reaches it: for
    qemu+ssh, ssh (or the URI's ``command=``) with its user, port and ``keyfile=``, host key
    checks off with ``no_verify=1``, no terminal, no password prompt; for a host on this
    machine (qemu://, qemu+unix://) nothing (commands run here)."""
    u = parse_uri(uri)
    if u.scheme != "qemu+ssh":
        return ()
    q = dict(urllib.parse.parse_qsl(u.query))
    argv = [_word(q.get("command", "ssh"), "the URI's command="), "-T", "-o", "BatchMode=yes"]
    if u.port:
        argv += ["-p", str(u.port)]
    if u.username:
        argv += ["-l", _word(u.username, "the URI's user")]
    if "keyfile" in q:
        argv += ["-i", _word(q["keyfile"], "the URI's keyfile=")]
    if q.get("no_verify") == "1":
        argv += ["-o", "StrictHostKeyChecking=no"]
    assert u.hostname
    return (*argv, _word(u.hostname, "the URI's host"), "--")


def runner_words(text: object) -> tuple[str, ...]:
    """``--runner 'WORDS'`` (a string, shlex-split) or an API list of words; checked."""
    if isinstance(text, str):
        try:
            words: object = shlex.split(text)
        except ValueError as e:
            raise UsageError(f"--runner {text[:60]!r}: {e}") from None
    else:
        words = text
    if not isinstance(words, list | tuple) or len(words) > MAX_WORDS:
        raise UsageError(f"runner: a list of at most {MAX_WORDS} words")
    return tuple(_word(w, "runner") for w in words)


def check(spec: HostSpec, own_prefix: str) -> HostSpec:
    """``spec`` with its defaults filled (prefix, runner); UsageError for anything malformed."""
    check_name(spec.name)
    u = parse_uri(spec.uri)
    if spec.capacity is not None and (not isinstance(spec.capacity, int) or isinstance(
            spec.capacity, bool) or not 1 <= spec.capacity <= MAX_CAPACITY):
        raise UsageError(f"capacity {str(spec.capacity)[:20]} is not 1 to {MAX_CAPACITY} nodes")
    if spec.underlay is not None:
        if not isinstance(spec.underlay, str):
            raise UsageError("underlay: an IPv4 address (a string)")
        from kh.hw.stretch import StretchError, _address
        try:
            _address(spec.underlay, "underlay address", spec.name)
        except StretchError as e:
            raise UsageError(str(e)) from None
    prefix = own_prefix if spec.prefix is None else spec.prefix
    if not isinstance(prefix, str) or not PREFIX_RE.fullmatch(prefix):
        raise UsageError(f"prefix {str(prefix)[:20]!r} is malformed", "[a-z][a-z0-9]{0,7}")
    kh = _word(spec.kh, "--kh")
    if not KH_RE.fullmatch(kh):
        raise UsageError(f"--kh {kh[:40]!r} is not one path", "letters, digits and _ . / + -, "
                         "not '-' first (the far host's shell reads it unquoted)")
    if spec.runner is None and u.scheme != "qemu+ssh" and u.hostname:
        raise UsageError(f"host URI {spec.uri[:60]!r} names another machine ({u.hostname[:40]}) "
                         "and kh reaches it only through ssh",
                         "use qemu+ssh://, or give --runner 'WORDS' that run a command there")
    runner = runner_from_uri(spec.uri) if spec.runner is None else runner_words(spec.runner)
    return HostSpec(spec.name, spec.uri, spec.capacity, spec.underlay, prefix, kh, runner)


def probed_capacity(free_bytes: int, mem_mib: int) -> int:
    """Nodes a host with ``free_bytes`` of free memory (libvirt getFreeMemory) takes: what is
    left after RESERVE_MIB, in nodes of ``mem_mib`` + OVERHEAD_MIB, at most PROBED_MAX."""
    left = free_bytes // (1 << 20) - RESERVE_MIB
    return max(0, min(PROBED_MAX, left // (mem_mib + OVERHEAD_MIB)))
