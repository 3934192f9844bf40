"""The hospital's CNN, and its weights as one flat float32 vector plus a layer spec.

Two architectures, one builder (:func:`make_model`), following keras-io's
"image classification from scratch": preprocessing (the intensity window, and augmentation that
is only active while training) lives inside the model, so a saved ``.keras`` file classifies a
raw 8-bit image exactly the way it was trained.

Preprocessing (``securefl.ml.preprocess``): a per-image percentile window maps every image to
[0, 1] (unchanged by a global brightness scale); in training only, geometric augmentation
(flip, rotation, zoom) and intensity augmentation (gamma, contrast, blur, noise).

* ``seed``  — the original design: Conv2D(32, 3, relu) -> Conv2D(64, 3, relu) ->
  MaxPooling2D(2) -> Flatten -> Dense(classes, softmax).  ~1.0 M parameters at 128x128
  (almost all in the dense layer).
* ``small`` — four conv blocks with batch normalisation and global average pooling:
  ~98 k parameters whatever the image size, about twice as fast to train at 128x128.

Every layer is named and every initialiser is seeded, so two processes that call
``make_model`` with the same arguments get bit-identical weights and the same
:func:`weight_spec` — the server and every hospital start from the same global model.

Federation boundary: :func:`to_vector` / :func:`from_vector` move all float weights
(trainable and batch-norm statistics) as one float32 vector, ordered as in
:func:`weight_spec`.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from securefl.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    import keras

#: Hyper-parameters named up front.
DEFAULT_INPUT_SHAPE = (128, 128, 1)
DEFAULT_LEARNING_RATE = 1e-3
AUGMENT_ROTATION = 0.03  # fraction of a full turn (about +-11 degrees)
AUGMENT_ZOOM = 0.08
SMALL_FILTERS = (16, 32, 64, 128)
SMALL_DROPOUT = 0.2
SMALL_NORM = "batch"  # "group" (GroupNormalization) or "none": kept for experiments, see RESULTS
SMALL_GROUPS = 8
BN_MOMENTUM = 0.5  # moving statistics must track fast-changing activations (see docs/ML.md)


class LayerSpec(BaseModel):
    """One weight tensor: where it lives in the model and how to cut it out of the vector."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    shape: tuple[int, ...]
    dtype: Literal["float32"] = "float32"

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class WeightSpec(BaseModel):
    """The ordered layer specs of a model; ``size`` is the length of its weight vector."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    layers: tuple[LayerSpec, ...] = Field(min_length=1)

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.layers)


def _float_variables(model: keras.Model) -> list[Any]:
    return [v for v in model.weights if str(v.dtype) == "float32"]


def weight_spec(model: keras.Model) -> WeightSpec:
    """Names, shapes and dtype of every float weight, in vector order."""
    return WeightSpec(
        layers=tuple(
            LayerSpec(name=v.path, shape=tuple(int(d) for d in v.shape))
            for v in _float_variables(model)
        )
    )


def to_vector(model: keras.Model) -> np.ndarray:
    """All float weights as one contiguous float32 vector (a copy)."""
    parts = [np.asarray(v.numpy(), dtype=np.float32).ravel() for v in _float_variables(model)]
    return np.concatenate(parts).astype(np.float32, copy=False)


def from_vector(model: keras.Model, vec: np.ndarray) -> None:
    """Load a vector made by :func:`to_vector` (for a model of the same spec) into ``model``."""
    variables = _float_variables(model)
    vec = np.asarray(vec)
    expected = sum(int(np.prod(v.shape, dtype=np.int64)) for v in variables)
    if vec.ndim != 1 or vec.shape[0] != expected:
        raise DataError(
            f"the weight vector has {vec.size} values in shape {vec.shape} but this model needs "
            f"a flat vector of {expected}: the model on the server was built with a different "
            "image size, class list or model kind — use the same settings as the server "
            "(its [model.ml]); a federation whose model settings changed must start a new "
            "version 0 (docs/QUICKSTART.md, 'Changing the model')"
        )
    if vec.dtype != np.float32:
        raise DataError(f"weight vectors are float32, got {vec.dtype}")
    if not np.isfinite(vec).all():
        raise DataError("the weight vector contains NaN or infinite values: refusing to load it")
    offset = 0
    for v in variables:
        n = int(np.prod(v.shape, dtype=np.int64))
        v.assign(vec[offset : offset + n].reshape(tuple(v.shape)))
        offset += n


def make_model(
    input_shape: tuple[int, int, int] = DEFAULT_INPUT_SHAPE,
    num_classes: int = 4,
    *,
    kind: Literal["seed", "small"] = "small",
    seed: int = 0,
    augment: bool = True,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    prior_correction: bool = False,
) -> keras.Model:
    """Build and compile a CNN whose initial weights depend only on the arguments
    (``prior_correction``: see :func:`compile_model`)."""
    from securefl.ml._tf import keras as _keras

    k = _keras()
    layers = k.layers
    counter = iter(range(seed * 1000, seed * 1000 + 1000))

    def init() -> Any:
        return k.initializers.GlorotUniform(seed=next(counter))

    if len(input_shape) != 3 or input_shape[2] not in (1, 3):
        raise DataError(f"input shape must be (height, width, 1 or 3), got {input_shape}")
    from securefl.ml.preprocess import layer_classes

    custom = layer_classes()
    inputs = k.Input(shape=input_shape, name="image")
    x = custom["IntensityWindow"](name="intensity_window")(inputs)
    if augment:  # active only in training; identity at inference
        x = layers.RandomFlip("horizontal", seed=seed + 1, name="aug_flip")(x)
        x = layers.RandomRotation(AUGMENT_ROTATION, seed=seed + 2, name="aug_rotate")(x)
        x = layers.RandomZoom(AUGMENT_ZOOM, seed=seed + 3, name="aug_zoom")(x)
        x = custom["IntensityAugment"](seed=seed + 5, name="aug_intensity")(x)
    if kind == "seed":
        x = layers.Conv2D(32, 3, activation="relu", kernel_initializer=init(), name="conv1")(x)
        x = layers.Conv2D(64, 3, activation="relu", kernel_initializer=init(), name="conv2")(x)
        x = layers.MaxPooling2D(2, name="pool")(x)
        x = layers.Flatten(name="flatten")(x)
    elif kind == "small":
        for i, filters in enumerate(SMALL_FILTERS, start=1):
            x = layers.Conv2D(
                filters, 3, padding="same", use_bias=False, kernel_initializer=init(),
                name=f"block{i}_conv",
            )(x)
            if SMALL_NORM == "batch":
                x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"block{i}_bn")(x)
            elif SMALL_NORM == "group":
                x = layers.GroupNormalization(groups=SMALL_GROUPS, name=f"block{i}_gn")(x)
            x = layers.Activation("relu", name=f"block{i}_relu")(x)
            x = layers.MaxPooling2D(2, name=f"block{i}_pool")(x)
        x = layers.GlobalAveragePooling2D(name="gap")(x)
        x = layers.Dropout(SMALL_DROPOUT, seed=seed + 4, name="dropout")(x)
    else:
        raise DataError(f"unknown model kind {kind!r}: use 'seed' or 'small'")
    outputs = layers.Dense(
        num_classes, activation="softmax", kernel_initializer=init(), name="classes"
    )(x)
    model = k.Model(inputs, outputs, name=f"{kind}_cnn")
    compile_model(model, learning_rate, prior_correction=prior_correction)
    return model


def uses_prior_correction(model: keras.Model) -> bool:
    """Whether ``model`` is compiled with the prior-corrected loss (``securefl.ml.prior``)."""
    return type(getattr(model, "loss", None)).__name__ == "PriorCorrectedCrossentropy"


def compile_model(
    model: keras.Model, learning_rate: float = DEFAULT_LEARNING_RATE, *,
    prior_correction: bool = False,
) -> None:
    """(Re)compile with Adam and sparse categorical cross-entropy (fresh optimizer state).

    ``prior_correction`` uses the prior-corrected cross-entropy (``securefl.ml.prior``):
    ``train()`` then sets the class prior from each training set, so the model learns the
    class-balanced posterior whatever a hospital's mix of tumour types.
    """
    from securefl.ml._tf import keras as _keras

    k = _keras()
    if prior_correction:
        from securefl.ml.prior import loss_class

        loss: Any = loss_class()(int(model.output_shape[-1]))
    else:
        loss = "sparse_categorical_crossentropy"
    model.compile(
        optimizer=k.optimizers.Adam(learning_rate=learning_rate),
        loss=loss,
        metrics=["accuracy"],
    )


def save_model(model: keras.Model, path: str | Path) -> Path:
    """Save as a ``.keras`` file (written next to the target, then renamed into place)."""
    save_model_digest(model, path)
    return Path(path)


def save_model_digest(model: keras.Model, path: str | Path) -> str:
    """:func:`save_model`, returning the sha256 of the bytes it put in place.

    Why the digest of what was written rather than of the file read back later: another
    process may replace the file in between, and ``send`` must know the file training wrote.
    """
    from securefl.fsutil import file_sha256

    path = Path(path)
    if path.suffix != ".keras":
        raise DataError(f"model files end in .keras, got {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.keras")
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and not optimizer.built:
        # A model saved before its first training step (``get`` writes one) would store an
        # optimiser with no slots, and loading it made Keras warn "Skipping variable loading
        # for optimizer" on the next ``train``: saved with its (zero) slots, it loads cleanly.
        optimizer.build(model.trainable_variables)
    try:
        model.save(tmp)
        digest = file_sha256(tmp)
        if digest is None:
            raise DataError(f"the model just saved to {tmp} cannot be read back: check the "
                            "folder's permissions and free space, then train again")
        tmp.replace(path)
    except OSError as exc:
        # A full disk or a read-only folder: the model already there is intact, and the
        # half-written copy is not left behind (walking it, 630 KB of one stayed).
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise DataError(f"could not save the model to {path} ({exc.strerror or exc}); the "
                        "model there before is intact: free space or make the folder "
                        "writable, then run it again") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    return digest


def register_keras_objects() -> None:
    """Make securefl's own Keras objects (the intensity window, the intensity augmentation
    and the prior-corrected loss) known to Keras, so that plain ``keras.saving.load_model``
    reads a hospital's ``model.keras`` too: a hospital's IT team may want to use the model
    in its own tools, and without this Keras stops at the first custom layer."""
    from securefl.ml.preprocess import layer_classes
    from securefl.ml.prior import loss_class

    loss_class()
    layer_classes()


def load_model(path: str | Path) -> keras.Model:
    """Load a ``.keras`` file saved by :func:`save_model`."""
    from securefl.ml._tf import keras as _keras

    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"no model at {path}: train first (securefl client --config ... train) "
            "or download the global model"
        )
    register_keras_objects()  # the prior-corrected loss and the preprocessing layers
    try:
        with warnings.catch_warnings():
            # Only for model files written before ``save_model`` built the optimiser: those
            # have an optimiser with no slots, and Keras warns that it skips them, which is
            # expected and tells a user nothing.
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            return _keras().models.load_model(path)
    except Exception:  # a truncated or foreign file: say so plainly
        # Keras' own text for a cut-off file is "File not found", for a file that is there
        # (walking it); and the trained weights are gone with the file, so the way on is to
        # start again from the global model, not to "retrain" from nothing.
        raise DataError(f"{path} is damaged (not a readable .keras model, e.g. cut off): "
                        "move it away, then run `securefl client get --replace-trained` to "
                        "start again from the global model and train") from None
