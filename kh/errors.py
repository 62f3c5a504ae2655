"""One exception family: library code raises these, only the CLI turns them into exit codes."""

from __future__ import annotations

import signal


class KhError(Exception):
    """Base of every error kh reports to a user.

    ``hint`` says what to do about it; the CLI prints ``kh: <message> (<hint>)``.
    """

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


class UsageError(KhError):
    """The user asked for something malformed."""

    exit_code = 2


class ProcessError(KhError):
    """An external program failed."""

    def __init__(self, message: str, hint: str | None = None, *, returncode: int = 1,
                 output_tail: str = "") -> None:
        super().__init__(message, hint)
        self.returncode = returncode
        self.output_tail = output_tail


class ImageError(KhError):
    """An image (kernel, U-Boot, ramdisk) is missing, corrupt or failed to build."""


class SpecError(KhError):
    """An appliance spec or image recipe is malformed or asks for something impossible."""


class BootError(KhError):
    """A node did not reach the stage it was driven to."""


class KhTimeout(BootError):
    """A node did not print what was expected in time."""


class Stopped(KhError):
    """kh was stopped by a signal (raised by the CLI's handler, never by library code), so that
    every ``with`` block unwinds and tears down what it started; the exit code is 128+signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum
        self.exit_code = 128 + signum
