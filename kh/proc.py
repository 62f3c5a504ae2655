"""Every external process kh starts goes through here.

Argument lists only (never a shell), the command logged under ``--debug``, and the child always
terminated and reaped, whichever way the caller leaves.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import os
import selectors
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from kh import deps
from kh.errors import ProcessError

log = logging.getLogger("kh.proc")

Argv = Sequence["str | os.PathLike[str]"]


def _fmt(argv: Argv) -> str:
    return shlex.join(str(a) for a in argv)


def _env(extra: Mapping[str, str] | None) -> dict[str, str] | None:
    if not extra:
        return None
    env = dict(os.environ)
    env.update(extra)
    return env


def _cannot_start(argv: Argv, e: OSError) -> ProcessError:
    """One line naming the program, why, and (when it is missing) the package that brings it."""
    if isinstance(e, FileNotFoundError) and e.filename in (str(argv[0]), None):
        return ProcessError(f"cannot start {argv[0]}: {e.strerror}",
                            deps.missing_hint(str(argv[0])))
    return ProcessError(f"cannot start {argv[0]}: {e.strerror}: {e.filename}")


def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Send ``sig`` to ``proc`` and, when it leads its own process group (kh starts children in
    a new session), to everything in that group: helpers it started go with it."""
    try:
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
            return
    except (ProcessLookupError, PermissionError):
        pass
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)


def terminate(proc: subprocess.Popen[bytes]) -> None:
    """Ask ``proc`` (and its process group) to stop, without waiting; ``reap`` waits."""
    if proc.poll() is None:
        _signal(proc, signal.SIGTERM)


def reap(proc: subprocess.Popen[bytes], grace: float = 5.0) -> int:
    """Terminate ``proc`` and its process group (SIGTERM, then SIGKILL after ``grace``) and
    wait for it."""
    if proc.poll() is None:
        _signal(proc, signal.SIGTERM)
        try:
            return proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _signal(proc, signal.SIGKILL)
    return proc.wait()


def start(argv: Argv, *, cwd: Path | None = None, env: Mapping[str, str] | None = None,
          stdin: Any = subprocess.DEVNULL, stdout: Any = None, stderr: Any = None,
          new_session: bool = True, cgroups: Sequence[Path] = ()) -> subprocess.Popen[bytes]:
    """Start ``argv`` in the background and hand the child over: the caller owns it and must
    end it with ``reap`` (khd's NodeManager does, for node QEMUs, which outlive khd).

    ``cgroups``: ``cgroup.procs`` files the child joins between fork and exec, so everything
    the program allocates is charged to them from its first byte.
    """
    log.debug("start: %s", _fmt(argv))
    fds: list[int] = []
    try:
        for path in cgroups:
            fds.append(os.open(path, os.O_WRONLY | os.O_CLOEXEC))
        return subprocess.Popen([str(a) for a in argv], cwd=cwd, env=_env(env), stdin=stdin,
                                stdout=stdout, stderr=stderr, start_new_session=new_session,
                                preexec_fn=_join(fds) if fds else None)
    except OSError as e:
        raise _cannot_start(argv, e) from e
    except subprocess.SubprocessError as e:  # only _join can fail between fork and exec
        raise ProcessError(f"cannot start {argv[0]}: it could not join its cgroup "
                           f"({', '.join(map(str, cgroups))})") from e
    finally:
        for fd in fds:
            os.close(fd)


def _join(fds: list[int]) -> Callable[[], None]:
    """A preexec function writing the child's PID to each already-open ``cgroup.procs``. It
    runs between fork and exec in a threaded parent (khd), so it takes no lock, imports
    nothing and allocates next to nothing: a few system calls on file descriptors."""

    def preexec() -> None:
        pid = str(os.getpid()).encode()
        for fd in fds:
            os.write(fd, pid)

    return preexec


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with(parent: int) -> Callable[[], None]:
    """A preexec function: the child gets SIGKILL when the thread that forked it ends.

    Runs in the forked child before exec, so it only calls a function resolved here, in the
    parent. The parent may already be gone by then (the signal would never come): then the
    child ends itself.
    """
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def preexec() -> None:
        if prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


