"""Guest tests: real ppce500 nodes booted from images/out.

Each test's node console goes to tests/artifacts/<test>/; the directory is kept only when the
test fails, so a red CI run carries every node's console log.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import NetNS, netns

from kh import boot, textobj
from kh.hw import uboot
from kh.hw.console import Console
from kh.scenario import Principal, Scenario
from kh.service import control
from kh.service.config import ServiceConfig
from kh.settings import Paths, paths

ARTIFACTS = Path(__file__).resolve().parents[2] / "tests" / "artifacts"
NODES = 6


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # type: ignore[no-untyped-def]
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture(scope="session")
def kh_paths() -> Paths:
    p = paths()
    for name in ("u-boot.elf", "uImage", "shell.cpio.gz.uimg", "qemu-system-ppc"):
        if not (p.out / name).exists():
            pytest.skip(f"images/out/{name} is missing: run `make images` (make test does)")
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def outside() -> Iterator[str]:
    """The external domain's "outside world": a namespace of the test's own."""
    name = f"khtest-out{os.getpid()}"
    netns.create(name)
    with NetNS(name) as ns:
        ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
    yield name
    netns.remove(name)


@contextlib.contextmanager
def running_khd(request: pytest.FixtureRequest, state: Path, kh_paths, *, keep_as: str,
                **settings: Any) -> Iterator[ServiceConfig]:
    """A khd of the test's own (free ports, ``settings`` on top), cleaned away afterwards; if a
    test failed meanwhile, its khd.log and every node's console log are kept under
    tests/artifacts/``keep_as``."""
    if os.geteuid() != 0:
        pytest.skip("the service tests need root (network namespaces, bridges, taps)")
    cfg = ServiceConfig(state_dir=state, images=kh_paths.out, api_port=free_port(),
                        ssh_port=free_port(), **settings)
    failed_before = request.session.testsfailed
    try:
        control.start(cfg)
        yield cfg
    finally:
        if request.session.testsfailed > failed_before and cfg.logs.exists():
            keep = ARTIFACTS / keep_as
            shutil.rmtree(keep, ignore_errors=True)
            shutil.copytree(cfg.logs, keep)
            print(f"\nkhd and node console logs kept in {keep}")
        control.clean(cfg)


def uplinked_khd(keep_as: str, prefix: str, **settings: Any):  # type: ignore[no-untyped-def]
    """A module's ``khd`` fixture (``khd = uplinked_khd(...)`` in the module): a khd of its own
    (running_khd, logs kept as ``keep_as``) whose external domain is the session's outside
    world, its prefix ``prefix`` and the test process's id, ``settings`` on top (nodes ...)."""

    @pytest.fixture(scope="module", name="khd")
    def fixture(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                kh_paths: Paths, outside: str) -> Iterator[ServiceConfig]:
        """A khd of the module's own; its external domain is the session's outside world."""
        with running_khd(request, tmp_path_factory.mktemp("khd") / "state", kh_paths,
                         keep_as=keep_as, prefix=f"{prefix}{os.getpid() % 10000}",
                         uplink_netns=outside, **settings) as cfg:
            yield cfg

    return fixture


khd = uplinked_khd("khd-logs", "kt", nodes=NODES)


