"""``python -m securefl.ml.initial``: the version-0 vector and, for the server's optimiser,
the names and sizes of its weight tensors."""

from __future__ import annotations

import json

import numpy as np

from securefl.fedopt import statistics_layout
from securefl.ml.initial import main


def test_vector_and_layers(tmp_path):
    out, layers_out = tmp_path / "initial.npy", tmp_path / "layers.json"
    spec = {"image_size": 32, "model_kind": "small", "classes": ["a", "b", "c", "d"],
            "seed": 2}
    assert main(["--spec", json.dumps(spec), "--out", str(out),
                 "--layers-out", str(layers_out)]) == 0
    vector = np.load(out)
    layers = [tuple(pair) for pair in json.loads(layers_out.read_text())]
    assert vector.dtype == np.float32 and vector.size == sum(size for _, size in layers)
    layout = statistics_layout(layers)
    assert len(layout.ranges) == 4 and len(layout.variances) == 4  # one per batch-norm layer
    for start, stop in layout.variances:
        assert np.all(vector[start:stop] == 1.0)  # Keras' placeholder variances


def test_unknown_setting_is_refused(tmp_path, capsys):
    assert main(["--spec", json.dumps({"colour": 1}), "--out", str(tmp_path / "x.npy")]) == 3
    assert "unknown [model.ml] setting" in capsys.readouterr().err
