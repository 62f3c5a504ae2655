"""What every kh command shares: --debug, logging, and turning KhError into `kh: ...`."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import select
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, TypeVar

import click

from kh.errors import KhError, ProcessError, Stopped
from kh.logview import one_line

F = TypeVar("F", bound=Callable[..., Any])


def setup_logging(debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="kh[%(name)s]: %(message)s", stream=sys.stderr)


def report(e: BaseException, debug: bool) -> int:
    """Print one line for a KhError (traceback only with --debug); return the exit code. The
    line is text a terminal only displays (kh.logview.one_line): an error may carry what a node
    printed or another host answered."""
    if debug:
        traceback.print_exception(e)
    if isinstance(e, KhError):
        click.echo(f"kh: {one_line(str(e))}", err=True)
        if isinstance(e, ProcessError) and e.output_tail and debug:
            click.echo(e.output_tail, err=True)
        return e.exit_code
    if isinstance(e, KeyboardInterrupt):
        click.echo("kh: interrupted", err=True)
        return 130
    click.echo(f"kh: internal error: {type(e).__name__}: {one_line(str(e))} (run with --debug "
               "and report it)", err=True)
    return 70


@contextlib.contextmanager
def stop_on_signals(signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
                    ) -> Iterator[None]:
    """Within the block, these signals raise ``Stopped`` in the main thread, so the ``with``
    blocks inside unwind (a node torn down, its QEMU reaped, its directory removed) and the
    command ends `kh: stopped by SIGTERM` with 128+signal.

    Only the first signal raises: a second one (Ctrl-C pressed again, `timeout -k`'s follow-up
    before its SIGKILL) must not cut short the teardown the first one began. The previous
    handlers come back on the way out.
    """
    fired: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        if fired:
            return
        fired.append(signum)
        raise Stopped(signum)

    old = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _stdout_gone() -> bool:
    """Is standard output a pipe whose reader has gone? Then it is pointed at /dev/null, so
    that nothing more (Python's own flush at exit included) fails writing to it."""
    try:
        fd = sys.stdout.fileno()
        poll = select.poll()
        poll.register(fd, select.POLLOUT)
        gone = any(ev & select.POLLERR for _, ev in poll.poll(0))
    except (OSError, ValueError):
        return False
    if gone:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
    return gone


def handle_errors(fn: F) -> F:
    """Run a command body; map exceptions to `kh: ...` and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        debug = bool(ctx.find_root().params.get("debug"))
        try:
            return fn(*args, **kwargs)
        except click.exceptions.Exit:
            raise
        except click.ClickException:
            raise
        except BrokenPipeError as e:
            if not _stdout_gone():
                ctx.exit(report(e, debug))
            ctx.exit(128 + signal.SIGPIPE)  # `kh ps | head -1`: the reader has had enough
        except (KhError, KeyboardInterrupt, Exception) as e:
            ctx.exit(report(e, debug))

    return wrapper  # type: ignore[return-value]


def entry(command: click.Command, name: str) -> Callable[[], None]:
    """A console-script entry point whose usage errors are one line: `kh: ... (hint)`."""

    def run() -> None:
        try:
            rv = command.main(prog_name=name, standalone_mode=False)
        except click.UsageError as e:
            click.echo(f"kh: {one_line(e.format_message())} (see {name} --help)", err=True)
            sys.exit(2)
        except click.exceptions.Abort:
            click.echo("kh: aborted", err=True)
            sys.exit(130)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)

    return run
