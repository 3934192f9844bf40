"""SecAgg+ over real TLS: twenty hospitals, a sparse graph drawn by all of them, the
published model checked against the hospitals' own updates.

One hospital has not opted in to sparse graphs ([policy] allow_sparse = false): it refuses
the roster, the graph cannot be drawn without its value, and the server retries at once
with the others.  One more hospital drops out after sharing its keys, within the dropout
the round was sized for.  The new version must be the sample-weighted mean of exactly the
other eighteen hospitals' updates.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from securefl import config
from securefl.certs import CertDir
from securefl.client.outbox import Outbox
from securefl.client.session import AdminSession, HospitalSession
from securefl.errors import CryptoError, SecureFLError
from securefl.protocol import messages as wm
from securefl.server.store import ModelStore
from tests.integration.conftest import Federation, running

NAMES = [f"h{i:02d}" for i in range(20)]
D = 1000


@pytest.fixture(scope="module")
def _big_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fed20") / "certs"
    CertDir(root).init(["localhost", "127.0.0.1"], NAMES)
    return root


@pytest.fixture
def fed20(tmp_path: Path, _big_template: Path) -> Federation:
    shutil.copytree(_big_template, tmp_path / "certs")
    return Federation(CertDir(tmp_path / "certs"), tmp_path)


def _sparse(fed20: Federation, step_timeout: float, seed: int
            ) -> tuple[config.ServerSettings, list[np.ndarray]]:
    """A SecAgg+ server for the twenty hospitals, and each hospital's update."""
    settings = fed20.server_settings(
        hospitals=NAMES, model=config.ModelSettings(params=D),
        round=config.RoundSettings(sparse=True, step_timeout=step_timeout))
    rng = np.random.default_rng(seed)
    return settings, [rng.normal(0, 0.01, D).astype(np.float32) for _ in NAMES]


def test_twenty_hospitals_publish_the_weighted_mean_through_a_sparse_graph(
        fed20: Federation) -> None:
    settings, ups = _sparse(fed20, step_timeout=30, seed=13)
    samples = [10 + 3 * i for i in range(len(NAMES))]
    refuser, leaver = "h00", "h07"

    async def scenario() -> tuple[list[object], object]:
        async with running(settings) as srv:
            async def hospital(i: int, name: str) -> object:
                policy = config.HospitalPolicy(allow_sparse=name != refuser)
                journal, _ = Outbox(fed20.tmp / "sent" / name).begin(
                    0, samples[i], ups[i], max_attempts=3)
                async with HospitalSession(fed20.client_settings(
                        name, srv.port, policy=policy)) as h:
                    await h.get_global()
                    try:
                        return await h.send(ups[i], samples[i], journal=journal, leave_after=(
                            "share_keys" if name == leaver else None))  # type: ignore[arg-type]
                    except CryptoError as exc:
                        return exc

            tasks = [asyncio.create_task(hospital(i, n)) for i, n in enumerate(NAMES)]
            async with AdminSession(fed20.client_settings("admin", srv.port)) as admin:
                while await admin.count() < len(NAMES) - 2:
                    await asyncio.sleep(0.05)
                result = await admin.aggregate()
            return list(await asyncio.gather(*tasks)), result

    outcomes, result = asyncio.run(scenario())
    by_name = dict(zip(NAMES, outcomes, strict=True))
    refusal = by_name[refuser]
    assert isinstance(refusal, CryptoError)
    assert "sparse SecAgg+ graph" in refusal.message and "does not accept" in refusal.message
    assert by_name[leaver] is None
    counted = [i for i, n in enumerate(NAMES) if n not in (refuser, leaver)]
    assert all(by_name[NAMES[i]].version == 1 for i in counted)  # type: ignore[union-attr]
    assert result.contributors == 18  # type: ignore[attr-defined]
    assert result.total_samples == sum(samples[i] for i in counted)  # type: ignore[attr-defined]
    store = ModelStore(settings.store_dir)
    expected = sum(ups[i] * samples[i] for i in counted) / sum(samples[i] for i in counted)
    np.testing.assert_allclose(store.read(1)[1] - store.read(0)[1], expected, atol=1e-4)
    audit = [json.loads(line) for line in Path(settings.audit_log).read_text().splitlines()]
    drawn = [e for e in audit if e["event"] == "graph-drawn"]
    assert drawn and drawn[-1]["neighbours"] == 8  # 19 hospitals: k = 8 of 18, t = 6
    # Each hospital counted the one graph it helped draw (round 2; round 1 stopped before
    # any value was revealed) against its max_attempts, before its value left.
    for name in NAMES[1:]:
        record = Outbox(fed20.tmp / "sent" / name).record()
        assert record is not None and record.graph_rounds == (drawn[-1]["round_id"],)


