"""A principal's side of the control channel: ssh (paramiko) to con<ID>@<server>.

khdo uses only this, so it reaches nodes exactly the way any principal's own client could.
"""

from __future__ import annotations

import os
import select
import sys
import termios
import time
import tty
from pathlib import Path

import paramiko

from kh.errors import KhError


class ChannelError(KhError):
    """The control channel refused us or broke."""


class ChannelClient:
    def __init__(self, user: str, host: str, port: int, *, password: str | None = None,
                 key_file: Path | None = None, timeout: float = 30.0) -> None:
        self.client = paramiko.SSHClient()
        # khd's host key is made on its first start; trust on first use, like ssh would ask.
        self.client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        try:
            self.client.connect(host, port=port, username=user, password=password,
                                key_filename=str(key_file) if key_file else None,
                                look_for_keys=password is None and key_file is None,
                                allow_agent=password is None, timeout=timeout,
                                banner_timeout=timeout, auth_timeout=timeout)
        except paramiko.AuthenticationException:
            self._abandon()
            raise ChannelError(f"{user}@{host} refused our credential",
                               "pass the principal's credential with -c or register a key "
                               "with `kh key add`") from None
        except (OSError, paramiko.SSHException) as e:
            self._abandon()
            raise ChannelError(f"cannot reach the control channel {user}@{host}:{port}: {e}",
                               "is khd running? the ssh port is KH_SSH_PORT (7422)") from None

    def _abandon(self) -> None:
        """A refused login leaves the connection open, and khd counts it against this host's
        logins under way until its login timeout: close it now."""
        self.client.close()

    def close(self) -> None:
        self.client.close()

    def _session(self) -> paramiko.Channel:
        """A new session channel, or ChannelError saying why khd refused it."""
        transport = self.client.get_transport()
        if transport is None or not transport.is_active():
            raise ChannelError("the control channel closed")
        try:
            return transport.open_session(timeout=30)
        except paramiko.ChannelException as e:
            if e.code == paramiko.OPEN_FAILED_RESOURCE_SHORTAGE:
                raise ChannelError("khd refused another session on the control channel",
                                   "too many open: close some (docs/control-channel.md, "
                                   "Limits)") from None
            raise ChannelError("khd refused a session on the control channel",
                               "the allocation was released, the key revoked, or the node "
                               "left it") from None
        except (paramiko.SSHException, EOFError, OSError) as e:
            raise ChannelError(f"the control channel closed: {e}") from None

    def open(self, command: str) -> paramiko.Channel:
        """A session running the channel command ``command`` (``raw``, ``tagged``), left open
        for the caller to read and write as a stream (kh.scenario's consoles); ChannelError
        when khd refuses it."""
        chan = self._session()
        try:
            chan.exec_command(command)
        except (paramiko.SSHException, EOFError, OSError) as e:
            chan.close()
            raise ChannelError(f"the control channel refused {command!r}: {e}") from None
        return chan

    def exec(self, command: str, data: bytes = b"", *, on_output=None,  # type: ignore[no-untyped-def]
             read_for: float | None = None) -> tuple[bytes, bytes, int]:
        """Run a channel command; send ``data`` then EOF (or, with ``read_for``, send nothing
        and read that long). Returns (stdout, stderr, exit status)."""
        chan = self._session()
        try:
            chan.exec_command(command)
        except (paramiko.SSHException, EOFError, OSError) as e:
            raise ChannelError(f"the control channel refused {command!r}: {e}") from None
        if data:
            chan.sendall(data)
        out = bytearray()
        err = bytearray()
        deadline = time.monotonic() + read_for if read_for is not None else None
        if read_for is None:
            chan.shutdown_write()
        chan.settimeout(0.2)
        while True:
            if deadline is not None and time.monotonic() > deadline:
                chan.close()
                return bytes(out), bytes(err), 0
            try:
                chunk = chan.recv(65536)
            except TimeoutError:
                chunk = None
            if chunk:
                out += chunk
                if on_output:
                    on_output(chunk)
            while chan.recv_stderr_ready():
                err += chan.recv_stderr(65536)
            if chunk == b"" or (chunk is None and chan.exit_status_ready()
                                and not chan.recv_ready()):
                break
        status = chan.recv_exit_status()
        while chan.recv_stderr_ready():
            err += chan.recv_stderr(65536)
        return bytes(out), bytes(err), status

    def interactive(self) -> None:
        """The terminal on the channel (a pty session); `~.` at a line start leaves."""
        chan = self._session()
        chan.get_pty(term=os.environ.get("TERM", "vt100"))
        chan.invoke_shell()
        try:
            fd = os.open("/dev/tty", os.O_RDWR)
        except OSError:
            raise ChannelError("khdo console needs a terminal") from None
        old = termios.tcgetattr(fd)
        print("kh: on the control channel; ~. at the start of a line leaves",
              file=sys.stderr)
        try:
            tty.setraw(fd)
            at_line_start, tilde = True, False
            while not chan.closed:
                r, _, _ = select.select([fd, chan], [], [], 0.5)
                if chan in r:
                    data = chan.recv(65536)
                    if not data:
                        break
                    os.write(fd, data)
                if fd in r:
                    data = os.read(fd, 1024)
                    if tilde and data.startswith(b"."):
                        break
                    tilde = at_line_start and data == b"~"
                    if not tilde:
                        chan.sendall(data)
                    at_line_start = data.endswith((b"\r", b"\n"))
        finally:
            termios.tcsetattr(fd, termios.TCSADRAIN, old)
            os.close(fd)
            chan.close()
