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


def run(config_path: Path, argv: list[str]) -> int:
    if not apply_openssl_conf():
        os.execv(sys.executable, [sys.executable, "-m", "securefl", *argv])
    from securefl import config
    from securefl.server.app import serve

    settings = config.load(config_path, config.ServerSettings)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await serve(settings)

    asyncio.run(main())
    return 0
