"""`kh service start|clean` from the host side: settings checked in one place before anything
happens, a running khd's settings compared with the ones asked for, every signal unwinding a
start like Ctrl-C, khd dying mid-start reported as such, and `kh clean` removing only what
carries kh's marker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from kh.cli.main import main
from kh.client import NotRunning
from kh.errors import KhError, UsageError
from kh.service import config, control, preflight, statedir
from kh.service.config import ServiceConfig
from kh.service.pool import PoolStatus

DOCS = Path(__file__).resolve().parents[2] / "docs" / "service.md"


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for s in config.SETTINGS:
        if s.env:
            monkeypatch.delenv(s.env, raising=False)
    monkeypatch.setenv("KH_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("KH_PREFIX", "kuc")
    return tmp_path


def kh(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.output


# --- 3: every setting checked in one place, one line naming it and what is allowed ----------

@pytest.mark.parametrize(("var", "value", "text"), [
    ("KH_API_PORT", "abc", "KH_API_PORT must be a whole number from 1 to 65535, not 'abc'"),
    ("KH_NODES", "x", "KH_NODES must be a whole number from 1 to 1024, not 'x'"),
    ("KH_NODES", "0", "KH_NODES must be 1 to 1024, not 0"),
    ("KH_NODES", "5000", "KH_NODES must be 1 to 1024, not 5000"),
    ("KH_SSH_PORT", "70000", "KH_SSH_PORT must be 1 to 65535, not 70000"),
    ("KH_DOMAIN_QUOTA", "0", "KH_DOMAIN_QUOTA must be 1 to 251, not 0"),
    ("KH_PREFIX", "much-too-long", "KH_PREFIX must be a lowercase letter then up to 7"),
])
def test_a_bad_variable_is_a_usage_error_naming_it(env, monkeypatch, var, value, text):
    monkeypatch.setenv(var, value)
    with pytest.raises(UsageError) as e:
        config.from_env()
    assert str(e.value).startswith(text)
    rc, out = kh("ps")  # any command that reads the settings
    assert rc == 2 and out.startswith(f"kh: {text}") and out.count("\n") == 1, out


@pytest.mark.parametrize(("args", "text"), [
    (["--nodes", "-1"], "--nodes must be 1 to 1024, not -1"),
    (["--nodes", "0"], "--nodes must be 1 to 1024, not 0"),
    (["--port", "70000"], "--port must be 1 to 65535, not 70000"),
    (["--port", "0"], "--port must be 1 to 65535, not 0"),
    (["--domain-quota", "999"], "--domain-quota must be 1 to 251, not 999"),
])
def test_a_bad_option_is_refused_before_anything_is_made(env, args, text):
    rc, out = kh("service", "start", *args)
    assert (rc, out) == (2, f"kh: {text}\n")
    assert list(env.iterdir()) == []


def test_settings_in_range_pass_and_memory_is_checked_too(env, monkeypatch):
    monkeypatch.setenv("KH_NODES", "1024")
    monkeypatch.setenv("KH_API_PORT", "65535")
    cfg = config.from_env(api_port=1)
    assert (cfg.nodes, cfg.api_port) == (1024, 1)
    with pytest.raises(UsageError, match="--mem-mib must be 256 to 2048, not 64"):
        ServiceConfig(state_dir=env, images=env, mem_mib=64)


# --- 7: the environment is in --help, from the one description of the settings ------------

def test_help_lists_every_variable_the_settings_describe(env):
    variables = [s.env for s in config.SETTINGS if s.env]
    assert {"KH_STATE_DIR", "KH_PREFIX", "KH_API_PORT", "KH_SSH_PORT", "KH_NODES",
            "KH_QEMU"} <= set(variables)
    docs = DOCS.read_text()
    for args in (["service", "--help"], ["service", "start", "--help"]):
        rc, out = kh(*args)
        assert rc == 0
        assert all(v in out for v in variables), out
    assert [v for v in variables if v not in docs] == []


# --- 4: a running khd with other settings is not silently kept ------------------------------

@pytest.fixture
def running_khd(env: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """A process whose command line is a khd's of 8 nodes (what khd_pids looks for)."""
    monkeypatch.setattr(preflight, "check", lambda cfg: None)
    cfg = config.from_env(images=env)
    assert cfg.nodes == 8
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-m",
                          "kh.service.daemon", "--foreground", *config.to_argv(cfg)])
    try:
        # Seen once in a fresh root: start() did not find this process. Wait until khd_pids
        # sees it (or say why not) rather than race its exec.
        deadline = time.monotonic() + 10
        while p.pid not in control.khd_pids(cfg):
            assert p.poll() is None, f"the stand-in khd exited with {p.returncode}"
            assert time.monotonic() < deadline, (p.pid, cfg.state_dir, list(control._cmdlines()))
            time.sleep(0.01)
        yield cfg, p.pid
    finally:
        p.kill()
        p.wait()


