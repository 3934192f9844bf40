"""``kill -9`` of the server mid-round, exactly while a new version file is being written, and
exactly while the server optimiser's next state is being written.

After each crash every version published before is byte-identical (sha256 of the file), none
is lost, the restarted server serves the last complete version (what ``get`` returns hashes
to what the file holds), and the next round publishes the version the server optimiser's rule
says (FedAvgM: ``m <- beta*m + mean update; w <- w + lr*m``), with the momentum saved with
the last complete version.

Why a test-only pause (``securefl/server/testhook.py``) instead of killing on the first
``*.tmp``: that raced the write on a fast machine and, since the optimiser state is written
before the version, never hit the version file at all.  The hook stops the chosen write
halfway (bytes fsynced) and says so in the server's log; the test kills on that line and
checks the temporary file is there and partial before and after the kill.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from securefl import config
from securefl.client.session import AdminSession, HospitalSession
from securefl.crypto.quantize import Encoding
from securefl.errors import SecureFLError
from securefl.server.testhook import ENV

from .conftest import Site, start

HOSPITALS = ["h00", "h01", "h02"]
SAMPLES = 100
#: 1.2 MB version files: large enough that both writes stream in several pieces, small
#: enough to keep the test quick (the pause, not the size, makes the kill land inside).
PARAMS = 300_000


async def _wait_count(admin: AdminSession, n: int, timeout: float = 120) -> None:
    async with asyncio.timeout(timeout):
        while await admin.count() < n:
            await asyncio.sleep(0.05)


def _updates(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: (rng.standard_normal(PARAMS) * 0.01).astype(np.float32) for n in HOSPITALS}


def _mean_update(seed: int) -> np.ndarray:
    """The documented mean: the sample-weighted mean of the clipped updates (float64)."""
    ups = _updates(seed)
    return np.mean([np.clip(ups[n].astype(np.float64), -1.0, 1.0) for n in HOSPITALS], axis=0)


async def _round(site: Site, seed: int, *, kill_on: tuple[Path, int, Path] | None = None,
                 kill_mid_round: bool = False,
                 proc: subprocess.Popen | None = None) -> int | None:
    """One round of the three hospitals: the version it published.  ``kill_mid_round``:
    ``kill -9`` the server once every masked input is in.  ``kill_on = (log, offset, tmp)``:
    then ask to aggregate, wait for the test hook's pause of ``tmp`` in the log (after
    ``offset``), ``kill -9`` the server there, and return the size ``tmp`` had."""
    ups = _updates(seed)

    async def hospital(name: str) -> object:
        async with HospitalSession(site.settings(name)) as h:
            await h.get_global()
            return await h.send(ups[name], SAMPLES)

    tasks = [asyncio.create_task(hospital(n)) for n in HOSPITALS]
    try:
        async with AdminSession(site.settings("admin")) as admin:
            await _wait_count(admin, len(HOSPITALS))
            if kill_on is None and not kill_mid_round:
                result = await admin.aggregate()
                outs = await asyncio.gather(*tasks)
                assert all(o.version == result.version for o in outs)  # type: ignore[attr-defined]
                return result.version
            assert proc is not None
            if kill_mid_round:
                os.kill(proc.pid, signal.SIGKILL)
                return None
            assert kill_on is not None
            log, offset, tmp = kill_on
            agg = asyncio.create_task(admin.aggregate())
            await asyncio.to_thread(_wait_for_pause, log, offset, tmp, proc)
            size = tmp.stat().st_size  # the write is stopped here: kill inside it
            os.kill(proc.pid, signal.SIGKILL)
            with contextlib.suppress(SecureFLError):
                await agg
            return size
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _wait_for_pause(log: Path, offset: int, tmp: Path, proc: subprocess.Popen,
                    timeout: float = 120) -> None:
    line = f"securefl test hook: paused writing {tmp} ".encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with log.open("rb") as fh:
            fh.seek(offset)
            if line in fh.read():
                return
        assert proc.poll() is None, f"the server exited:\n{log.read_text()}"
        time.sleep(0.01)
    raise AssertionError(f"the server never paused writing {tmp}:\n{log.read_text()}")


def _start_pausing(toml: Path, log: Path, kind: str,
                   monkeypatch: pytest.MonkeyPatch) -> tuple[subprocess.Popen, int]:
    offset = log.stat().st_size
    with monkeypatch.context() as m:
        m.setenv(ENV, kind)
        return start(toml, log), offset


def _file_sha256s(store: Path) -> dict[str, str]:
    """sha256 of every version file and of the optimiser state, by name."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(store.glob("v*.sflm")) + sorted(store.glob("server_opt.state"))}


def _weights(path: Path) -> tuple[dict, np.ndarray]:
    """A version file read by its documented layout, independently of the store's code."""
    data = path.read_bytes()
    assert data.startswith(b"SFLM1\n")
    (n,) = struct.unpack_from(">I", data, 6)
    return json.loads(data[10:10 + n]), np.frombuffer(data, "<f4", offset=10 + n)


