"""Intensity preprocessing and augmentation, as layers of the model.

Why inside the model: a saved ``.keras`` file then turns a raw image into what the network
saw in training by itself, so ``train``, ``evaluate`` and ``classify`` cannot disagree.

* :class:`IntensityWindow` (always on) maps each image on its own to [0, 1] between two
  percentiles of its pixel values (:data:`WINDOW_LOW`, :data:`WINDOW_HIGH`).  Real scans'
  mean brightness varies several-fold between scanners and exports (15-92 of 255 in the
  public collections); dividing by 255 made the network learn each scanner's brightness.
  A percentile window is unchanged by any global brightness scale or offset, and a few hot
  pixels do not decide it the way the maximum would.  8-bit and 16-bit files go through the
  same window (``securefl.ml.data`` maps 16-bit files onto 0-255 linearly first, which the
  window does not see).
* :class:`IntensityAugment` (training only) varies what differs between scanners and the
  window cannot remove: gamma (contrast curve), contrast around the image's mean, blur
  (resolution) and Gaussian noise, each with a random strength per image.

Both classes are built (and registered for loading) on first use, so importing this module
does not import TensorFlow (see ``securefl.ml._tf``).
"""

from __future__ import annotations

from typing import Any

#: The window: these quantiles of an image's pixel values map to 0 and 1 (clipped outside).
WINDOW_LOW = 0.005
WINDOW_HIGH = 0.995
#: Augmentation strengths (uniform per image): gamma exp(+-GAMMA), contrast x (1 +- CONTRAST)
#: around the mean, blur = a blend of up to BLUR of a 3x3 Gaussian, noise sigma up to NOISE.
AUG_GAMMA = 0.3
AUG_CONTRAST = 0.25
AUG_BLUR = 1.0
AUG_NOISE = 0.04

_CLASSES: dict[str, Any] = {}


def layer_classes() -> dict[str, Any]:
    """``{"IntensityWindow": cls, "IntensityAugment": cls}``, registered with Keras."""
    if _CLASSES:
        return _CLASSES
    from securefl.ml._tf import keras as _keras

    k: Any = _keras()  # Any: mypy takes no base class from a module attribute
    ops = k.ops

    @k.saving.register_keras_serializable(package="securefl", name="IntensityWindow")
    class IntensityWindow(k.layers.Layer):
        """Per image: ``(x - q_low) / (q_high - q_low)`` clipped to [0, 1], with ``q`` the
        image's own pixel quantiles (all channels together, so colour stays colour)."""

        def __init__(self, low: float = WINDOW_LOW, high: float = WINDOW_HIGH,
                     **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.low, self.high = float(low), float(high)

        def call(self, inputs: Any) -> Any:
            x = ops.cast(inputs, "float32")
            n = 1
            for d in x.shape[1:]:
                n *= int(d)
            flat = ops.sort(ops.reshape(x, (-1, n)), axis=-1)
            lo = flat[:, int(self.low * (n - 1))]
            hi = flat[:, round(self.high * (n - 1))]
            lo = ops.reshape(lo, (-1, 1, 1, 1))
            span = ops.reshape(hi, (-1, 1, 1, 1)) - lo
            # A flat image (all one value) has no window: it maps to zeros, not to NaN.
            span = ops.where(span > 0, span, ops.ones_like(span))
            return ops.clip((x - lo) / span, 0.0, 1.0)

        def compute_output_shape(self, input_shape: Any) -> Any:
            return input_shape

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), "low": self.low, "high": self.high}

    @k.saving.register_keras_serializable(package="securefl", name="IntensityAugment")
    class IntensityAugment(k.layers.Layer):
        """Random gamma, contrast, blur and noise per image while training; identity at
        inference.  Expects [0, 1] images (after :class:`IntensityWindow`)."""

        def __init__(self, gamma: float = AUG_GAMMA, contrast: float = AUG_CONTRAST,
                     blur: float = AUG_BLUR, noise: float = AUG_NOISE, seed: int = 0,
                     **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.gamma, self.contrast = float(gamma), float(contrast)
            self.blur, self.noise, self.seed = float(blur), float(noise), int(seed)
            self.seed_generator = k.random.SeedGenerator(self.seed)

        def _uniform(self, batch: Any, low: float, high: float) -> Any:
            return k.random.uniform((batch, 1, 1, 1), low, high, seed=self.seed_generator)

        def call(self, inputs: Any, training: bool | None = None) -> Any:
            if not training:
                return inputs
            x = ops.clip(inputs, 0.0, 1.0)
            batch = ops.shape(x)[0]
            channels = int(x.shape[-1])
            # gamma: the scanner's contrast curve
            x = ops.power(x, ops.exp(self._uniform(batch, -self.gamma, self.gamma)))
            # contrast around each image's mean
            mean = ops.mean(x, axis=(1, 2, 3), keepdims=True)
            x = (x - mean) * self._uniform(batch, 1 - self.contrast, 1 + self.contrast) + mean
            # blur: a random blend with a 3x3 Gaussian (in-plane resolution)
            g = ops.convert_to_tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
            kernel = ops.tile(ops.reshape(g, (3, 3, 1, 1)), (1, 1, channels, 1))
            blurred = ops.depthwise_conv(x, kernel, strides=1, padding="same")
            alpha = self._uniform(batch, 0.0, self.blur)
            x = x * (1 - alpha) + blurred * alpha
            # noise
            sigma = self._uniform(batch, 0.0, self.noise)
            return x + sigma * k.random.normal(ops.shape(x), seed=self.seed_generator)

        def compute_output_shape(self, input_shape: Any) -> Any:
            return input_shape

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), "gamma": self.gamma, "contrast": self.contrast,
                    "blur": self.blur, "noise": self.noise, "seed": self.seed}

    _CLASSES.update(IntensityWindow=IntensityWindow, IntensityAugment=IntensityAugment)
    return _CLASSES