def keep_dir(src: Path, dest: Path) -> None:
    """Copy a test's working directory (lab states, reports, console logs) to ``dest`` under
    tests/artifacts, which CI keeps: its credential files (``*cred``) left out."""
    shutil.copytree(src, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*cred"))


def env(cfg: ServiceConfig) -> dict[str, str]:
    extra = {"KH_QEMU": cfg.qemu} if cfg.qemu else {}
    outer = {k: v for k, v in os.environ.items() if k != "KH_CREDENTIAL"}  # tests pass -c
    return {**outer, "KH_STATE_DIR": str(cfg.state_dir), "KH_PREFIX": cfg.prefix,
            "KH_API_PORT": str(cfg.api_port), "KH_SSH_PORT": str(cfg.ssh_port),
            "KH_IMAGES_OUT": str(cfg.images), "KH_NODES": str(cfg.nodes), **extra}


def khget(cfg: ServiceConfig, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kh.cli.khget", *args], env=env(cfg),
                          capture_output=True, text=True, timeout=120)


def kh(cfg: ServiceConfig, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kh.cli.main", *args], env=env(cfg),
                          capture_output=True, text=True, timeout=120)


def ps(cfg: ServiceConfig) -> dict:
    r = kh(cfg, "ps", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def allocate(cfg: ServiceConfig, *args: str) -> tuple[int, list[int], list[str]]:
    r = khget(cfg, *args)
    assert r.returncode == 0, r.stderr
    obj = textobj.parse(r.stdout)
    return obj.id, [n.number for n in obj.nodes], r.stdout.splitlines()


def principal(user: str, secret: str) -> Principal:
    """A principal of the tests, its credential in a file of its own (credfile)."""
    return Principal(user, Path(credfile(secret)))


def scenario(cfg: ServiceConfig, who: Principal, artifacts: Path, name: str = "scenario"
             ) -> Scenario:
    """kh.scenario against the test's khd: node consoles and the report go to ``artifacts``
    (kept when the test fails); khdo's peripcmd runs in the test's outside world."""
    e = env(cfg)
    if cfg.uplink_netns:
        e["KHDO_NETNS"] = cfg.uplink_netns
    return Scenario(who, env=e, images=cfg.images, logs=artifacts, name=name)


def shell(cfg: ServiceConfig, node: int, artifacts: Path) -> boot.BootedNode:
    """Through the node's console: `run kboot` into the preloaded shell appliance."""
    con = Console(cfg.node_dir(node) / "console.sock", artifacts / f"node{node}.console.log",
                  name=f"node{node}")
    con.connect(5)
    start = con.mark()
    con.write(b"\n")
    con.expect(uboot.UBOOT_PROMPT, 10, stage="U-Boot prompt", start=start)
    return boot.BootedNode(con, uboot.run_kboot(con, 60))


_CRED_DIR: list[Path] = []


def credfile(secret: str) -> str:
    """A file holding ``secret``, readable by root only: what `-c FILE` takes (a credential is
    never put on a command line)."""
    if not _CRED_DIR:
        _CRED_DIR.append(Path(tempfile.mkdtemp(prefix="kh-test-cred-")))
        atexit.register(shutil.rmtree, _CRED_DIR[0], True)
    path = _CRED_DIR[0] / hashlib.sha256(secret.encode()).hexdigest()[:16]
    if not path.exists():
        path.write_text(secret + "\n")
        path.chmod(0o600)
    return str(path)


def release(cfg: ServiceConfig, user: str, cred: str, alloc: int) -> None:
    r = kh(cfg, "release", "-u", user, "-c", credfile(cred), str(alloc))
    assert r.returncode == 0, r.stderr


def kill_khd(cfg: ServiceConfig, timeout: float = 10) -> None:
    """SIGKILL khd, as a crash would (its QEMUs run on), and wait until it is gone; asserts
    that it ran and went within ``timeout`` seconds."""
    pid = control.pid_of(cfg)
    assert pid, "khd is not running"
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while control.pid_of(cfg) == pid:
        assert time.monotonic() < deadline, f"khd {pid} still there {timeout} s after SIGKILL"
        time.sleep(0.1)


def khd_log_mark(cfg: ServiceConfig) -> int:
    """Where khd.log ends now (bytes), for wait_khd_log to read only what comes after."""
    try:
        return cfg.khd_log.stat().st_size
    except FileNotFoundError:
        return 0


def wait_khd_log(cfg: ServiceConfig, pattern: str, since: int, timeout: float = 60) -> str:
    """Until a line matching ``pattern`` (a regex) is in khd.log after byte ``since``
    (khd_log_mark); returns that line. Asserts it came within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        with open(cfg.khd_log, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        if m := re.search(f"^.*(?:{pattern}).*$", text, re.M):
            return m.group(0)
        assert time.monotonic() < deadline, f"no {pattern!r} in khd.log within {timeout} s"
        time.sleep(0.2)


def wait_free(cfg: ServiceConfig, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while sum(n["state"] == "free" for n in ps(cfg)["nodes"]) < count:
        assert time.monotonic() < deadline, ps(cfg)
        time.sleep(0.3)




def skip_without_private_mounts() -> None:
    """Skip unless this root can give a process mounts of its own (kh's libvirtd needs them:
    `unshare --mount --propagation private`). A chroot whose / is no mount point cannot
    ('cannot change root filesystem propagation'); a machine can, and so can make
    check-fresh's root, bind-mounted onto itself before the chroot."""
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "true"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip("kh's libvirtd needs a mount namespace with private propagation, and "
                    f"here: {r.stderr.strip()}")
