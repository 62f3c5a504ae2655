"""khd itself: start the service, serve its API, stop cleanly on SIGTERM.

Nodes are not stopped with khd: they keep running (and keep their allocations) until released
or `kh clean`, and the next khd finds them again. Starts still under way when khd stops are
ended, QEMU and all; the next khd starts those nodes again.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from typing import Any

from kh.allocation import host_address
from kh.cc.sshd import SshServer, host_key
from kh.errors import KhError
from kh.hw import netns as nsutil
from kh.model import PUBLIC
from kh.service import api, config, statedir
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
    servers: list[Any] = []
    served: list[Any] = []
    try:
        svc = Service(cfg)
        svc.start()  # the pool fills in the background; `kh service start` waits for it
        handler = api.handler_for(svc)
        servers.append(api.tcp_server("127.0.0.1", cfg.api_port, handler))
        public = str(host_address(PUBLIC).ip)
        svc.fabric.ensure_domain(PUBLIC)
        servers.append(nsutil.run_in(cfg.fabric.netns,
                                     lambda: api.tcp_server(public, cfg.api_port, handler)))
        sshd = SshServer(ServiceAccess(svc), host_key(cfg.host_key))
        sshd.listen(listen_tcp("127.0.0.1", cfg.ssh_port))
        sshd.listen(nsutil.run_in(cfg.fabric.netns, lambda: listen_tcp(public, cfg.ssh_port)))
        # The unix socket last: once it exists, khd answers on every listener.
        cfg.socket.unlink(missing_ok=True)
        servers.append(api.UnixServer(str(cfg.socket), handler))
        os.chmod(cfg.socket, 0o660)
        for s in servers:
            api.serve(s)
            served.append(s)
        log.warning("khd %d serving on %s, 127.0.0.1:%d and %s:%d (fabric), ssh on port %d; "
                    "%d nodes", os.getpid(), cfg.socket, cfg.api_port, public, cfg.api_port,
                    cfg.ssh_port, cfg.nodes)
        stop.wait()
    finally:
        if sshd is not None:
            sshd.close()
        for s in servers:
            if s in served:
                s.shutdown()
            s.server_close()
        cfg.socket.unlink(missing_ok=True)
        if svc is not None:
            svc.shutdown()
        if cfg.pidfile.exists() and cfg.pidfile.read_text().strip() == str(os.getpid()):
            cfg.pidfile.unlink()
    return 0


def listen_tcp(addr: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((addr, port))
    except OSError as e:
        s.close()
        raise KhError(f"cannot listen on {addr}:{port}: {e.strerror}",
                      "pick another port with --ssh-port") from None
    s.listen(64)
    return s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="khd", description="kh's service (usually started by "
                                 "`kh service start`)")
    ap.add_argument("--foreground", action="store_true", help="run here, log to stderr")
    ap.add_argument("--debug", action="store_true")
    config.add_options(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(asctime)s khd[%(name)s]: %(message)s", stream=sys.stderr)
    logging.getLogger("pyroute2").setLevel(logging.WARNING)
    logging.getLogger("asyncio").setLevel(logging.WARNING)
    if not args.foreground:
        print("khd: use `kh service start` to run it in the background, or --foreground",
              file=sys.stderr)
        return 2
    cfg = config.from_options(args)
    # Everything khd writes (database, host key, console logs that can hold boot keys, sockets)
    # is the operator's alone: no other local user reads a principal's console or credentials.
    os.umask(0o077)
    try:
        return run(cfg)
    except KhError as e:
        print(f"khd: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
