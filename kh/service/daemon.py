"""khd itself: start the service, serve its API, stop cleanly on SIGTERM.

Nodes are not stopped with khd: they keep running (and keep their allocations) until released
or `kh clean`, and the next khd finds them again. Starts still under way when khd stops are
ended, QEMU and all; the next khd starts those nodes again.
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import signal
import socket
import sys
import threading

from kh.allocation import host_address
from kh.cc.keys import host_key
from kh.cc.sshd import SshServer
from kh.errors import KhError
from kh.hw import netns as nsutil
from kh.model import PUBLIC
from kh.page.serve import page_server
from kh.service import api, config, httpd, statedir
from kh.service.access import ServiceAccess
from kh.service.config import ServiceConfig
from kh.service.core import Service
from kh.service.preflight import check_images

log = logging.getLogger("kh.khd")


def run(cfg: ServiceConfig) -> int:
    check_images(cfg)  # before anything is created
    statedir.prepare(cfg)  # the state directory, run/ and logs/, each marked as kh's
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    # First of all: from here on `kh service stop` and `kh clean` find this khd, even while it
    # is still setting up.
    cfg.pidfile.write_text(f"{os.getpid()}\n")
    svc: Service | None = None
    sshd: SshServer | None = None
    servers: list[httpd.HttpServer] = []
    try:
        svc = Service(cfg)
        svc.start()  # the pool fills in the background; `kh service start` waits for it
        app = api.App(svc)
        public = str(host_address(PUBLIC).ip)
        svc.fabric.ensure_domain(PUBLIC)
        # 127.0.0.1 and the public domain's address (a socket made in the fabric's namespace
        # stays there): one server, each listener with its own connection limits. Nodes' one
        # answers GETs only: secrets come over the control channel (kh.service.chanapi).
        tcp = [httpd.bind_tcp("127.0.0.1", cfg.api_port)]
        tcp.append(nsutil.run_in(cfg.fabric.netns,
                                 lambda: httpd.bind_tcp(public, cfg.api_port)))
        servers.append(httpd.HttpServer(app, tcp, name="api-tcp", public=tcp[1:]))
        sshd = SshServer(ServiceAccess(svc), host_key(cfg.host_key))
        sshd.listen(listen_tcp("127.0.0.1", cfg.ssh_port))
        sshd.listen(nsutil.run_in(cfg.fabric.netns, lambda: listen_tcp(public, cfg.ssh_port)))
        page = page_server(svc, cfg)  # the live page (kh.page), when it has a port
        if page is not None:
            servers.append(page)
        # The unix socket last: once it exists, khd answers on every listener. It lives in the
        # operator's 0700 run directory, and each peer's uid is checked (SO_PEERCRED) too.
        servers.append(api.UnixServer(cfg.socket, app))
        os.chmod(cfg.socket, 0o600)
        for s in servers:
            s.start()
        log.warning("khd %d serving on %s, 127.0.0.1:%d and %s:%d (fabric), ssh on port %d; "
                    "%d nodes", os.getpid(), cfg.socket, cfg.api_port, public, cfg.api_port,
                    cfg.ssh_port, cfg.nodes)
        if page is not None:
            log.warning("khd's live page on http://127.0.0.1:%d/", cfg.page_port)
        stop.wait()
    finally:
        if svc is not None:  # first: no node start begins while the listeners drain
            svc.pool.stop()
        if sshd is not None:
            sshd.close()
        for s in servers:
            s.shutdown()
            s.server_close()
        cfg.socket.unlink(missing_ok=True)
        if svc is not None:
            svc.shutdown()
        if cfg.pidfile.exists() and cfg.pidfile.read_text().strip() == str(os.getpid()):
            cfg.pidfile.unlink()
    return 0


def listen_tcp(addr: str, port: int) -> socket.socket:
    """The control channel's listening socket (KhError when the port is taken)."""
    s = httpd.bind_tcp(addr, port, "--ssh-port")
    s.listen(64)
    return s


# khd.log's size before it is rotated, and how many old logs are kept (khd.log.1 ...): a flood
# of bad requests or a noisy node cannot fill the disk through it.
LOG_BYTES = 4 * 1024 * 1024
LOG_KEEP = 3
LOG_FORMAT = "%(asctime)s khd[%(name)s]: %(message)s"


class _RotatingLog(logging.handlers.RotatingFileHandler):
    """khd.log, rotated; khd's stdout and stderr (where `kh service start` started it, and
    where a crash's traceback goes) follow the new file at each rotation."""

    def doRollover(self) -> None:
        super().doRollover()
        if self.stream is not None:
            for fd in (1, 2):
                os.dup2(self.stream.fileno(), fd)


def setup_logging(cfg: config.ServiceConfig, *, debug: bool = False) -> None:
    """Log to stderr; when stderr is khd.log itself (as `kh service start` runs khd), through
    a rotating handler instead: LOG_BYTES per file, LOG_KEEP old files, each 0600 (umask)."""
    handler: logging.Handler
    try:
        err, path = os.fstat(2), os.stat(cfg.khd_log)
        to_log = (err.st_dev, err.st_ino) == (path.st_dev, path.st_ino)
    except OSError:
        to_log = False
    if to_log:
        sys.stderr.flush()
        handler = _RotatingLog(cfg.khd_log, maxBytes=LOG_BYTES, backupCount=LOG_KEEP)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, handlers=[handler],
                        force=True)
    logging.getLogger("pyroute2").setLevel(logging.WARNING)
    logging.getLogger("asyncio").setLevel(logging.WARNING)
    # waitress's own warnings are about load (queue depth, the connection limit): at a flood
    # they would come once a request; khd's limits are documented instead
    logging.getLogger("waitress").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="khd", description="kh's service (usually started by "
                                 "`kh service start`)")
    ap.add_argument("--foreground", action="store_true", help="run here, log to stderr")
    ap.add_argument("--debug", action="store_true")
    config.add_options(ap)
    args = ap.parse_args(argv)
    # Everything khd writes (database, host key, console logs that can hold boot keys, sockets,
    # its own log) is the operator's alone: no other local user reads a principal's console or
    # credentials.
    os.umask(0o077)
    if not args.foreground:
        print("khd: use `kh service start` to run it in the background, or --foreground",
              file=sys.stderr)
        return 2
    cfg = config.from_options(args)
    setup_logging(cfg, debug=args.debug)
    try:
        return run(cfg)
    except KhError as e:
        print(f"khd: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