def test_khd_running_with_other_settings_is_refused(running_khd):
    cfg, pid = running_khd
    asked = config.from_env(images=cfg.images, nodes=4)
    with pytest.raises(KhError) as e:
        control.start(asked, given=config.given(nodes=4))
    assert str(e.value) == "khd already running with 8 nodes, not 4 (kh service stop first)"
    other_port = config.from_env(images=cfg.images, nodes=8, api_port=cfg.api_port + 1)
    with pytest.raises(KhError, match=f"with API port {cfg.api_port}, not {cfg.api_port + 1}"):
        control.start(other_port, given={"nodes", "api_port"})
    # the default QEMU (kh's own) asked for by name is what the running khd (KH_QEMU unset)
    # uses; Debian's is another
    default_qemu = config.from_env(images=cfg.images, qemu=str(cfg.images / "qemu-system-ppc"))
    assert control.start(default_qemu, given={"qemu"}).already
    with pytest.raises(KhError, match=r"with QEMU .*qemu-system-ppc, not qemu-system-ppc"):
        control.start(config.from_env(images=cfg.images, qemu="qemu-system-ppc"),
                      given={"qemu"})
    # the same settings, or none asked for: it runs, and that is success
    assert control.start(config.from_env(images=cfg.images, nodes=8),
                         given={"nodes"}).already
    assert control.start(cfg, given=set()).pid == pid
    relative = config.from_env(images=cfg.images, state_dir=Path(os.path.relpath(
        cfg.state_dir)))  # the same directory, named relatively: the same khd
    assert control.start(relative, given={"state_dir"}).pid == pid



def test_a_running_khd_is_compared_before_the_hosts_checks(running_khd, monkeypatch):
    """TRIAL13: `kh service start --nodes 1000` beside a khd of 8 nodes was refused for memory
    ('start at most N: --nodes N'), and following that hint was refused again: the running
    khd's settings are what is wrong, and are said first."""
    cfg, pid = running_khd

    def no_memory(asked: ServiceConfig) -> None:
        raise KhError(f"{asked.nodes} nodes need about 56000 MiB more memory",
                      "start at most 400: --nodes 400")

    monkeypatch.setattr(preflight, "check", no_memory)
    with pytest.raises(KhError) as e:
        control.start(config.from_env(images=cfg.images, nodes=1000), given={"nodes"})
    assert str(e.value) == "khd already running with 8 nodes, not 1000 (kh service stop first)"
    assert control.start(cfg, given=set()).pid == pid  # running as asked: no host checks

