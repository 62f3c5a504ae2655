"""The service API as the CLI sees it: HTTP over khd's unix socket."""

from __future__ import annotations

import http.client
import json
import socket
import time
from pathlib import Path
from typing import Any

from kh.admission import AuthError, Throttled
from kh.allocation import AllocationError
from kh.errors import KhError, UsageError

ERRORS: dict[int, type[KhError]] = {400: UsageError, 403: AuthError, 409: AllocationError}


class NotRunning(KhError):
    """khd is not running (or not where we looked)."""


class Busy(KhError):
    """khd's socket kept refusing new connections for BUSY_WAIT seconds."""


class Disconnected(KhError):
    """khd closed the connection (or it broke) before a whole answer came."""


BUSY_WAIT = 10.0
# What http.client raises when the peer goes away mid-request: RemoteDisconnected (no status
# line), BadStatusLine, IncompleteRead (a body cut short), a reset or a broken pipe.
_CLOSED = (http.client.HTTPException, ConnectionResetError, BrokenPipeError)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("khd", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        # A full unix-socket backlog answers EAGAIN at once instead of queueing the
        # caller the way TCP does, so a busy khd is retried briefly before giving up.
        deadline = time.monotonic() + BUSY_WAIT
        delay = 0.01
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(self.timeout)
            try:
                s.connect(str(self.unix_path))
            except BlockingIOError:
                s.close()
                if time.monotonic() >= deadline:
                    raise Busy(f"khd at {self.unix_path} is too busy to accept a connection",
                               "try again in a moment") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
                continue
            except BaseException:
                s.close()
                raise
            self.sock = s
            return


class Client:
    def __init__(self, socket_path: Path, timeout: float = 300.0) -> None:
        self.path = socket_path
        self.timeout = timeout

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             *, as_json: bool = False) -> str:
        conn = _UnixConnection(self.path, self.timeout)
        headers = {"Accept": "application/json" if as_json else "text/plain"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            text = resp.read().decode("utf-8", "replace")
        except (FileNotFoundError, ConnectionRefusedError):
            raise NotRunning(f"khd is not running (no socket at {self.path})",
                             "start it with `kh service start`") from None
        except _CLOSED:
            raise Disconnected("khd closed the connection without answering",
                               "it may have stopped: `kh service status`") from None
        except TimeoutError:
            raise KhError(f"khd did not answer within {self.timeout:.0f} s",
                          "`kh service status` says whether it runs") from None
        except PermissionError:
            raise KhError(f"no permission to use khd's socket {self.path}",
                          "the operator's commands run as root") from None
        finally:
            conn.close()
        if resp.status >= 400:
            msg, hint = _parse_error(text)
            if resp.status == 429:
                raise Throttled(msg, _retry_after(resp.getheader("Retry-After")))
            raise ERRORS.get(resp.status, KhError)(msg, hint)
        return text


def _retry_after(value: str | None) -> int:
    """Whole seconds from a Retry-After header (delta-seconds; an HTTP date or none: 1)."""
    text = (value or "").strip()
    return max(1, int(text)) if text.isascii() and text.isdigit() and len(text) < 9 else 1


def _parse_error(text: str) -> tuple[str, str | None]:
    try:
        d = json.loads(text)
        return str(d.get("error")), d.get("hint")
    except ValueError:
        line = text.strip().splitlines()[0] if text.strip() else "khd failed"
        return line.removeprefix("kh: "), None
