"""The worker's khwrite (appliance-builder/files/khwrite) under the host's POSIX shell: it
writes files in the background, one record per file with the sha256 of the bytes it wrote and
the phase it was written in; a failed write is recorded as an error and the writer goes on;
stop ends it; MAX bounds it."""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path

KHWRITE = Path(__file__).resolve().parents[2] / "appliance-builder" / "files" / "khwrite"


def khwrite(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(KHWRITE), *args], env={"PATH": "/usr/bin:/bin",
                                                        "KHWRITE_STATE": str(tmp / "state")},
                          capture_output=True, text=True, timeout=90)


def records(tmp: Path) -> list[list[str]]:
    return [line.split() for line in (tmp / "state" / "files").read_text().splitlines()]


def wait_for(tmp: Path, count: int) -> None:
    deadline = time.monotonic() + 30
    while len(records(tmp)) < count:
        assert time.monotonic() < deadline, records(tmp)
        time.sleep(0.05)


def test_files_carry_the_sha256_and_phase_they_were_written_with(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert khwrite(tmp_path, "phase", "before").returncode == 0
    r = khwrite(tmp_path, "start", str(out), "16", "1000")
    assert r.returncode == 0 and "writing 16 KiB files" in r.stdout, r
    wait_for(tmp_path, 2)
    assert khwrite(tmp_path, "phase", "during").returncode == 0
    n = len(records(tmp_path))
    wait_for(tmp_path, n + 2)
    assert khwrite(tmp_path, "start", str(out)).returncode == 1  # one writer at a time
    r = khwrite(tmp_path, "stop")
    assert r.returncode == 0 and "errors=0 state=stopped" in r.stdout, r
    recs = records(tmp_path)
    assert {x[3] for x in recs} == {"before", "during"}
    for name, sha, size, _, t0, t1 in recs:
        data = (out / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == sha and len(data) == int(size) == 16384
        assert float(t0) <= float(t1)
    assert sorted(p.name for p in out.iterdir()) == [x[0] for x in recs]


def test_a_failed_write_is_an_error_and_the_writer_goes_on(tmp_path):
    out = tmp_path / "out"
    (out / "f000002").mkdir(parents=True)  # the second file cannot be written
    r = khwrite(tmp_path, "start", str(out), "4", "4")
    assert r.returncode == 0, r
    deadline = time.monotonic() + 30
    while "state=running" in khwrite(tmp_path, "status").stdout:  # MAX ends it
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert [x[0] for x in records(tmp_path)] == ["f000001", "f000003", "f000004"]
    errors = (tmp_path / "state" / "errors").read_text().splitlines()
    assert len(errors) == 1 and errors[0].startswith("f000002 start "), errors
    assert "files=3 bytes=12288 errors=1 state=stopped" in khwrite(tmp_path, "status").stdout


def test_bad_arguments_are_refused(tmp_path):
    for args in (["start", str(tmp_path / "missing")], ["start", str(tmp_path), "0"],
                 ["start", str(tmp_path), "4", "x"], ["phase", "a b"], ["nonsense"]):
        r = khwrite(tmp_path, *args)
        assert r.returncode == 2, (args, r)