# --- 2: every signal unwinds `kh service start` as Ctrl-C does ------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_during_start_unwinds_it(env, sig):
    """The signal arrives while control.start waits for the pool: its cleanup runs and kh
    ends with one line and 128+signal (before, SIGTERM and SIGHUP killed kh outright, leaving
    khd and its QEMUs running)."""
    unwound = env / "unwound"
    prog = textwrap.dedent(f"""
        import os, sys, time
        from kh.service import control
        from kh.cli.main import main
        def start(cfg, **kw):
            try:
                os.kill(os.getpid(), {int(sig)})
                time.sleep(30)
            except BaseException as e:
                open({str(unwound)!r}, "w").write(type(e).__name__)
                raise
        control.start = start
        main(["service", "start"], prog_name="kh")
    """)
    r = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "KH_STATE_DIR": str(env / "state")})
    assert (r.returncode, r.stderr) == (128 + sig, f"kh: stopped by {sig.name}\n")
    assert unwound.read_text() == "Stopped"


# --- 5: khd dying during start is always reported as that -----------------------------------

def test_khd_dying_mid_start_is_reported_with_its_last_line(env, monkeypatch):
    """khd answers once, then dies before the next question: the error is khd's exit with its
    last log line, never `khd is not running ... (start it with kh service start)`."""
    cfg = config.from_env(images=env)
    monkeypatch.setattr(preflight, "check", lambda cfg: None)
    cleaned = []
    monkeypatch.setattr(control, "clean", lambda cfg, keep_logs: cleaned.append(keep_logs))
    started = []

    def daemon(argv, logf, **kw):  # type: ignore[no-untyped-def]
        p = subprocess.Popen(["sh", "-c", "echo 'pool: giving up on the fabric'; sleep 60"],
                             stdout=logf, stderr=logf)
        started.append(p)
        return p

    monkeypatch.setattr(control.proc, "daemon", daemon)
    busy = PoolStatus(size=2, free=0, allocated=0, starting=2, retrying=0, failed=0, lost=0,
                      failures=())
    answers = iter([busy])

    def status(cfg: ServiceConfig) -> PoolStatus:
        try:
            return next(answers)
        except StopIteration:
            started[0].kill()  # khd dies between two questions
            started[0].wait()
            raise NotRunning(f"khd is not running (no socket at {cfg.socket})",
                             "start it with `kh service start`") from None

    monkeypatch.setattr(control, "_status", status)
    with pytest.raises(KhError) as e:
        control.start(cfg)
    assert str(e.value) == ("khd exited at start (killed by SIGKILL): pool: giving up on the "
                            f"fabric (log: {cfg.khd_log})")
    assert cleaned == [True]


# --- 1: kh clean removes only what carries kh's marker --------------------------------------

def test_clean_leaves_directories_kh_did_not_make(env):
    d = env / "state"
    (d / "logs").mkdir(parents=True)
    (d / "run").mkdir()
    (d / "logs" / "my-app.log").write_text("precious\n")
    cfg = config.from_env()
    done = control.clean(cfg)
    assert done == [f"left {d} alone: it has no {statedir.MARKER} marker, so kh did not make "
                    "it"]
    assert (d / "logs" / "my-app.log").read_text() == "precious\n" and (d / "run").is_dir()


def test_clean_removes_kh_files_only_and_says_what_it_kept(env):
    cfg = config.from_env()
    d = cfg.state_dir
    d.mkdir()
    (d / "notes.txt").write_text("mine\n")  # the state dir was there before kh
    statedir.prepare(cfg)
    rotated = [cfg.logs / "khd.log.1", cfg.logs / "node2.log.1", cfg.logs / "node2.log.2"]
    for p in (cfg.db, cfg.host_key, cfg.khd_log, cfg.console_log(2), cfg.qemu_log(2),
              cfg.pidfile, cfg.node_dir(2) / "qmp.sock", *rotated):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("kh's\n")
    (cfg.logs / "my-app.log").write_text("precious\n")
    (cfg.run / "node2.txt").write_text("not a node directory\n")
    done = control.clean(cfg)
    assert done == [
        f"removed {cfg.db}",
        f"kept {cfg.logs}: it holds files that are not kh's (my-app.log)",
        f"kept {cfg.run}: it holds files that are not kh's (node2.txt)",
        f"removed {cfg.host_key}",
        f"removed kh's files from {d} (kept the directory: kh did not make it)"]
    assert sorted(str(p.relative_to(d)) for p in d.rglob("*")) == sorted([
        "notes.txt", "logs", "logs/my-app.log", f"logs/{statedir.MARKER}", "run",
        "run/node2.txt", f"run/{statedir.MARKER}"])
    (cfg.logs / "my-app.log").unlink()
    (cfg.run / "node2.txt").unlink()
    assert control.clean(cfg) == [  # the state dir is no longer marked: left alone
        f"left {d} alone: it has no {statedir.MARKER} marker, so kh did not make it"]
    statedir.prepare(cfg)  # a later khd marks it again, and its run/ and logs/
    assert control.clean(cfg) == [
        f"removed {cfg.logs}", f"removed {cfg.run}",
        f"removed kh's files from {d} (kept the directory: kh did not make it)"]
    assert [p.name for p in d.iterdir()] == ["notes.txt"]


