"""A hospital's ``model.keras`` outside securefl: the snippet docs/ML.md gives, run as
written in a fresh interpreter, loads the model and gives the probabilities securefl gives.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from securefl.ml.local import new_model
from securefl.ml.model import compile_model, save_model
from securefl.ml.settings import MLSettings
from securefl.ml.train import predict_proba

ROOT = Path(__file__).resolve().parents[3]


def _doc_block() -> str:
    text = (ROOT / "docs" / "ML.md").read_text()
    m = re.search(r"<!-- tested: tests/unit/ml/test_plain_keras.py runs this block -->\n"
                  r"```python\n(.*?)```", text, re.S)
    assert m, "docs/ML.md lost its plain-Keras snippet"
    return m.group(1)


def test_the_documented_snippet_loads_model_keras_with_plain_keras(tmp_path: Path) -> None:
    ml = MLSettings(scans_dir=tmp_path, model_dir=tmp_path / "model")  # the defaults: 128x128
    model = new_model(ml)
    compile_model(model, ml.learning_rate, prior_correction=True)  # names the custom loss
    save_model(model, tmp_path / "model" / "model.keras")
    expected = predict_proba(model, np.zeros((1, *ml.input_shape), dtype=np.uint8))
    script = _doc_block() + "\nimport sys\nnp.save(sys.argv[1], probabilities)\n"
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "p.npy")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), expected, rtol=1e-5, atol=1e-6)


def test_without_registering_plain_keras_cannot_read_it(tmp_path: Path) -> None:
    """Why the registration line is in the snippet (and not a formality)."""
    ml = MLSettings(scans_dir=tmp_path, model_dir=tmp_path / "model", image_size=32)
    model = new_model(ml)
    save_model(model, tmp_path / "model.keras")
    run = subprocess.run([sys.executable, "-c", "import keras\n"
                          "keras.saving.load_model('model.keras')"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "IntensityWindow" in run.stderr
