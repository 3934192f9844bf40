"""``send`` takes the trained weights without TensorFlow, and never other weights.

``train`` keeps the trained weights in ``state/trained.npy`` with the model file's sha256;
``send`` (``Hospital.local_update``) reads them in a process that never imports TensorFlow
while the model file is the one training wrote, and otherwise loads the model and checks its
weights as before.  Each test compares the update with the trained model minus the model as
downloaded, computed here from the saved files.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from securefl.client.hospital import Hospital
from securefl.client.trained import TRAINED_FILE
from securefl.errors import DataError
from securefl.ml.local import new_model
from securefl.ml.model import from_vector, load_model, save_model, to_vector

from .test_personalise import _downloaded, _hospital, _ml

#: What ``client send`` does with a trained model, in a fresh process.
SEND_ALONE = """
import sys
from pathlib import Path
import numpy as np
from securefl import config
from securefl.client.hospital import Hospital
from securefl.ml.settings import MLSettings
tmp, out = Path(sys.argv[1]), sys.argv[2]
files = {"cert": tmp / "c.pem", "key": tmp / "k.pem", "ca": tmp / "ca.pem"}
settings = config.ClientSettings(**files, state_dir=tmp / "state")
ml_settings = MLSettings.model_validate_json((tmp / "ml.json").read_text())
update, samples, base = Hospital(settings, ml_settings).local_update()
np.save(out, update)
print(samples, base, "tensorflow" in sys.modules)
"""


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory: pytest.TempPathFactory, synth_root: Path) -> Path:
    """One hospital that downloaded version 0 and trained (each test works on a copy)."""
    root = tmp_path_factory.mktemp("trained")
    h = _hospital(root, _ml(root, synth_root, personalise="recalibrate"))
    _downloaded(h, to_vector(new_model(h.ml)), 0)
    h.train()
    return root


def _trained(tmp_path: Path, synth_root: Path, source: Path
             ) -> tuple[Hospital, np.ndarray, np.ndarray]:
    for part in ("state", "model"):
        shutil.copytree(source / part, tmp_path / part)
    h = _hospital(tmp_path, _ml(tmp_path, synth_root, personalise="recalibrate"))
    g = np.load(h.state_dir / "global.npy")
    return h, g, to_vector(load_model(h.ml.model_path))


def test_send_in_a_fresh_process_needs_no_tensorflow_and_sends_trained_minus_downloaded(
        tmp_path: Path, synth_root: Path, trained_once: Path) -> None:
    h, g, trained = _trained(tmp_path, synth_root, trained_once)
    out = tmp_path / "update.npy"
    (tmp_path / "ml.json").write_text(h.ml.model_dump_json())
    done = subprocess.run([sys.executable, "-c", SEND_ALONE, str(tmp_path), str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    samples, base, tf_loaded = done.stdout.split()
    assert (int(samples), int(base)) == (h.local_state().num_samples, 0)
    assert tf_loaded == "False"
    np.testing.assert_array_equal(np.load(out), trained - g)


def test_a_model_file_changed_since_training_is_refused_whatever_the_kept_copy_says(
        tmp_path: Path, synth_root: Path, trained_once: Path) -> None:
    h, _, trained = _trained(tmp_path, synth_root, trained_once)
    other = load_model(h.ml.model_path)
    from_vector(other, trained + np.float32(0.01))
    save_model(other, h.ml.model_path)  # e.g. a model copied in from elsewhere
    with pytest.raises(DataError, match="is not the model that was trained"):
        h.local_update()


def test_the_same_weights_saved_again_or_a_damaged_kept_copy_fall_back_to_the_model(
        tmp_path: Path, synth_root: Path, trained_once: Path) -> None:
    h, g, trained = _trained(tmp_path, synth_root, trained_once)
    kept = h.state_dir / TRAINED_FILE
    np.save(kept, trained + np.float32(1.0))  # the copy no longer matches its sha256
    update, _, _ = h.local_update()
    np.testing.assert_array_equal(update, trained - g)
    for damaged in (b"", b"not an array"):  # e.g. cut short by a power loss
        kept.write_bytes(damaged)
        np.testing.assert_array_equal(h.local_update()[0], trained - g)
    np.savez(kept.with_suffix(".npz"), trained)  # an archive, not an array
    kept.with_suffix(".npz").replace(kept)
    np.testing.assert_array_equal(h.local_update()[0], trained - g)
    np.save(kept, np.zeros(3, dtype=[("a", "<f4")]))  # another layout
    np.testing.assert_array_equal(h.local_update()[0], trained - g)
    kept.unlink()
    np.testing.assert_array_equal(h.local_update()[0], trained - g)
    same = load_model(h.ml.model_path)
    save_model(same, h.ml.model_path)  # other bytes, the trained weights
    np.testing.assert_array_equal(h.local_update()[0], trained - g)


def test_a_model_file_replaced_while_training_finishes_is_not_taken_for_the_trained_one(
        tmp_path: Path, synth_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process (a second terminal's ``get --replace-trained``) replaces model.keras
    between training's save and its record: ``send`` must not send the kept weights as if
    they were the file's."""
    import securefl.ml.local as local

    h = _hospital(tmp_path, _ml(tmp_path, synth_root, personalise="recalibrate"))
    g = to_vector(new_model(h.ml))
    _downloaded(h, g, 0)
    fit = local.fit_calibration

    def replaced_meanwhile(settings, model, validation):
        cal = fit(settings, model, validation)
        other = load_model(settings.model_path)
        from_vector(other, g + np.float32(0.01))
        save_model(other, settings.model_path)
        return cal

    monkeypatch.setattr(local, "fit_calibration", replaced_meanwhile)
    h.train()
    with pytest.raises(DataError, match="is not the model that was trained"):
        _hospital(tmp_path, h.ml).local_update()  # as `client send` does, in a new process


def test_get_drops_the_last_trainings_copy(tmp_path: Path, synth_root: Path,
                                           trained_once: Path) -> None:
    h, g, _ = _trained(tmp_path, synth_root, trained_once)
    assert (h.state_dir / TRAINED_FILE).is_file()
    _downloaded(h, g + np.float32(0.001), 1)
    assert not (h.state_dir / TRAINED_FILE).exists()