def _check_served(site: Site, version: int) -> None:
    """What a hospital downloads is the stored file of ``version``, byte for byte."""
    meta, stored = _weights(site.root / "store" / f"v{version:08d}.sflm")
    assert meta["sha256"] == hashlib.sha256(stored.tobytes()).hexdigest()

    async def get() -> tuple[int, str]:
        async with HospitalSession(site.settings("h00")) as h:
            got = await h.get_global()
        return got.version, hashlib.sha256(got.weights.astype("<f4").tobytes()).hexdigest()

    assert asyncio.run(get()) == (version, meta["sha256"])


def _check_momentum_kept(site: Site, toml: Path, seed: int) -> None:
    """v3 = v2 + lr*(beta*m2 + mean update), m2 = (v2 - v1)/lr: the momentum saved with v2
    was used, not restarted (a restart would give v2 + lr*mean update), and no audit entry
    says it restarted."""
    settings = config.load(toml, config.ServerSettings)
    opt, rs = settings.server_opt, settings.round
    assert opt.kind == "fedavgm"
    store = site.root / "store"
    v1, v2, v3 = (_weights(store / f"v{v:08d}.sflm")[1].astype(np.float64) for v in (1, 2, 3))
    m2 = (v2 - v1) / opt.server_lr
    delta = _mean_update(seed)
    bound = Encoding.auto(clip=rs.clip, max_clients=rs.max_clients,
                          max_weight=rs.max_weight).error_bound(3, 3 * SAMPLES)
    bound = opt.server_lr * bound + 1e-6  # plus float32 rounding of the weights and m2
    expected = v2 + opt.server_lr * (opt.momentum * m2 + delta)
    assert np.abs(v3 - expected).max() <= bound
    restarted = v2 + opt.server_lr * delta
    assert np.abs(v3 - restarted).max() > 100 * bound  # the test can tell the two apart
    audit = [json.loads(line) for line in (site.root / "audit.jsonl").read_text().splitlines()]
    assert not [e for e in audit if e.get("event") == "optimiser-restarted"]
    assert [e for e in audit if e.get("event") == "aggregated"]  # the field names hold


def _two_rounds(site: Site, toml: Path, log: Path) -> dict[str, str]:
    """Versions 1 and 2 (so a momentum is saved), the server stopped between rounds."""
    proc = start(toml, log)
    try:
        assert asyncio.run(_round(site, seed=1)) == 1
        assert asyncio.run(_round(site, seed=2)) == 2
    finally:
        proc.kill()
        proc.wait()
    before = _file_sha256s(site.root / "store")
    assert set(before) == {f"v{v:08d}.sflm" for v in (0, 1, 2)} | {"server_opt.state"}
    return before


@pytest.mark.parametrize("kind", ["version", "optimiser"])
def test_kill_9_inside_a_write_loses_nothing(site: Site, kind: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    toml = site.server_toml(params=PARAMS, hospitals=HOSPITALS)
    log = site.root / "server.log"
    store = site.root / "store"
    before = _two_rounds(site, toml, log)
    full = (store / ("v00000002.sflm" if kind == "version" else "server_opt.state")).stat().st_size
    tmp = store / ("v00000003.sflm.tmp" if kind == "version" else "server_opt.state.tmp")

    proc, offset = _start_pausing(toml, log, kind, monkeypatch)
    try:
        size = asyncio.run(_round(site, seed=3, kill_on=(log, offset, tmp), proc=proc))
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()
    # Killed inside the write: its temporary file is there, half written, nothing renamed.
    assert size is not None and 0 < size < full
    assert tmp.stat().st_size == size
    assert abs(size - full / 2) < 4096
    if kind == "version":  # the optimiser's next state was complete, not yet renamed
        assert (store / "server_opt.state.tmp").stat().st_size == \
            (store / "server_opt.state").stat().st_size
    assert not (store / "v00000003.sflm").exists()
    assert _file_sha256s(store) == before  # every earlier version, and the state, untouched

    with site.server(toml) as restarted:  # without the hook: strays gone, v2 served
        assert not list(store.glob("*.tmp"))
        assert _file_sha256s(store) == before
        _check_served(site, 2)
        assert asyncio.run(_round(site, seed=4)) == 3
        _check_served(site, 3)
        assert restarted.poll() is None
    after = _file_sha256s(store)
    assert {k: after[k] for k in before if k != "server_opt.state"} == \
        {k: v for k, v in before.items() if k != "server_opt.state"}
    assert sorted(after) == sorted([*before, "v00000003.sflm"])
    _check_momentum_kept(site, toml, seed=4)


def test_kill_9_mid_round_loses_nothing(site: Site) -> None:
    """Killed with every masked input in, before aggregation: nothing is published, every
    version stays byte-identical, and the restarted server runs the next round."""
    toml = site.server_toml(params=PARAMS, hospitals=HOSPITALS)
    store = site.root / "store"
    with site.server(toml) as proc:
        assert asyncio.run(_round(site, seed=1)) == 1
        before = _file_sha256s(store)
        asyncio.run(_round(site, seed=2, kill_mid_round=True, proc=proc))
        assert proc.wait(timeout=30) == -signal.SIGKILL
    assert _file_sha256s(store) == before
    with site.server(toml):
        _check_served(site, 1)
        assert asyncio.run(_round(site, seed=3)) == 2
        _check_served(site, 2)
    assert {k: v for k, v in _file_sha256s(store).items() if k in before and "sflm" in k} \
        == {k: v for k, v in before.items() if "sflm" in k}
