"""Small file helpers shared by the client, the server and the certificate tool.

Why one place: the hospital's state files, the server's schedule, the version-0 cache and
the certificate files all need the same guarantee -- after a crash or a power loss a reader
finds either the old file or the new one, never a torn mix -- and every copy of that code
was one more place to forget the fsync or the clean-up of the temporary file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

Writer = Callable[[BinaryIO], object]


def replace_file(path: Path, data: bytes | Writer, *, mode: int = 0o600,
                 durable: bool = True) -> None:
    """Replace ``path`` atomically with ``data`` (bytes, or a function writing to the file).

    The new bytes go to a temporary file in the same folder (a unique name, so two writers
    never share one), which is renamed over ``path``. ``durable`` fsyncs the file before the
    rename and the folder after it, so a power loss cannot leave an empty or half file in
    place. ``mode`` is the new file's permission (private unless a caller says otherwise).
    Errors propagate (OSError) after the temporary file is removed.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, bytes | bytearray | memoryview):
                f.write(data)
            else:
                data(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        sync_folder(path.parent)


def sync_folder(folder: Path) -> None:
    """fsync a folder so that a rename in it survives a power loss (best effort: some file
    systems refuse to open or sync folders, and the rename itself has happened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def file_sha256(path: Path) -> str | None:
    """sha256 of a file's bytes, or None when it cannot be read (missing, a folder, no
    permission): callers treat an unreadable file as "not the file I expected"."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def hold_lock(path: Path) -> BinaryIO:
    """Take an exclusive lock on ``path`` (created if missing) that lasts while the returned
    file stays open, and ends with the process however it ends (the kernel drops it).

    Why a lock and not a PID file: a PID file outlives a ``kill -9`` and then locks out the
    restart; an advisory lock cannot.  Raises ``BlockingIOError`` when another process holds
    it.  A filesystem that keeps no locks (some network mounts) gets the file unlocked rather
    than a refusal: the lock guards against a mistake, not an attacker.
    """
    import fcntl

    f = path.open("a+b")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise
    except OSError:
        pass
    return f


#: Locks this process holds: resolved path -> [open file, number of holders].  Holders in
#: one process share a lock (a server's tests build several servers on one store; a
#: hospital's ``send`` may ``get`` first): it keeps out other processes, not itself.
_SHARED: dict[Path, list] = {}
_SHARED_GUARD = threading.Lock()


def acquire(path: Path) -> Path:
    """Hold ``path``'s lock (:func:`hold_lock`) until :func:`release` of the returned key;
    ``BlockingIOError`` when another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    key = path.resolve()
    with _SHARED_GUARD:
        if key not in _SHARED:
            _SHARED[key] = [hold_lock(key), 0]
        _SHARED[key][1] += 1
    return key


def release(key: Path) -> None:
    with _SHARED_GUARD:
        entry = _SHARED.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] <= 0:
                entry[0].close()
                del _SHARED[key]


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """:func:`acquire` for the ``with`` block."""
    key = acquire(path)
    try:
        yield
    finally:
        release(key)