@contextlib.contextmanager
def spawn(argv: Argv, *, cwd: Path | None = None, env: Mapping[str, str] | None = None,
          stdin: Any = subprocess.DEVNULL, stdout: Any = None, stderr: Any = None,
          grace: float = 5.0, new_session: bool = True,
          die_with_parent: bool = False) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``argv`` in the background; on exit from the block it is terminated and reaped.

    With ``die_with_parent`` the kernel also sends the child SIGKILL when the calling thread
    ends, however it ends (SIGKILL included), so the child cannot outlive a short-lived command
    like `kh boot`. Only for a caller whose thread lives as long as the child should: a
    service thread that ends would take its children along.
    """
    log.debug("spawn: %s", _fmt(argv))
    try:
        proc = subprocess.Popen([str(a) for a in argv], cwd=cwd, env=_env(env), stdin=stdin,
                                stdout=stdout, stderr=stderr,
                                start_new_session=new_session,
                                preexec_fn=_die_with(os.getpid()) if die_with_parent else None)
    except OSError as e:
        raise _cannot_start(argv, e) from e
    try:
        yield proc
    finally:
        reap(proc, grace)


def daemon(argv: Argv, log_file: Any, *, env: Mapping[str, str] | None = None
           ) -> subprocess.Popen[bytes]:
    """Start a long-lived daemon (khd) in its own session; it deliberately outlives the caller.

    The only process kh starts without reaping it: `kh service stop` ends it by PID.
    """
    log.debug("daemon: %s", _fmt(argv))
    try:
        return subprocess.Popen([str(a) for a in argv], env=_env(env), stdin=subprocess.DEVNULL,
                                stdout=log_file, stderr=log_file, start_new_session=True)
    except OSError as e:
        raise _cannot_start(argv, e) from e


def replace(argv: Argv) -> None:
    """Become ``argv`` (execvp): its exit status is the caller's, its stdio and terminal the
    caller's own, signals reach it directly. Returns only by raising ProcessError when it
    cannot start (a missing program named with the package that brings it)."""
    log.debug("exec: %s", _fmt(argv))
    try:
        os.execvp(str(argv[0]), [str(a) for a in argv])
    except OSError as e:
        raise _cannot_start(argv, e) from e


def run(argv: Argv, *, cwd: Path | None = None, env: Mapping[str, str] | None = None,
        input: bytes | None = None, check: bool = True, capture: bool = True,
        on_line: Callable[[str], None] | None = None, log_file: Path | None = None,
        timeout: float | None = None, what: str | None = None,
        limit: int | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to completion and return its output.

    With ``on_line`` every output line (stdout and stderr merged) is handed over as it comes,
    which is how long builds drive their progress display. With ``log_file`` the output is kept
    there as well. A failure raises ``ProcessError`` carrying the output's tail. ``limit``
    (bytes; captured output without ``on_line``/``log_file``): a program printing more, on
    stdout and stderr together, is stopped and a ProcessError names it (what another host
    answers is read this way, so it cannot fill kh's memory).
    """
    log.debug("run: %s%s", _fmt(argv), f"  (in {cwd})" if cwd else "")
    tail: collections.deque[str] = collections.deque(maxlen=40)
    chunks: list[str] = []
    merged = on_line is not None or log_file is not None
    try:
        proc = subprocess.Popen(
            [str(a) for a in argv], cwd=cwd, env=_env(env),
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE if (capture or merged) else None,
            stderr=subprocess.STDOUT if merged else (subprocess.PIPE if capture else None),
            start_new_session=True)
    except OSError as e:
        raise _cannot_start(argv, e) from e
    stderr_text = ""
    try:
        if merged:
            assert proc.stdout is not None
            if input is not None and proc.stdin:
                proc.stdin.write(input)
                proc.stdin.close()
            logf = open(log_file, "a", encoding="utf-8") if log_file else None
            try:
                for raw in proc.stdout:
                    line = raw.decode("utf-8", "replace")
                    tail.append(line)
                    if capture:
                        chunks.append(line)
                    if logf:
                        logf.write(line)
                    if on_line:
                        on_line(line.rstrip("\n"))
            finally:
                if logf:
                    logf.close()
            proc.wait(timeout=timeout)
        else:
            if limit is not None and capture:
                out, err = _bounded(proc, input, timeout, limit, what or str(argv[0]))
            else:
                out, err = proc.communicate(input=input, timeout=timeout)
            if out is not None:
                chunks.append(out.decode("utf-8", "replace"))
            if err is not None:
                stderr_text = err.decode("utf-8", "replace")
                tail.extend(stderr_text.splitlines(keepends=True)[-40:])
    except subprocess.TimeoutExpired as e:
        raise ProcessError(f"{what or argv[0]} did not finish in {timeout:.0f} s",
                           "see --debug for the command") from e
    finally:
        reap(proc)
    stdout_text = "".join(chunks)
    if check and proc.returncode != 0:
        if not merged and not stderr_text:
            tail.extend(stdout_text.splitlines(keepends=True)[-40:])
        raise ProcessError(f"{what or Path(str(argv[0])).name} failed with exit code "
                           f"{proc.returncode}", f"command: {_fmt(argv)[:200]}",
                           returncode=proc.returncode, output_tail="".join(tail))
    return subprocess.CompletedProcess([str(a) for a in argv], proc.returncode,
                                       stdout_text, stderr_text)


def _bounded(proc: subprocess.Popen[bytes], input: bytes | None, timeout: float | None,
             limit: int, what: str) -> tuple[bytes, bytes]:
    """``proc.communicate`` that holds at most ``limit`` bytes of output (stdout and stderr
    together): past it the program is stopped (the caller reaps it) and ProcessError raised;
    subprocess.TimeoutExpired after ``timeout`` s, as communicate."""
    assert proc.stdout is not None and proc.stderr is not None
    deadline = None if timeout is None else time.monotonic() + timeout
    got: dict[int, list[bytes]] = {proc.stdout.fileno(): [], proc.stderr.fileno(): []}
    total = 0
    pending = memoryview(input or b"")
    with selectors.DefaultSelector() as sel:
        for fd in got:
            sel.register(fd, selectors.EVENT_READ)
        if proc.stdin is not None:
            if pending:
                os.set_blocking(proc.stdin.fileno(), False)
                sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE)
            else:
                proc.stdin.close()
        while sel.get_map():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(proc.args, timeout or 0)
            for key, _ in sel.select(left):
                if key.fd in got:
                    data = os.read(key.fd, 65536)
                    if not data:
                        sel.unregister(key.fd)
                        continue
                    total += len(data)
                    if total > limit:
                        raise ProcessError(f"{what} printed more than {limit} bytes",
                                           "is that the program kh expects there?")
                    got[key.fd].append(data)
                else:
                    assert proc.stdin is not None
                    try:
                        pending = pending[os.write(key.fd, pending[:65536]):]
                    except BrokenPipeError:
                        pending = memoryview(b"")
                    if not pending:
                        sel.unregister(key.fd)
                        proc.stdin.close()
    out, err = b"".join(got[proc.stdout.fileno()]), b"".join(got[proc.stderr.fileno()])
    proc.stdout.close()
    proc.stderr.close()
    left = None if deadline is None else max(0.0, deadline - time.monotonic())
    proc.wait(timeout=left)
    return out, err