class Withholder(HospitalSession):
    """A hostile hospital: it confirms the roster, then never reveals its graph-seed value
    (found by the adversary review to halt the federation for good: every retry cost each
    honest hospital one of its max_attempts)."""

    async def _in_round(self, round_id: int, msg: wm._Wire,
                        array: np.ndarray | None = None) -> tuple[wm.Message, object]:
        if isinstance(msg, wm.RevealSeed):
            await asyncio.sleep(3600)
        return await super()._in_round(round_id, msg, array)


def test_a_hospital_that_withholds_its_seed_value_is_left_out_for_the_version(
        fed20: Federation) -> None:
    settings, ups = _sparse(fed20, step_timeout=2, seed=14)
    hostile = "h19"

    async def scenario() -> tuple[list[object], object, str]:
        async with running(settings) as srv:
            async def hospital(i: int, name: str) -> object:
                cls = Withholder if name == hostile else HospitalSession
                journal, _ = Outbox(fed20.tmp / "sent" / name).begin(
                    0, 10 + i, ups[i], max_attempts=3)
                async with cls(fed20.client_settings(
                        name, srv.port, policy=config.HospitalPolicy(allow_sparse=True))) as h:
                    await h.get_global()
                    return await h.send(ups[i], 10 + i, journal=journal)

            honest = [asyncio.create_task(hospital(i, n)) for i, n in enumerate(NAMES)
                      if n != hostile]
            bad = asyncio.create_task(hospital(NAMES.index(hostile), hostile))
            async with AdminSession(fed20.client_settings("admin", srv.port)) as admin:
                while await admin.count() < len(NAMES) - 1:
                    await asyncio.sleep(0.05)
                bad.cancel()
                # Back on version 0 with its update, it is told plainly to wait.
                async with HospitalSession(fed20.client_settings(
                        hostile, srv.port,
                        policy=config.HospitalPolicy(allow_sparse=True))) as h:
                    await h.get_global()
                    try:
                        await h.send(ups[-1], 10)
                        again = ""
                    except SecureFLError as exc:
                        again = exc.message
                result = await admin.aggregate()
            return list(await asyncio.gather(*honest)), result, again

    outcomes, result, again = asyncio.run(scenario())
    assert all(o.version == 1 for o in outcomes)  # type: ignore[attr-defined]
    assert result.contributors == 19  # type: ignore[attr-defined]
    store = ModelStore(settings.store_dir)
    counted = range(len(NAMES) - 1)
    expected = sum(ups[i] * (10 + i) for i in counted) / sum(10 + i for i in counted)
    np.testing.assert_allclose(store.read(1)[1] - store.read(0)[1], expected, atol=1e-4)
    # One stopped round cost each honest hospital one draw of its three.
    for name in NAMES[:-1]:
        record = Outbox(fed20.tmp / "sent" / name).record()
        assert record is not None and len(record.graph_rounds) == 2
    assert "this hospital stopped a round on version 0 by not answering its roster step" \
        in again
    audit = [json.loads(line) for line in Path(settings.audit_log).read_text().splitlines()]
    assert [e["names"] for e in audit if e["event"] == "withheld"] == [[hostile]]
