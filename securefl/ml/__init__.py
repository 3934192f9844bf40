"""securefl.ml: the hospital's machine learning, and the only TensorFlow user.

Importing this package (or any module in it) does not load TensorFlow; functions that need a
model import it on first use (``securefl.ml._tf``), so the server, admin and crypto layers
start fast.  It imports no other securefl layer except ``securefl.errors``.

* ``settings`` — :class:`~securefl.ml.settings.MLSettings`, the ``[ml]`` table of a hospital file
* ``model``    — ``make_model``, ``to_vector`` / ``from_vector`` / ``weight_spec`` (the flat
  float32 vector and layer spec that the wire and secure aggregation carry), ``.keras`` I/O
* ``data``     — the ``Training/<class>``, ``Testing/<class>`` loader and the tf.data pipeline
* ``synth``    — synthetic MRI-like slices on the MNI152 template, per non-IID hospital
* ``train``    — ``train`` (progress, cancel, sample count), ``evaluate``, ``classify``
* ``local``    — the hospital's jobs from its settings (what the CLI and the TUI call)
"""
