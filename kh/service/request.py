"""What a request to khd's API may carry, read strictly: its length, its JSON body and the typed
fields in it. Anything malformed is a 4xx with a one-line reason, never an internal error.

A body is JSON (``application/json``, UTF-8, an object) of at most MAX_BODY bytes, announced by
one ``Content-Length`` of ASCII digits; its length is checked before a byte of it is read.
Numbers are JSON integers in a stated range; ids in paths are ASCII digits.
"""

from __future__ import annotations

import contextlib
import json
import re
import urllib.parse
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

from kh.admission import check_credential
from kh.errors import UsageError

MAX_BODY = 64 * 1024
MAX_ID = 2**31 - 1  # SQLite takes 64-bit integers; no id of kh's comes near this
_DIGITS = re.compile(r"[0-9]{1,10}", re.ASCII)


class TooLarge(UsageError):
    """413: the body is over MAX_BODY."""


class Unsupported(UsageError):
    """415: the body is not JSON."""


class BadFraming(UsageError):
    """400 where the rest of the connection cannot be trusted (its body length is unknown)."""


def content_length(value: str | None, transfer_encoding: str | None = None) -> int:
    """The body's length, checked before it is read: one Content-Length of ASCII digits (a
    repeated header arrives joined by commas, so it is refused too), at most MAX_BODY; no
    Transfer-Encoding (a chunked body is refused, not skipped). khd's HTTP server
    (kh.service.httpd) refuses these before the application sees them; this is the rule
    written once, for the application's own check."""
    if transfer_encoding is not None:
        raise BadFraming("Transfer-Encoding is not accepted", "send a Content-Length")
    if value is None or value == "":
        return 0
    text = value.strip()
    if not re.fullmatch(r"[0-9]{1,19}", text, re.ASCII):
        raise BadFraming(f"bad Content-Length {text[:40]!r}", "a number of bytes, given once")
    n = int(text)
    if n > MAX_BODY:
        raise TooLarge(f"request body of {n} bytes is too large", f"at most {MAX_BODY}")
    return n


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


# A media type's parameter (RFC 9110 §5.6.6): token=token or token="quoted".
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PARAM = re.compile(rf'\s*({_TOKEN})=("[^"\\]*"|{_TOKEN})\s*', re.ASCII)


def check_media(content_type: str | None) -> None:
    """``application/json``, with no parameter but ``charset=utf-8`` (RFC 8259 §8.1: JSON is
    UTF-8; a body declared in another charset would be read as something it is not).
    Unsupported (415) otherwise."""
    media, _, params = (content_type or "").partition(";")
    media = media.strip().lower()
    hint = "send Content-Type: application/json"
    if media != "application/json":
        raise Unsupported(f"request bodies must be JSON, not {media[:60] or 'untyped'!r}", hint)
    for param in params.split(";") if params.strip() else ():
        m = _PARAM.fullmatch(param)
        name, value = (m[1].lower(), m[2].strip('"').lower()) if m else ("", "")
        if name != "charset":
            raise Unsupported(f"media type parameter {param.strip()[:40]!r} is not taken", hint)
        if value != "utf-8":
            raise Unsupported(f"request bodies are UTF-8, not {value[:40]!r}", hint)


