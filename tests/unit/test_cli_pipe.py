"""`kh topo LAB | head -1` (issue 15, found trying it): a reader that has gone ends kh
quietly with 141 (128 + SIGPIPE), as other programs in a pipeline do, never 'kh: internal
error: BrokenPipeError'."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_a_closed_pipe_is_not_an_internal_error(tmp_path: Path) -> None:
    (tmp_path / "alicecred").write_text("s3cret-in-a-file\n")
    lab = tmp_path / "t.yaml"
    lab.write_text("principals:\n  alice: {credential: ./alicecred}\ngroups:\n"
                   "  web:\n    count: 3\n    appliance: worker\n")
    r, w = os.pipe()
    os.close(r)  # the reader is gone before kh writes
    try:
        p = subprocess.run([sys.executable, "-m", "kh.cli.main", "topo", str(lab)], stdout=w,
                           stderr=subprocess.PIPE, text=True, timeout=60,
                           env={**os.environ, "KH_STATE_DIR": str(tmp_path / "nokhd")})
    finally:
        os.close(w)
    assert (p.returncode, p.stderr) == (141, "")