def test_clean_removes_a_state_dir_kh_made_whole(env):
    cfg = config.from_env()
    statedir.prepare(cfg)
    cfg.khd_log.write_text("x\n")
    assert control.clean(cfg, keep_logs=True) == [f"removed {cfg.run}"]
    assert cfg.khd_log.exists() and not cfg.run.exists()
    assert control.clean(cfg)[-1] == f"removed {cfg.state_dir}"
    assert not cfg.state_dir.exists()


# --- a failed start removes only what it made -------------------------------------------

@pytest.fixture
def failing_khd(env: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """start() whose khd exits at once with a one-line error, as a khd whose port is taken
    does; returns the config and the calls made to stop() and clean()."""
    monkeypatch.setattr(preflight, "check", lambda cfg: None)
    calls: list[str] = []
    monkeypatch.setattr(control, "stop", lambda cfg, *a, **k: calls.append("stop") or [])
    monkeypatch.setattr(control, "clean", lambda cfg, **k: calls.append("clean") or [])
    started: list[list[str]] = []

    def daemon(argv, log_file, **kw):  # type: ignore[no-untyped-def]
        started.append([str(a) for a in argv])
        return subprocess.Popen([sys.executable, "-c", "print('khd: port 7480 on 127.0.0.1 "
                                 "is in use (pick another with --port)'); raise SystemExit(2)"],
                                stdout=log_file, stderr=log_file)

    monkeypatch.setattr(control.proc, "daemon", daemon)
    return config.from_env(images=env), calls, started


def test_a_failed_start_into_an_existing_state_keeps_it(failing_khd):
    # Seen: after `kh service stop`, a start that failed (port taken) removed kh.db and run/:
    # every principal, allocation and domain was gone, and another principal took a name.
    cfg, calls, _ = failing_khd
    cfg.state_dir.mkdir(parents=True)
    cfg.db.write_bytes(b"the principals and allocations of a khd that ran before")
    with pytest.raises(KhError, match=r"port 7480 on 127\.0\.0\.1 is in use"):
        control.start(cfg)
    assert calls == ["stop"]
    assert cfg.db.read_bytes() == b"the principals and allocations of a khd that ran before"


def test_a_failed_first_start_removes_what_it_made(failing_khd):
    cfg, calls, _ = failing_khd
    with pytest.raises(KhError, match="in use"):
        control.start(cfg)
    assert calls == ["clean"]


def test_khd_imports_nothing_from_the_directory_it_was_started_in(failing_khd):
    # Seen: an http.py in the caller's directory was imported by root's khd (python -m puts
    # the directory first on sys.path).
    cfg, _, started = failing_khd
    with pytest.raises(KhError):
        control.start(cfg)
    argv = started[0]
    assert argv[1] == "-I" and argv[2:4] == ["-m", "kh.service.daemon"]
    isolated = subprocess.run([argv[0], "-I", "-c", "import sys; print(sys.path)"],
                              capture_output=True, text=True, cwd=cfg.state_dir.parent)
    assert "''" not in isolated.stdout and str(cfg.state_dir.parent) not in isolated.stdout
