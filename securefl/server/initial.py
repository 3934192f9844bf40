"""Version 0 of the global model, and where its batch-norm statistics are.

An ML model's version 0 is built in a child process so the server never imports TensorFlow
(see ``securefl.ml.initial``).  The child also reports the weights' names, which are kept
beside the store (``layers.json``) for the server optimiser.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from securefl.config import ModelSettings
from securefl.errors import ConfigError
from securefl.fedopt import NO_STATISTICS, StatisticsLayout, statistics_layout
from securefl.server import v0cache
from securefl.server.store import initial_weights


def ml_initial_weights(
    spec: Mapping[str, Any], *, timeout: float = 300.0
) -> tuple[np.ndarray, list[tuple[str, int]]]:
    """Version 0 and the ``(name, size)`` of its weight tensors in vector order (the server's
    optimiser finds the batch-norm statistics by name).

    A build made before for the same spec, code and libraries is taken from the server
    user's private cache (``securefl.server.v0cache``): the child costs 5-20 s of importing
    TensorFlow, paid again by every new federation on the machine.
    """
    folder = v0cache.cache_dir()
    key = v0cache.cache_key(spec) if folder is not None else ""
    if folder is not None and (hit := v0cache.read(folder, key)) is not None:
        return hit
    vector, layers = _build(spec, timeout)
    if folder is not None:
        v0cache.keep(folder, key, vector, layers)
    return vector, layers


def _build(spec: Mapping[str, Any], timeout: float) -> tuple[np.ndarray, list[tuple[str, int]]]:
    with tempfile.TemporaryDirectory(prefix="securefl-init-") as tmp:
        out, layers_out = Path(tmp) / "initial.npy", Path(tmp) / "layers.json"
        # -P and PYTHONPATH: the child imports the server's own securefl (whose code the
        # cache key names), never another copy that happens to sit in the current folder.
        cmd = [sys.executable, "-P", "-m", "securefl.ml.initial", "--spec", json.dumps(dict(spec)),
               "--out", str(out), "--layers-out", str(layers_out)]
        import securefl

        here = str(Path(securefl.__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (here, os.environ.get("PYTHONPATH", "")) if p)}
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  env=env)
        except subprocess.TimeoutExpired as exc:
            raise ConfigError("building the initial model took too long") from exc
        if done.returncode != 0 or not out.is_file():
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise ConfigError(f"could not build the initial model from [model.ml]: {last}")
        layers = [(str(name), int(size))
                  for name, size in json.loads(layers_out.read_text(encoding="utf-8"))]
        return np.load(out).astype("<f4"), layers


LAYERS_FILE = "layers.json"


def save_layers(root: Path, layers: list[tuple[str, int]]) -> None:
    """Keep the weight names of version 0 beside the store (written once, with version 0)."""
    tmp = root / (LAYERS_FILE + ".tmp")
    tmp.write_text(json.dumps(layers), encoding="utf-8")
    os.replace(tmp, root / LAYERS_FILE)


def load_layers(root: Path) -> list[tuple[str, int]] | None:
    """The saved weight names, or ``None`` when there are none (a store without an ML spec,
    or one created before they were saved)."""
    try:
        raw = json.loads((root / LAYERS_FILE).read_text(encoding="utf-8"))
        return [(str(name), int(size)) for name, size in raw]
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{root / LAYERS_FILE} is unreadable ({exc}); delete it and restart "
                          "the server to rebuild it from [model.ml]") from exc


def layout_for(layers: list[tuple[str, int]] | None, length: int) -> StatisticsLayout:
    """Where the statistics are in a model of ``length`` weights; the names must cover it."""
    if layers is None:
        return NO_STATISTICS
    total = sum(size for _, size in layers)
    if total != length:
        raise ConfigError(f"the model spec describes {total} weights but the model store holds "
                          f"{length}: the [model.ml] settings do not match the stored model")
    return statistics_layout(layers)


SPEC_FILE = "model_spec.json"


def save_spec(root: Path, spec: ModelSettings) -> None:
    """Keep what version 0 was built from beside the store (written once, with version 0)."""
    if spec.ml is None:
        return
    tmp = root / (SPEC_FILE + ".tmp")
    tmp.write_text(json.dumps(spec.ml.identity(spec.seed), indent=1), encoding="utf-8")
    os.replace(tmp, root / SPEC_FILE)


def check_spec(root: Path, spec: ModelSettings) -> None:
    """Refuse to serve a store whose version 0 was built from other model settings.

    Why: ``[model.ml]`` is read again at every start, but version 0 is built only once.  A
    changed spec (another model kind, image size, class list or seed, or a securefl whose
    model is built differently) would otherwise go on serving the old model to hospitals
    that build the new one: with the same number of weights nothing would notice, and the
    weights would mean something else.
    """
    if spec.ml is None:
        return
    want = spec.ml.identity(spec.seed)
    path = root / SPEC_FILE
    try:
        have = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        have = None
    except ValueError as exc:
        raise ConfigError(f"{path} is unreadable ({exc}): restore it from a backup") from exc
    if have == want:
        return
    restart = (f"a federation's model is fixed when its version 0 is made, so to change it "
               f"start a new federation: move {root} away (keep it as a record), restart the "
               "server to build a new version 0, give every hospital the same [ml] settings "
               "and have each run get; or put [model.ml] back as it was")
    if have is None:
        raise ConfigError(f"{root} was made by an older securefl whose model is built "
                          f"differently (it has no {SPEC_FILE}): {restart}")
    changed = ", ".join(f"{k} {have.get(k)!r} -> {want.get(k)!r}"
                        for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k))
    raise ConfigError(f"the server settings' [model.ml] differ from the model {root} holds "
                      f"({changed}): {restart}")


def initial_model(spec: ModelSettings) -> tuple[np.ndarray, list[tuple[str, int]] | None]:
    """Version 0: the ML model spec's seeded CNN (with its weight names), or a seeded
    vector of ``params``.  Called once, when the store is empty."""
    if spec.ml is not None:
        return ml_initial_weights(spec.ml_spec())
    if spec.params is None:
        raise ConfigError("the model store is empty: set [model] params or a [model.ml] "
                          "spec in the server settings to create version 0")
    return initial_weights(spec.params, spec.seed, spec.init_scale), None


def model_layout(spec: ModelSettings, root: Path, length: int) -> StatisticsLayout:
    """Where the model's batch-norm statistics are, for the server optimiser.  A store made
    before the weight names were saved gets them rebuilt once from [model.ml]."""
    if spec.ml is None:
        return NO_STATISTICS
    layers = load_layers(root)
    if layers is None:
        _, layers = ml_initial_weights(spec.ml_spec())
        save_layers(root, layers)
    return layout_for(layers, length)
