"""The server optimiser in the running server: FedAvgM across published versions, its state
on disk beside the store, a lost or corrupt state restarting the momentum (never a version),
and the batch-norm layout read from the saved weight names."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from securefl import config
from securefl.errors import ConfigError
from securefl.fedopt import ServerOptimizer, ServerOptSettings
from securefl.server.app import Server
from securefl.server.audit import read_entries
from securefl.server.initial import LAYERS_FILE, save_spec
from securefl.server.optimiser import STATE_FILE
from securefl.server.store import ModelStore

from .conftest import Federation
from .test_round import _round

SAMPLES = [10, 30, 60]


def _mean(ups: list[np.ndarray]) -> np.ndarray:
    return sum(u * n for u, n in zip(ups, SAMPLES, strict=True)) / sum(SAMPLES)


def test_fedavgm_carries_momentum_across_versions_and_restarts_it_from_a_corrupt_state(
        fed: Federation) -> None:
    settings = fed.server_settings()  # default [server_opt]: FedAvgM, momentum 0.3
    assert settings.server_opt.kind == "fedavgm" and settings.server_opt.momentum == 0.3
    for _ in range(2):
        _, result, ups = asyncio.run(_round(fed, settings, SAMPLES))
    assert result.version == 2
    store = ModelStore(settings.store_dir)
    d = _mean(ups)  # every round sends the same updates
    w = [store.read(v)[1] for v in range(3)]
    np.testing.assert_allclose(w[1] - w[0], d, atol=1e-3)
    np.testing.assert_allclose(w[2] - w[1], 1.3 * d, atol=1e-3)  # Δ + 0.3·m
    state_path = settings.store_dir / STATE_FILE
    saved, version = ServerOptimizer.from_bytes(state_path.read_bytes())
    assert version == 2 and saved.steps == 2
    np.testing.assert_allclose(saved.state_arrays()["m"], 1.3 * d, atol=1e-3)

    raw = bytearray(state_path.read_bytes())
    raw[-40] ^= 0xFF  # inside the momentum vector: its sha256 no longer matches
    state_path.write_bytes(bytes(raw))
    _, result, _ = asyncio.run(_round(fed, settings, SAMPLES))
    assert result.version == 3  # the round is published all the same
    w3 = ModelStore(settings.store_dir).read(3)[1]
    np.testing.assert_allclose(w3 - w[2], d, atol=1e-3)  # momentum restarted from zero
    restarted = [e for e in read_entries(settings.audit_log)
                 if e["event"] == "optimiser-restarted"]
    assert len(restarted) == 1 and restarted[0]["version"] == 3
    assert "corrupt" in restarted[0]["reason"]
    assert ServerOptimizer.from_bytes(state_path.read_bytes())[1] == 3


def test_plain_fedavg_is_one_setting_away(fed: Federation) -> None:
    settings = fed.server_settings(server_opt=ServerOptSettings(kind="fedavg"))
    for _ in range(2):
        _, _, ups = asyncio.run(_round(fed, settings, SAMPLES))
    store = ModelStore(settings.store_dir)
    np.testing.assert_allclose(store.read(2)[1] - store.read(1)[1], _mean(ups), atol=1e-3)


def test_a_state_left_behind_by_a_crash_restarts_the_momentum(fed: Federation) -> None:
    """Killed between storing version 1 and renaming its state into place: the state on disk
    still belongs to version 0, so the next round starts the momentum afresh."""
    settings = fed.server_settings()
    asyncio.run(_round(fed, settings, SAMPLES))
    state_path = settings.store_dir / STATE_FILE
    stale = state_path.read_bytes()
    asyncio.run(_round(fed, settings, SAMPLES))
    state_path.write_bytes(stale)  # version 1's state, but the store is at version 2
    _, _, ups = asyncio.run(_round(fed, settings, SAMPLES))
    store = ModelStore(settings.store_dir)
    np.testing.assert_allclose(store.read(3)[1] - store.read(2)[1], _mean(ups), atol=1e-3)
    reasons = [e["reason"] for e in read_entries(settings.audit_log)
               if e["event"] == "optimiser-restarted"]
    assert reasons == ["it belongs to model version 1, the latest is 2"]


def _ml_settings(fed: Federation, layers: list[tuple[str, int]]) -> config.ServerSettings:
    settings = fed.server_settings(model=config.ModelSettings(ml={"image_size": 32}))
    store = ModelStore(settings.store_dir)
    store.write(np.zeros(10, np.float32), contributors=0, total_samples=0)
    (settings.store_dir / LAYERS_FILE).write_text(json.dumps(layers))
    save_spec(settings.store_dir, settings.model)  # as a server that made version 0 does
    return settings


def test_the_statistics_layout_comes_from_the_saved_weight_names(fed: Federation) -> None:
    settings = _ml_settings(fed, [["conv/kernel", 4], ["bn/gamma", 1], ["bn/beta", 1],
                                  ["bn/moving_mean", 2], ["bn/moving_variance", 2]])
    server = Server(settings)
    assert server.coordinator.optimiser.statistics.ranges == ((6, 10),)
    assert server.coordinator.optimiser.statistics.variances == ((8, 10),)


@pytest.mark.parametrize("layers, message", [
    ([["conv/kernel", 4]], "describes 4 weights but the model store holds 10"),
    ("not a list", "unreadable"),
])
def test_weight_names_that_do_not_fit_the_store_stop_the_server(
        fed: Federation, layers: object, message: str) -> None:
    settings = _ml_settings(fed, [])
    (settings.store_dir / LAYERS_FILE).write_text(json.dumps(layers))
    with pytest.raises(ConfigError, match=message):
        Server(settings)
