"""The trained weights kept beside the hospital's model file, so ``send`` needs no Keras.

Why: loading a Keras model means importing TensorFlow, 5-10 s before a send even knows
whether the server will take the update.  ``train`` keeps the weights it just trained as one
float32 vector in the state folder and records two digests in local.json: the model file's
bytes as training wrote them and the weights' own (the wire's layout).  ``send`` uses the copy
only while both still match; anything else -- a model file changed or replaced since, a copy
cut short by a power loss, another format -- is a miss, and the caller loads the model and
checks it as before there was a copy.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from securefl.client.outbox import vector_sha256
from securefl.fsutil import file_sha256, replace_file

#: The trained weights as one float32 vector (little-endian), in the hospital's state folder.
TRAINED_FILE = "trained.npy"


def keep(state_dir: Path, weights: np.ndarray) -> bool:
    """Write the copy (atomically, fsynced).  Best effort: False when it cannot be written,
    which only means ``send`` loads the model."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        replace_file(state_dir / TRAINED_FILE,
                     lambda f: np.save(f, np.ascontiguousarray(weights, dtype="<f4")))
        return True
    except OSError:
        return False


def kept(state_dir: Path, model_path: Path, model_file_sha256: str | None,
         weights_sha256: str | None) -> np.ndarray | None:
    """The copy, if the model file is still the one training wrote and the copy is those
    weights; otherwise None."""
    if model_file_sha256 is None or weights_sha256 is None:
        return None
    try:
        if file_sha256(model_path) != model_file_sha256:
            return None
        weights = np.load(state_dir / TRAINED_FILE, allow_pickle=False)
        if not isinstance(weights, np.ndarray) or weights.ndim != 1 \
                or weights.dtype != np.dtype("<f4") or vector_sha256(weights) != weights_sha256:
            return None
    except Exception:  # any damage means: use the model file instead
        return None
    return weights


def forget(state_dir: Path) -> None:
    """Drop the copy: a new download makes the last training's weights meaningless."""
    with contextlib.suppress(OSError):
        (state_dir / TRAINED_FILE).unlink(missing_ok=True)
