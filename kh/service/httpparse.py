"""What an HTTP request must be for khd to serve it, checked as waitress receives it (before any
body is read), and waitress's refusals in khd's form: one line ``kh: <reason>``. kh.service.httpd
puts these into its waitress channels.

Refused (400): a Transfer-Encoding (khd takes only a Content-Length), a bad Content-Length, an
HTTP version other than 1.0 and 1.1, a request target that is neither a path nor
``http://HOST/path``, an HTTP/1.1 request without Host, a Host given twice or not ``host[:port]``;
past the bounds, 413 (body) and 431 (request line and headers).
"""

from __future__ import annotations

import http
import re
import time
from typing import TYPE_CHECKING, Any

from waitress.parser import HTTPRequestParser, ParsingError, TransferEncodingNotImplemented
from waitress.task import ErrorTask
from waitress.utilities import RequestEntityTooLarge, RequestHeaderFieldsTooLarge

if TYPE_CHECKING:
    from kh.service.httpd import Limits

# A Host field's value (RFC 9110 §7.2): an IP literal or a registered name, an optional port.
_FIELD_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+;=%-]*)(?::[0-9]{0,5})?",
                         re.ASCII)


class Parser(HTTPRequestParser):  # type: ignore[misc]
    """One request being received: knows when it began; refuses, before any body is read,
    a Transfer-Encoding (khd takes only a Content-Length), a bad Content-Length, and HTTP
    versions other than 1.0 and 1.1."""

    def __init__(self, adj: Any) -> None:
        super().__init__(adj)
        self.started = time.time()

    def parse_header(self, header_plus: bytes) -> None:
        try:
            super().parse_header(header_plus)
        except TransferEncodingNotImplemented:
            raise ParsingError("Transfer-Encoding is not accepted (send a Content-Length)"
                               ) from None
        except ParsingError:
            cl = self.headers.get("CONTENT_LENGTH")
            if cl is not None and not (cl.isascii() and cl.isdigit()):
                raise ParsingError(f"bad Content-Length {cl[:40]!r} (a number of bytes, "
                                   "given once)") from None
            raise
        if self.chunked or "TRANSFER_ENCODING" in self.headers:
            raise ParsingError("Transfer-Encoding is not accepted (send a Content-Length)")
        if self.version not in ("1.0", "1.1"):
            raise ParsingError(f"HTTP version {self.version or 'missing'} is not served "
                               "(khd speaks HTTP/1.0 and 1.1)")
        self._host()

    def _host(self) -> None:
        """The request's one Host (RFC 9112 §3.2): an absolute-form target's (``http://HOST/
        path``, which replaces any Host header, §3.2.2), else the Host header, required in
        HTTP/1.1; given twice (waitress joins them with a comma) or not ``host[:port]``, 400.
        The application checks, over TCP, that it names khd (request.check_host)."""
        target = self.request_uri
        if not target.startswith("/"):
            if self.proxy_scheme.lower() != "http" or not self.proxy_netloc or \
                    "@" in self.proxy_netloc:
                raise ParsingError(f"request target {target[:60]!r} is neither a path nor "
                                   "http://HOST/path")
            self.headers["HOST"] = self.proxy_netloc
        host = self.headers.get("HOST")
        if host is None:
            if self.version == "1.1":
                raise ParsingError("HTTP/1.1 request without Host (RFC 9112 §3.2)")
        elif "," in host or not _FIELD_HOST.fullmatch(host):
            raise ParsingError(f"bad Host {host[:60]!r} (one host[:port])")


class Refusal(ErrorTask):  # type: ignore[misc]
    """waitress's own refusals in khd's form: one line, `kh: <reason>`; the connection is
    closed after it (the rest of the stream cannot be trusted)."""

    def execute(self) -> None:
        e = self.request.error
        limits: Limits = self.channel.server.limits  # the listener's (kh.service.httpd)
        if isinstance(e, RequestEntityTooLarge):
            code, text = 413, (f"request body of {self.request.content_length} bytes is too "
                               f"large (at most {limits.max_body})")
        elif isinstance(e, RequestHeaderFieldsTooLarge):
            code, text = 431, f"request line and headers are over {limits.max_header} bytes"
        elif 400 <= e.code < 500:
            code, text = e.code, str(e.body)
        elif e.code == 501:  # an unknown transfer coding: the client's fault
            code, text = 400, str(e.body)
        else:
            code, text = e.code, "internal error (a bug: khd's log has it)"
        body = f"kh: {text}\n".encode("utf-8", "replace")
        self.status = f"{code} {http.HTTPStatus(code).phrase}"
        self.response_headers.append(("Content-Type", "text/plain; charset=utf-8"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)
