"""Prior-corrected cross-entropy: train as if every class were equally common.

Why: each hospital sees its own mix of tumour types (one referral centre gets mostly
gliomas, another mostly pituitary cases), and plain cross-entropy teaches a model that mix
as much as it teaches the scans.  In a federation every hospital's update then pulls the
global model toward its own mix, and the averaged model belongs to none of them.

The fix is logit adjustment (Menon et al. 2021, "Long-tail learning via logit adjustment";
in federated learning, FedLC, Zhang et al. 2022): while training, the model's probabilities
are multiplied by the local class prior ``π`` and renormalised before the loss,
``loss = CE(y, p·π / Σ p·π)``.  The prior then explains the class mix, and the model itself
learns the class-balanced posterior, which is the same at every hospital.  At inference
the model's own output is used, which suits a balanced question ("which tumour is this?").
A uniform prior gives plain cross-entropy exactly.

The prior lives in a non-trainable variable that :func:`set_prior` assigns before each
training run.  Changing it does not retrace the compiled training step, and the Adam state
is kept.  The prior is not a model weight: it stays with the hospital.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

_CLASS: Any = None


def loss_class() -> Any:
    """The Keras loss class, built (and registered for loading) on first use: TensorFlow
    is imported only by code that trains."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    from securefl.ml._tf import keras as _keras

    k: Any = _keras()  # Any: mypy takes no base class from a module attribute

    @k.saving.register_keras_serializable(package="securefl", name="PriorCorrectedCrossentropy")
    class PriorCorrectedCrossentropy(k.losses.Loss):
        def __init__(self, classes: int, name: str = "prior_corrected_crossentropy",
                     **kwargs: Any) -> None:
            super().__init__(name=name, **kwargs)
            self.classes = int(classes)
            self.prior = k.Variable(np.full(self.classes, 1.0 / self.classes, np.float32),
                                    trainable=False, name="class_prior")

        def call(self, y_true: Any, y_pred: Any) -> Any:
            adjusted = y_pred * self.prior
            adjusted = adjusted / k.ops.sum(adjusted, axis=-1, keepdims=True)
            return k.losses.sparse_categorical_crossentropy(y_true, adjusted)

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), "classes": self.classes}

    _CLASS = PriorCorrectedCrossentropy
    return _CLASS


def class_prior(counts: Sequence[int]) -> np.ndarray:
    """The training set's class frequencies, add-one smoothed so that a class a hospital has
    never seen still gets a small, finite prior."""
    c = np.asarray(counts, dtype=np.float64) + 1.0
    return (c / c.sum()).astype(np.float32)


def set_prior(model: Any, counts: Sequence[int]) -> bool:
    """Point a model compiled with the prior-corrected loss at this training set's class
    mix; returns False (and does nothing) for a model compiled with another loss."""
    loss = getattr(model, "loss", None)
    if _CLASS is None or not isinstance(loss, _CLASS):
        return False
    prior = class_prior(counts)
    if prior.shape != (loss.classes,):
        from securefl.errors import DataError

        raise DataError(f"the training data has {prior.shape[0]} classes, the model "
                        f"{loss.classes}")
    loss.prior.assign(prior)
    return True
