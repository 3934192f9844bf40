"""``kill -9`` of the server during a round and during a version write: it comes back at the
latest complete version, every version file verifies, and the next round completes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from pathlib import Path

import numpy as np

from securefl.client.session import AdminSession, HospitalSession
from securefl.errors import SecureFLError
from securefl.server.store import ModelStore

from .conftest import Site, start

HOSPITALS = ["h00", "h01", "h02"]


async def _wait_count(admin: AdminSession, n: int, timeout: float = 120) -> None:
    async with asyncio.timeout(timeout):
        while await admin.count() < n:
            await asyncio.sleep(0.05)


def _updates(d: int, seed: int) -> dict[str, np.ndarray]:
    return {n: np.full(d, 0.001 * (i + 1 + seed), np.float32) for i, n in enumerate(HOSPITALS)}


async def _round(site: Site, d: int, seed: int, *, kill: str | None = None,
                 proc: subprocess.Popen | None = None) -> int | None:
    """One round of the three hospitals.  ``kill``: 'before-aggregate' kills the server once
    every masked input is in; 'during-write' the moment a version file is being written."""
    ups = _updates(d, seed)

    async def hospital(name: str) -> object:
        async with HospitalSession(site.settings(name)) as h:
            await h.get_global()
            return await h.send(ups[name], 100)

    tasks = [asyncio.create_task(hospital(n)) for n in HOSPITALS]
    try:
        async with AdminSession(site.settings("admin")) as admin:
            await _wait_count(admin, len(HOSPITALS))
            if kill == "before-aggregate":
                assert proc is not None
                os.kill(proc.pid, signal.SIGKILL)
                return None
            if kill == "during-write":
                assert proc is not None
                agg = asyncio.create_task(admin.aggregate())
                store = site.root / "store"
                async with asyncio.timeout(120):
                    while not any(store.glob("*.tmp")):
                        await asyncio.sleep(0.001)
                os.kill(proc.pid, signal.SIGKILL)
                with contextlib.suppress(SecureFLError):
                    await agg
                return None
            result = await admin.aggregate()
            outs = await asyncio.gather(*tasks)
            assert all(o.version == result.version for o in outs)  # type: ignore[attr-defined]
            return result.version
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _verify_store(root: Path) -> list[int]:
    store = ModelStore(root / "store")
    for v in store.versions():
        store.read(v)  # raises if a file does not match its sha256
    return store.versions()


def test_kill_9_during_a_round_and_during_a_version_write(site: Site) -> None:
    d = 8_000_000  # a 32 MB version file: its write takes long enough to be hit
    toml = site.server_toml(params=d, hospitals=HOSPITALS)
    log = site.root / "server.log"
    proc = start(toml, log)
    try:
        assert asyncio.run(_round(site, d, seed=0)) == 1
        before = (site.root / "store" / "v00000001.sflm").read_bytes()

        asyncio.run(_round(site, d, seed=1, kill="before-aggregate", proc=proc))
        proc.wait()
        assert _verify_store(site.root) == [0, 1]
        proc = start(toml, log)
        assert asyncio.run(_round(site, d, seed=2)) == 2

        asyncio.run(_round(site, d, seed=3, kill="during-write", proc=proc))
        proc.wait()
        assert _verify_store(site.root) in ([0, 1, 2], [0, 1, 2, 3])
        proc = start(toml, log)  # a stray .tmp from the killed write is cleaned up at start
        assert not any((site.root / "store").glob("*.tmp"))
        latest = _verify_store(site.root)[-1]
        assert asyncio.run(_round(site, d, seed=4)) == latest + 1
    finally:
        proc.kill()
        proc.wait()
    assert (site.root / "store" / "v00000001.sflm").read_bytes() == before
    assert _verify_store(site.root)[-1] >= 3
