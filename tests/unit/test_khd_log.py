"""Issue 10, "Also seen": 80 unauthenticated bad requests grew khd.log by 127 KB, never
rotated. khd, started as `kh service start` starts it (stdout and stderr on khd.log), now logs
through a rotating handler: bounded files, 0600, and stderr follows the current file."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap

from kh.service import statedir
from kh.service.config import ServiceConfig


def test_khd_log_rotates_and_stays_the_operators(tmp_path):
    cfg = ServiceConfig(state_dir=tmp_path / "state", images=tmp_path, nodes=1, prefix="ku")
    statedir.prepare(cfg)
    prog = textwrap.dedent(f"""
        import logging, os, sys
        from pathlib import Path
        from kh.service import daemon
        from kh.service.config import ServiceConfig
        os.umask(0o077)
        daemon.LOG_BYTES = 4000
        cfg = ServiceConfig(state_dir=Path({str(cfg.state_dir)!r}), images=Path("/"), nodes=1,
                            prefix="ku")
        daemon.setup_logging(cfg)
        for i in range(400):
            logging.getLogger("kh.api").warning("bad request %d from 10.1.0.5", i)
        print("khd: the last words", file=sys.stderr, flush=True)
    """)
    fd = os.open(cfg.khd_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with open(fd, "ab") as log:  # as kh.service.control starts khd
        subprocess.run([sys.executable, "-c", prog], stdout=log, stderr=log, check=True,
                       timeout=60)
    logs = sorted(p.name for p in cfg.logs.glob("khd.log*"))
    assert logs == ["khd.log", "khd.log.1", "khd.log.2", "khd.log.3"]
    for name in logs:
        p = cfg.logs / name
        assert p.stat().st_size <= 4000
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
        assert statedir.is_kh_file(cfg, p)  # kh clean removes the rotated ones too
    text = cfg.khd_log.read_text()
    assert "bad request 399 " in text and text.endswith("khd: the last words\n")


def test_khd_in_the_foreground_logs_to_its_terminal(tmp_path):
    """Not started by kh service start: stderr is not khd.log, and nothing is rotated."""
    cfg = ServiceConfig(state_dir=tmp_path / "state", images=tmp_path, nodes=1, prefix="ku")
    statedir.prepare(cfg)
    prog = textwrap.dedent(f"""
        import logging
        from pathlib import Path
        from kh.service import daemon
        from kh.service.config import ServiceConfig
        cfg = ServiceConfig(state_dir=Path({str(cfg.state_dir)!r}), images=Path("/"), nodes=1,
                            prefix="ku")
        daemon.setup_logging(cfg)
        logging.getLogger("kh.khd").warning("hello")
    """)
    r = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True,
                       timeout=60, check=True)
    assert r.stderr.endswith(" khd[kh.khd]: hello\n")
    assert not cfg.khd_log.exists()
