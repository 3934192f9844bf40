"""A model saved before its first training step loads without Keras' optimiser warning.

Issue 16 item 16: ``get`` writes the downloaded global model into the local model file
before it was ever trained, and the following ``train`` printed "Skipping variable loading
for optimizer 'adam' ... saved optimizer has 2 variables" with a site-packages path.  Loaded
here with Keras itself (not our ``load_model``, which also filters the warning for files
written by older versions), so the test sees what Keras says about the file we write.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from securefl.ml.model import compile_model, make_model, save_model


def test_untrained_model_file_loads_without_optimizer_warning(tmp_path: Path) -> None:
    from securefl.ml._tf import keras

    model = make_model((16, 16, 1), 4, kind="small", augment=False)
    compile_model(model)
    path = save_model(model, tmp_path / "model.keras")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = keras().models.load_model(path)
    assert not [w for w in caught if "Skipping variable loading" in str(w.message)]
    assert loaded.optimizer.built
