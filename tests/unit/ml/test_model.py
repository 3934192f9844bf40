"""The CNN builders and the weight vector that crosses into the federation layers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from securefl.errors import DataError
from securefl.ml.model import (
    WeightSpec,
    from_vector,
    load_model,
    make_model,
    save_model,
    to_vector,
    weight_spec,
)

SHAPE = (32, 32, 1)


@pytest.fixture(scope="module")
def seed_model():
    return make_model(SHAPE, 4, kind="seed", seed=0)


def test_seed_model_is_the_original_design(seed_model):
    kinds = [type(layer).__name__ for layer in seed_model.layers]
    core = [k for k in kinds if k in ("Conv2D", "MaxPooling2D", "Flatten", "Dense")]
    assert core == ["Conv2D", "Conv2D", "MaxPooling2D", "Flatten", "Dense"]
    convs = [layer for layer in seed_model.layers if type(layer).__name__ == "Conv2D"]
    assert [c.filters for c in convs] == [32, 64]
    assert seed_model.layers[-1].activation.__name__ == "softmax"
    assert seed_model.loss == "sparse_categorical_crossentropy"
    assert type(seed_model.optimizer).__name__ == "Adam"
    assert "IntensityWindow" in kinds  # preprocessing inside the model


def test_small_model_is_about_100k_parameters_at_any_size():
    for side in (64, 128):
        n = make_model((side, side, 1), 4, kind="small").count_params()
        assert 90_000 < n < 110_000


def test_colour_input_is_supported():
    model = make_model((32, 32, 3), 3, kind="small")
    assert model.input_shape == (None, 32, 32, 3) and model.output_shape == (None, 3)


def test_same_seed_same_weights_different_seed_different():
    a = to_vector(make_model(SHAPE, 4, seed=7))
    b = to_vector(make_model(SHAPE, 4, seed=7))
    c = to_vector(make_model(SHAPE, 4, seed=8))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_vector_round_trip_is_exact(seed_model):
    spec = weight_spec(seed_model)
    vec = to_vector(seed_model)
    assert vec.dtype == np.float32 and vec.ndim == 1 and vec.size == spec.size
    assert spec.size == seed_model.count_params()
    target = make_model(SHAPE, 4, kind="seed", seed=99)
    new = np.random.default_rng(0).standard_normal(vec.size).astype(np.float32)
    from_vector(target, new)
    assert np.array_equal(to_vector(target), new)
    # the order is the spec's: the first tensor is the first conv kernel
    first = spec.layers[0]
    kernel = target.get_layer("conv1").kernel.numpy()
    assert first.shape == kernel.shape
    assert np.array_equal(kernel.ravel(), new[: first.size])


def test_spec_travels_as_json(seed_model):
    spec = weight_spec(seed_model)
    again = WeightSpec.model_validate_json(spec.model_dump_json())
    assert again == spec
    assert all(layer.dtype == "float32" for layer in spec.layers)
    assert len({layer.name for layer in spec.layers}) == len(spec.layers)


def test_spec_includes_batch_norm_statistics():
    spec = weight_spec(make_model(SHAPE, 4, kind="small"))
    names = [layer.name for layer in spec.layers]
    assert any(n.endswith("moving_mean") for n in names)
    assert any(n.endswith("moving_variance") for n in names)


def test_wrong_vector_is_refused_clearly(seed_model):
    vec = to_vector(seed_model)
    with pytest.raises(DataError, match="same settings as the server"):
        from_vector(seed_model, vec[:-1])
    with pytest.raises(DataError, match="flat vector"):
        from_vector(seed_model, vec.reshape(1, -1))
    with pytest.raises(DataError, match="float32"):
        from_vector(seed_model, vec.astype(np.float64))
    bad = vec.copy()
    bad[3] = np.nan
    with pytest.raises(DataError, match="NaN"):
        from_vector(seed_model, bad)
    assert np.array_equal(to_vector(seed_model), vec)  # nothing was half-loaded


def test_saved_and_reloaded_model_predicts_identically(tmp_path):
    model = make_model(SHAPE, 4, kind="small", seed=3)
    from_vector(model, to_vector(model) + np.float32(0.01))  # not just the initial weights
    images = np.random.default_rng(1).integers(0, 255, (6, *SHAPE), dtype=np.uint8)
    path = save_model(model, tmp_path / "m" / "model.keras")
    again = load_model(path)
    assert np.array_equal(to_vector(again), to_vector(model))
    assert np.array_equal(again.predict(images, verbose=0), model.predict(images, verbose=0))


def test_load_errors(tmp_path):
    with pytest.raises(DataError, match="train first"):
        load_model(tmp_path / "none.keras")
    (tmp_path / "junk.keras").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"junk\.keras is damaged .*get --replace-trained"):
        load_model(tmp_path / "junk.keras")
    good = save_model(make_model(SHAPE, 4), tmp_path / "good.keras")
    (tmp_path / "cut.keras").write_bytes(good.read_bytes()[:2000])  # cut off: Keras said
    with pytest.raises(DataError) as cut:                            # "File not found"
        load_model(tmp_path / "cut.keras")
    assert "not found" not in cut.value.message.lower() and "damaged" in cut.value.message
    with pytest.raises(DataError, match=r"\.keras"):
        save_model(make_model(SHAPE, 4), tmp_path / "model.h5")


def test_a_full_disk_while_saving_keeps_the_old_model_and_leaves_no_half_copy(
        tmp_path, monkeypatch):
    """Walking it on a full disk: ``train`` ended in an OSError traceback after the whole
    training and left ``.model.tmp.keras`` (630 KB) behind.  Now one sentence, the model
    saved before intact, and no half-written copy."""
    import errno

    model = make_model(SHAPE, 4, kind="small", seed=3)
    path = save_model(model, tmp_path / "model.keras")
    before = path.read_bytes()

    def fills_the_disk(self, target, *args, **kwargs):
        Path(target).write_bytes(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(type(model), "save", fills_the_disk)
    with pytest.raises(DataError, match=r"could not save the model to .*model.keras \(No "
                       r"space left on device\); the model there before is intact"):
        save_model(model, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.keras"]
