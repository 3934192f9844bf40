"""TEST-ONLY: pause a file write halfway, so a crash test can ``kill -9`` the server inside it.

``SECUREFL_TEST_PAUSE_WRITE=version`` (a new model version file, ``v*.sflm.tmp``) or
``=optimiser`` (the server optimiser's next state, ``server_opt.state.tmp``) makes that write
stop once half of its bytes are out: what is written so far is flushed and fsynced, a line
``securefl test hook: paused writing <path> at <n> bytes`` goes to stderr, and the writer
sleeps :data:`PAUSE_S` seconds before finishing normally.  Why a hook: polling for a temporary
file and killing on sight is racy (a fast machine finishes the write first, and another
``.tmp`` may appear earlier); with the pause the kill lands inside the write every time.

Used by ``tests/reliability/test_crash.py`` only.  Never set it on a real server: a pausing
server publishes every version minutes late.  Unset (always, outside that test), each check
is one environment lookup.
"""

from __future__ import annotations

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
