"""TEST-ONLY: pause a file write halfway, so a crash test can ``kill -9`` the server inside it.

``SECUREFL_TEST_PAUSE_WRITE=version`` (a new model version file, ``v*.sflm.tmp``) or
``=optimiser`` (the server optimiser's next state, ``server_opt.state.tmp``) makes that write
stop once half of its bytes are out: what is written so far is flushed and fsynced, a line
``securefl test hook: paused writing <path> at <n> bytes`` goes to stderr, and the writer
sleeps :data:`PAUSE_S` seconds before finishing normally.  Why a hook: polling for a temporary
file and killing on sight is racy (a fast machine finishes the write first, and another
``.tmp`` may appear earlier); with the pause the kill lands inside the write every time.

Used by ``tests/reliability/test_crash.py`` and ``test_faults.py`` only (``renamed``: stop
right after a version file's rename; ``SECUREFL_TEST_FAIL_WRITE``: injected storage
faults).  Never set them on a real server: a pausing server publishes every version minutes
late.  Unset (always, outside those tests), each check is one environment lookup.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from typing import IO

ENV = "SECUREFL_TEST_PAUSE_WRITE"
PAUSE_S = 300.0


def armed(kind: str) -> bool:
    """Whether the test asked to pause writes of ``kind`` ("version" or "optimiser")."""
    return os.environ.get(ENV) == kind


def pause(kind: str, file: IO[bytes], path: object) -> None:
    """If armed for ``kind``: make ``file``'s bytes so far durable, say so, and sleep."""
    if not armed(kind):
        return
    file.flush()
    os.fsync(file.fileno())
    print(f"securefl test hook: paused writing {path} at {file.tell()} bytes", file=sys.stderr,
          flush=True)
    time.sleep(PAUSE_S)


class PauseHalfway:
    """A write-only file wrapper that calls :func:`pause` once ``half`` bytes have gone out
    (for writers, like the optimiser's, that stream a file in many writes and seeks)."""

    def __init__(self, file: IO[bytes], kind: str, half: int, path: object) -> None:
        self.file, self.kind, self.half, self.path = file, kind, half, path
        self.written = 0

    def write(self, data: bytes) -> int:
        view = memoryview(data).cast("B")
        before, self.written = self.written, self.written + len(view)
        if before < self.half <= self.written:
            cut = self.half - before
            self.file.write(view[:cut])
            pause(self.kind, self.file, self.path)
            self.file.write(view[cut:])
        else:
            self.file.write(view)
        return len(view)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.file.seek(offset, whence)

    def __getattr__(self, name: str) -> object:  # flush, fileno, tell: the real file's
        return getattr(self.file, name)


def stop(kind: str, path: object) -> None:
    """If armed for ``kind`` (``renamed``: right after a new version file was renamed into
    place and its folder fsynced, before anything else records it): say so and sleep."""
    if not armed(kind):
        return
    print(f"securefl test hook: stopped after {kind} {path}", file=sys.stderr, flush=True)
    time.sleep(PAUSE_S)


#: ``SECUREFL_TEST_FAIL_WRITE=<target>:<ERRNO>:<flag file>``: while the flag file exists,
#: writes of ``target`` ("store": everything the server writes in its store folder —
#: version files, the optimiser state, state.json; "audit": the audit log) fail with
#: ``OSError(ERRNO)``, as on a read-only mount (EROFS), a folder the server may not write
#: (EACCES) or a full disk (ENOSPC).  EROFS and EACCES fail where a file is opened or
#: removed; ENOSPC where bytes are written (after the first half of a version file).
#: Why a hook: the test suite runs as root in CI, where ``chmod 555`` stops nothing.
FAIL_ENV = "SECUREFL_TEST_FAIL_WRITE"


def fail_write(target: str, path: object, stage: str) -> None:
    """Raise the injected ``OSError`` if armed for ``target`` at this ``stage``
    ("open" or "write") and the flag file exists; otherwise do nothing."""
    spec = os.environ.get(FAIL_ENV)
    if not spec:
        return
    want, name, flag = spec.split(":", 2)
    if want != target or not os.path.exists(flag):
        return
    code = getattr(errno, name)
    if (stage == "write") != (code == errno.ENOSPC):
        return
    raise OSError(code, os.strerror(code), str(path))
