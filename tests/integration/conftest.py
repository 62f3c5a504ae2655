"""Guest tests: real ppce500 nodes booted from images/out.

Each test's node console goes to tests/artifacts/<test>/; the directory is kept only when the
test fails, so a red CI run carries every node's console log.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from kh import boot
from kh.settings import Paths, paths

ARTIFACTS = Path(__file__).resolve().parents[2] / "tests" / "artifacts"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # type: ignore[no-untyped-def]
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture(scope="session")
def kh_paths() -> Paths:
    p = paths()
    for name in ("u-boot.elf", "uImage", "shell.cpio.gz.uimg"):
        if not (p.out / name).exists():
            pytest.fail(f"images/out/{name} is missing: run `make images` (make test does)")
    return p


@pytest.fixture
def artifacts(request: pytest.FixtureRequest) -> Iterator[Path]:
    d = ARTIFACTS / re.sub(r"[^\w.-]+", "_", request.node.nodeid)
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    yield d
    failed = any(getattr(request.node, f"rep_{w}", None) is not None
                 and getattr(request.node, f"rep_{w}").failed for w in ("setup", "call"))
    if failed:
        logs = sorted(d.glob("*.log"))
        print(f"\nconsole logs kept: {', '.join(str(p) for p in logs)}")
    else:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def boot_config(kh_paths: Paths, artifacts: Path):  # type: ignore[no-untyped-def]
    def make(name: str = "node", **kw):  # type: ignore[no-untyped-def]
        kw.setdefault("console_log", artifacts / f"{name}.console.log")
        return boot.default_config(kh_paths, **kw)

    return make