def parse_body(raw: bytes, content_type: str | None) -> dict[str, Any]:
    """The JSON object a request carries (an empty body is an empty object). Its type must be
    ``application/json`` (check_media: Unsupported, 415); UsageError (400) when it is not
    UTF-8 or not one JSON object."""
    if not raw:
        return {}
    check_media(content_type)
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise UsageError("request body is not UTF-8") from None
    except (ValueError, RecursionError):
        raise UsageError("request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise UsageError("request body must be a JSON object")
    return data


R = TypeVar("R", bound=Callable[..., Any])
# Each route's parameters (its JSON body's fields, or a GET's query parameters), by route
# function: kh.service.api refuses a request naming any other before the route runs.
FIELDS: dict[Callable[..., Any], frozenset[str]] = {}
PRINCIPAL = ("user", "credential")  # a principal's request: its name and credential


def takes(*names: str) -> Callable[[R], R]:
    """Declare the parameters a route reads (a decorator): any other in a request is a 400
    naming it (check_fields), so that a misspelt or unsupported one is never ignored."""
    def mark(fn: R) -> R:
        FIELDS[fn] = frozenset(names)
        return fn
    return mark


OPERATOR_ONLY: dict[Callable[..., Any], str] = {}


def operator_only(what: str) -> Callable[[R], R]:
    """Mark a route the operator's alone (a decorator): anyone else is refused (403, ``what``)
    before its parameters are read, whatever the request holds (a principal's credential
    too)."""
    def mark(fn: R) -> R:
        OPERATOR_ONLY[fn] = what
        return fn
    return mark


def check_fields(body: dict[str, Any], allowed: frozenset[str]) -> None:
    """UsageError naming the first (in sorted order) of ``body``'s keys not in ``allowed``."""
    extra = sorted(k for k in body if k not in allowed)
    if extra:
        raise UsageError(f"unknown parameter {_show(extra[0])}",
                         f"this request takes {', '.join(sorted(allowed)) or 'none'}")


def path_id(text: str, what: str) -> int:
    """An id from the request's path: ASCII digits, at most MAX_ID."""
    if not _DIGITS.fullmatch(text) or int(text) > MAX_ID:
        raise UsageError(f"bad {what} {text[:40]!r}", "a number")
    return int(text)


def integer(body: dict[str, Any], key: str, default: int, lo: int = 0,
            hi: int = MAX_ID) -> int:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise UsageError(f"`{key}` must be an integer, got {_show(v)}")
    if not lo <= v <= hi:
        raise UsageError(f"`{key}` must be between {lo} and {hi}, got {v}")
    return v


def integers(body: dict[str, Any], key: str, hi: int = MAX_ID) -> tuple[int, ...]:
    """A list of integers, or a string of comma-separated ones (`n: "3,4"`, as khget -n)."""
    v = body.get(key)
    if v is None or v == "":
        return ()
    if isinstance(v, str):
        v = number_list(v, f"`{key}` list")
    if not isinstance(v, list) or len(v) > 256:
        raise UsageError(f"`{key}` must be a list of integers")
    for x in v:
        if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x <= hi:
            raise UsageError(f"`{key}` must be a list of integers from 0 to {hi}, "
                             f"got {_show(x)}")
    return tuple(v)


def number_list(text: str, what: str) -> list[int]:
    """``"3,4"`` → [3, 4]: numbers of ASCII digits (up to 10 each) separated by single commas,
    spaces around them allowed; ``""`` → []. An empty item (``",,"``, ``"3,"``) is a
    UsageError naming ``what``, never skipped: kh's clients and khd read one list alike."""
    if not text.strip():
        return []
    parts = [x.strip() for x in text.split(",")]
    if not all(_DIGITS.fullmatch(x) for x in parts):
        raise UsageError(f"bad {what} {text[:40]!r}", "numbers separated by commas: 3,4")
    return [int(x) for x in parts]


def flag(body: dict[str, Any], key: str) -> bool:
    v = body.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise UsageError(f"`{key}` must be true or false, got {_show(v)}")
    return v


def user(body: dict[str, Any]) -> str:
    u = body.get("user")
    if not isinstance(u, str) or not u:
        raise UsageError("`user` is required (a principal's name)")
    return u


def credential(body: dict[str, Any]) -> str | None:
    """The secret itself, never a path: khd reads no file on a caller's behalf."""
    c = body.get("credential")
    return None if c is None else check_credential(c)


def text(body: dict[str, Any], key: str, limit: int = MAX_BODY) -> str:
    v = body.get(key)
    if not isinstance(v, str) or len(v) > limit:
        raise UsageError(f"`{key}` must be a string of at most {limit} characters")
    return v


def _show(v: object) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


class Misdirected(UsageError):
    """421: a request over TCP named a host other than an address of khd's."""


# An IP literal (v4 or bracketed v6) or localhost, with an optional port.
_HOST = re.compile(r"(?:localhost|[0-9]{1,3}(?:\.[0-9]{1,3}){3}|\[[0-9A-Fa-f:.]+\])"
                   r"(?::[0-9]{1,5})?", re.ASCII)


def check_host(host: str | None) -> None:
    """Over TCP, the Host header (when given) must be an address, not a name: a web page on
    the host cannot then drive khd through a name it rebinds to 127.0.0.1 (DNS rebinding).
    Repeated Host headers arrive joined by a comma, which no address matches."""
    if host is not None and not _HOST.fullmatch(host.strip()):
        raise Misdirected(f"khd does not answer for host {host.strip()[:60]!r}",
                          "address khd by IP (127.0.0.1, or the fabric's address)")


def request_path(target: str) -> str:
    """The path of a request's target as sent (not percent-decoded: ``%33`` is not an id).
    Origin-form ``/p?q`` gives ``/p`` (``//x/p`` too is a path, never a host); absolute-form
    ``http://HOST/p?q`` gives ``/p``, its HOST having replaced the Host header
    (kh.service.httpd, RFC 9112 §3.2.2), so check_host checks it."""
    if target.startswith("/"):
        return target.split("?", 1)[0].split("#", 1)[0]
    return urllib.parse.urlsplit(target).path


@dataclass(frozen=True)
class Caller:
    """Who sent a request, as the transport tells it (never as the request claims).

    ``source``: ``unix:uid=N`` on khd's unix socket (the kernel's SO_PEERCRED), else the TCP
    peer's address, with all of loopback (127.0.0.0/8, ::1) as the one source ``loopback``.
    ``operator``: the peer is root (or khd's own uid) on the unix socket, which lives in the
    operator's 0700 state directory: it may see and manage every principal."""

    source: str
    operator: bool


_CALLER: ContextVar[Caller | None] = ContextVar("kh_caller", default=None)


@contextlib.contextmanager
def calling(caller: Caller) -> Iterator[None]:
    """Run a request's work as ``caller``: the service's authentication reads it
    (current_caller) to rate-limit failed credentials by source."""
    token = _CALLER.set(caller)
    try:
        yield
    finally:
        _CALLER.reset(token)


def current_caller() -> Caller | None:
    """The caller of the API request this thread is serving; None outside one (e.g. the ssh
    control channel's threads)."""
    return _CALLER.get()
