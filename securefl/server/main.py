"""``securefl server``: apply the OpenSSL group policy, load settings, serve until stopped.

Why a re-exec: OpenSSL reads ``OPENSSL_CONF`` once, when Python's ``ssl`` module is first
imported.  If anything imported ``ssl`` before this point, the process starts itself again
with the variable set, rather than silently running with the default key-exchange groups.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

from securefl.server.tls import apply_openssl_conf

#: glibc's ``mallopt`` parameter number for the mmap threshold.
_M_MMAP_THRESHOLD = -3
#: Allocations at least this big get their own mapping, returned to the system when freed.
MMAP_THRESHOLD = 1 << 20


def fix_mmap_threshold() -> bool:
    """Pin glibc's mmap threshold at 1 MiB; False where there is no glibc ``mallopt``.

    Why: glibc raises the threshold after the first large block is freed, so from then on
    every model-sized buffer (an upload being read, the decoded mean) comes from the heap,
    where small allocations made meanwhile can pin it.  The server's peak memory then
    varied from 3.4 to 4.4 models between identical 30-hospital rounds; with the
    threshold fixed, 3.4 to 3.5 (``bench/round_bench.py --clients 30 --repeats 5``).
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def run(config_path: Path, argv: list[str], *, log_level: str = "info",
        json_logs: bool = False) -> int:
    """Serve until SIGINT (Ctrl-C) or SIGTERM, then say so in one line and return 0."""
    if not apply_openssl_conf():
        os.execv(sys.executable, [sys.executable, "-m", "securefl", *argv])
    fix_mmap_threshold()
    from securefl import config
    from securefl.server import console
    from securefl.server.app import TLS_READ_BUFFER, held_versions, serve
    from securefl.server.tls import limit_handshake_buffers

    limit_handshake_buffers(TLS_READ_BUFFER)
    console.configure(log_level, json_logs=json_logs)
    settings = config.load(config_path, config.ServerSettings)
    stopped_by: list[str] = []

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        warned_at: list[float] = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            def stop(sig: signal.Signals = sig) -> None:
                # A version held in memory (its store unwritable) dies with the process, and
                # its hospitals must send again: walking it, an operator stopped the server
                # "to fix the store" and lost the version.  The first signal explains; a
                # second within a minute stops anyway.
                held = held_versions()
                if held and not (warned_at and loop.time() - warned_at[-1] < 60):
                    warned_at.append(loop.time())
                    logging.getLogger("securefl.server").error(
                        "NOT stopping: %s is held in memory because the store cannot be "
                        "written, and stopping would lose it (its hospitals would have to "
                        "send again); make the store writable and the server publishes it "
                        "within [round] publish_retry seconds, or stop again within 60 s to "
                        "stop anyway", " and ".join(held))
                    return
                stopped_by.append("Ctrl-C" if sig is signal.SIGINT else "SIGTERM")
                task.cancel()

            loop.add_signal_handler(sig, stop)
        with contextlib.suppress(asyncio.CancelledError):
            await serve(settings)

    try:
        asyncio.run(main())
    except KeyboardInterrupt:  # Ctrl-C before the handlers were installed
        stopped_by.append("Ctrl-C")
    logging.getLogger("securefl.server").info(
        "server stopped (%s); every connection closed", stopped_by[0] if stopped_by else
        "stopped")
    return 0
