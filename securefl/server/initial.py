"""Version 0 of an ML federation, built in a child process so the server never imports
TensorFlow (see ``securefl.ml.initial``)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from securefl.errors import ConfigError


def ml_initial_weights(
    spec: Mapping[str, Any], *, timeout: float = 300.0
) -> tuple[np.ndarray, list[tuple[str, int]]]:
    """Version 0 and the ``(name, size)`` of its weight tensors in vector order (the server's
    optimiser finds the batch-norm statistics by name)."""
    with tempfile.TemporaryDirectory(prefix="securefl-init-") as tmp:
        out, layers_out = Path(tmp) / "initial.npy", Path(tmp) / "layers.json"
        cmd = [sys.executable, "-m", "securefl.ml.initial", "--spec", json.dumps(dict(spec)),
               "--out", str(out), "--layers-out", str(layers_out)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise ConfigError("building the initial model took too long") from exc
        if done.returncode != 0 or not out.is_file():
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise ConfigError(f"could not build the initial model from [model.ml]: {last}")
        layers = [(str(name), int(size))
                  for name, size in json.loads(layers_out.read_text(encoding="utf-8"))]
        return np.load(out).astype("<f4"), layers
