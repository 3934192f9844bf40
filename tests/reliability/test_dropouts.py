"""Ten hospitals, five published versions, with hospitals vanishing at random phases.

Every round must either publish exactly the sample-weighted mean of the hospitals it names
as contributors (applied through the server's FedAvgM), or fail cleanly — nothing
published, the admin told why — and then be retried automatically with the hospitals still
online (issue: no-halt dropouts).
"""

from __future__ import annotations

import asyncio
import json
import random

import numpy as np

from securefl.client.session import AdminSession, HospitalSession
from securefl.errors import NotEnoughSurvivorsError
from securefl.server.store import ModelStore

from .conftest import NAMES, Site

D = 2000
PHASES = ["absent", "join", "share_keys", "masked_input"]


async def _wait_count(admin: AdminSession, n: int, timeout: float = 60) -> None:
    async with asyncio.timeout(timeout):
        while await admin.count() < n:
            await asyncio.sleep(0.05)


async def _one_round(site: Site, rnd: int, leave: dict[str, str],
                     samples: dict[str, int]) -> tuple[dict, list[str]]:
    ups = {n: np.random.default_rng([rnd, i]).normal(0, 0.02, D).astype(np.float32)
           for i, n in enumerate(NAMES)}

    async def hospital(name: str) -> object:
        async with HospitalSession(site.settings(name)) as h:
            await h.get_global()
            return await h.send(ups[name], samples[name],
                                leave_after=leave.get(name))  # type: ignore[arg-type]

    tasks = {n: asyncio.create_task(hospital(n)) for n in NAMES if leave.get(n) != "absent"}
    contributors = [n for n in NAMES if leave.get(n) in (None, "masked_input")]
    async with AdminSession(site.settings("admin")) as admin:
        await _wait_count(admin, len(contributors))
        result = await admin.aggregate()
    outcomes = dict(zip(tasks, await asyncio.gather(*tasks.values()), strict=True))
    for name, out in outcomes.items():
        if leave.get(name) is None:
            assert out is not None and out.version == result.version  # type: ignore[attr-defined]
    weights = np.array([samples[n] for n in contributors], np.float64)
    mean = np.average(np.stack([ups[n] for n in contributors]).astype(np.float64), axis=0,
                      weights=weights)
    assert result.contributors == len(contributors)
    assert result.total_samples == int(weights.sum())
    return {"mean": mean, "version": result.version}, contributors


def test_ten_hospitals_five_versions_with_30_percent_vanishing(site: Site) -> None:
    rng = random.Random(20261128)
    samples = {n: rng.randint(50, 900) for n in NAMES}

    async def scenario() -> None:
        momentum = np.zeros(D)  # the server applies FedAvgM (β = 0.3, η = 1) by default
        for rnd in range(1, 6):
            leavers = rng.sample(NAMES, 3)
            leave = {n: rng.choice(PHASES) for n in leavers}
            info, _ = await _one_round(site, rnd, leave, samples)
            assert info["version"] == rnd
            store = ModelStore(site.root / "store")
            delta = store.read(rnd)[1].astype(np.float64) - store.read(rnd - 1)[1]
            momentum = 0.3 * momentum + info["mean"]
            np.testing.assert_allclose(delta, momentum, atol=1e-5)

    with site.server(site.server_toml(params=D)):
        asyncio.run(scenario())
    store = ModelStore(site.root / "store")
    assert store.versions() == [0, 1, 2, 3, 4, 5]
    for v in store.versions():
        store.read(v)  # every version file verifies against its sha256


def test_a_round_that_cannot_be_unmasked_is_reported_and_retried(site: Site) -> None:
    """Five of ten vanish after their masked input: 5 answers < t = 6.  The admin is told,
    nothing is published, and the five still online go on in a fresh round by themselves."""
    names = NAMES
    samples = {n: 100 + 10 * i for i, n in enumerate(names)}
    ups = {n: np.full(D, 0.001 * (i + 1), np.float32) for i, n in enumerate(names)}
    leavers = set(names[:5])

    async def scenario() -> None:
        async def hospital(name: str) -> object:
            async with HospitalSession(site.settings(name)) as h:
                await h.get_global()
                return await h.send(ups[name], samples[name],
                                    leave_after="masked_input" if name in leavers else None)

        tasks = {n: asyncio.create_task(hospital(n)) for n in names}
        async with AdminSession(site.settings("admin")) as admin:
            await _wait_count(admin, 10)
            for name in leavers:
                assert await tasks[name] is None  # gone after their masked input
            try:
                await admin.aggregate()
            except NotEnoughSurvivorsError as err:
                assert "a new round" in err.message.lower()
            else:
                raise AssertionError("a round with 5 of 10 answers must not be published")
            assert await admin.version() == 0
            await _wait_count(admin, 5)  # the five still online resent by themselves
            result = await admin.aggregate()
        outs = await asyncio.gather(*(tasks[n] for n in names if n not in leavers))
        assert all(o.version == 1 for o in outs)  # type: ignore[attr-defined]
        stayed = [n for n in names if n not in leavers]
        assert result.contributors == 5
        assert result.total_samples == sum(samples[n] for n in stayed)

    with site.server(site.server_toml(params=D)):
        asyncio.run(scenario())
    store = ModelStore(site.root / "store")
    stayed = [n for n in names if n not in leavers]
    expected = np.average(np.stack([ups[n] for n in stayed]).astype(np.float64), axis=0,
                          weights=[samples[n] for n in stayed])
    np.testing.assert_allclose(store.read(1)[1] - store.read(0)[1], expected, atol=1e-5)
    events = [json.loads(line)["event"]
              for line in (site.root / "audit.jsonl").read_text().splitlines()]
    assert "round-failed" in events and "round-retry" in events
