"""The one place TensorFlow is imported (lazily), with its start-up noise filtered.

``import tensorflow`` writes a oneDNN notice (and an absl preamble) straight to file
descriptor 2 from C++, which ``TF_CPP_MIN_LOG_LEVEL`` does not silence.  Turning oneDNN off
(``TF_ENABLE_ONEDNN_OPTS=0``) would silence it but halves training speed on this class of
CPU, so instead the descriptor is pointed at a temporary file during the import and every
line that is not one of the known notices is written back.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from types import ModuleType

#: Substrings of the start-up lines that say nothing actionable to a hospital's operator.
_NOISE = (
    "oneDNN custom operations are on",
    "All log messages before absl::InitializeLog()",
    "This TensorFlow binary is optimized to use available CPU instructions",
    "To enable the following instructions:",
    "Unable to register cuDNN factory",
    "Unable to register cuFFT factory",
    "Unable to register cuBLAS factory",
    "computation placer already registered",
    "TF-TRT Warning",
)

_lock = threading.Lock()

#: Optional packages Keras probes for at import, to offer scikit-learn wrappers and pandas
#: inputs securefl never uses.  They are installed only as nilearn's dependencies (for its
#: brain template, read as files), and importing them cost 2-3 s of CPU in every process
#: that loads a model -- each CLI ``train``, ``get``, ``evaluate`` and ``classify``.
_UNUSED_BY_KERAS = ("sklearn", "pandas")


@contextlib.contextmanager
def _without_unused_optionals() -> Iterator[None]:
    """Make Keras' probes for :data:`_UNUSED_BY_KERAS` find nothing while it is imported.

    A module already imported (a caller's own code uses it) is left as it is, and the
    block is lifted afterwards, so importing them later works as usual."""
    blocked = [name for name in _UNUSED_BY_KERAS if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]  # "import name" -> ImportError
    try:
        yield
    finally:
        for name in blocked:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


def _filtered(text: str) -> str:
    return "".join(
        line for line in text.splitlines(keepends=True) if not any(n in line for n in _NOISE)
    )


def tensorflow() -> ModuleType:
    """Import and return ``tensorflow`` (quietly, once)."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    with _lock:
        if "tensorflow" in sys.modules:
            return sys.modules["tensorflow"]
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        sys.stderr.flush()
        saved = os.dup(2)
        with tempfile.TemporaryFile(mode="w+b") as tmp:
            os.dup2(tmp.fileno(), 2)
            try:
                with _without_unused_optionals():  # importing tensorflow imports keras
                    import tensorflow as tf

                tf.constant(0)  # the oneDNN notice is printed on first use, not import
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                tmp.seek(0)
                rest = _filtered(tmp.read().decode("utf-8", "replace"))
        if rest:
            sys.stderr.write(rest)
        # Retracing and similar notices are for TensorFlow developers, not for the people
        # training a hospital's model; real errors still get through.
        logging.getLogger("tensorflow").setLevel(logging.ERROR)
        # TensorFlow and Keras leave some 300 000 objects that live as long as the process;
        # every full garbage collection walked them all again, a third of the time of
        # allocation-heavy work after the import (bench/import_bench.py --gc).  Frozen, the
        # collector skips them; objects made later are collected as before.
        gc.collect()
        gc.freeze()
        return tf


def keras() -> ModuleType:
    """Import and return ``keras`` (Keras 3), after TensorFlow so the backend is set."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    tensorflow()
    with _without_unused_optionals():  # in case tensorflow did not import it already
        import keras as k

    return k
