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


def ml_initial_weights(spec: Mapping[str, Any], *, timeout: float = 300.0) -> np.ndarray:
    with tempfile.TemporaryDirectory(prefix="securefl-init-") as tmp:
        out = Path(tmp) / "initial.npy"
        cmd = [sys.executable, "-m", "securefl.ml.initial", "--spec", json.dumps(dict(spec)),
               "--out", str(out)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise ConfigError("building the initial model took too long") from exc
        if done.returncode != 0 or not out.is_file():
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise ConfigError(f"could not build the initial model from [model.ml]: {last}")
        return np.load(out).astype("<f4")
