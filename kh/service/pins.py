"""What a node checks the service by (issue 11, item 3): the control channel's ssh host key,
handed to nodes in the ``kh.channel`` boot key, and the sha256 of each published image, listed
by ``GET /v1/images`` so that in-node fetchers refuse an image whose bytes differ.

docs/boot-keys.md says how a node uses them.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import paramiko

from kh.errors import KhError

# Bytes read at a time while hashing an image (the root's tar.gz is ~32 MB).
_BLOCK = 1 << 20


def channel_key(host_key: Path) -> str | None:
    """The control channel's public host key as one boot-key word, ``TYPE:BASE64``
    (``ssh-rsa:AAAAB3...``, 380 characters for kh's 2048-bit RSA key): an OpenSSH
    ``known_hosts`` entry with ``:`` for its space. dropbear's dbclient, the node's ssh client,
    compares the whole key blob (a fingerprint alone cannot go into its known_hosts).

    None when ``host_key`` (khd's private key file, made by kh.cc.keys.host_key at khd's
    start) does not exist yet. Raises KhError for a file that is not an RSA private key."""
    try:
        key = paramiko.RSAKey.from_private_key_file(str(host_key))
    except FileNotFoundError:
        return None
    except (OSError, paramiko.SSHException) as e:
        raise KhError(f"cannot read the channel's host key {host_key}: {e}") from None
    return f"{key.get_name()}:{key.get_base64()}"


def channel_boot_key(hostport: str, host_key: Path) -> str:
    """The value of ``kh.channel``: ``HOST:PORT#TYPE:BASE64``, or ``HOST:PORT`` alone while
    there is no host key (a node then has no pin, and khgetdisk refuses to use the channel)."""
    key = channel_key(host_key)
    return f"{hostport}#{key}" if key else hostport


class ImageSums:
    """sha256 (64 lowercase hex digits) of published image files, each computed once per
    version of the file: a file replaced or rewritten (another inode, size or mtime) is hashed
    again. Thread-safe; hashing runs outside the lock, so one large image does not hold up the
    others' answers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sums: dict[Path, tuple[tuple[int, int, int, int], str]] = {}

    def sha256(self, path: Path) -> str:
        """The hash of the regular file at ``path`` (links are not followed: a caller lists
        only regular files). Raises OSError when it cannot be read."""
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            version = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            with self._lock:
                known = self._sums.get(path)
            if known is not None and known[0] == version:
                return known[1]
            h = hashlib.sha256()
            while block := f.read(_BLOCK):
                h.update(block)
            digest = h.hexdigest()
            # a file written while it was read has another mtime now: not remembered
            after = os.fstat(f.fileno())
            if (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns):
                with self._lock:
                    self._sums[path] = (version, digest)
            return digest


# khd's one cache (images are few, and the same files for every request)
SUMS = ImageSums()
