"""Only securefl.ml imports TensorFlow, and only when a model is actually needed."""

from __future__ import annotations

import json
import subprocess
import sys

ML_MODULES = [
    "securefl.ml",
    "securefl.ml.settings",
    "securefl.ml.model",
    "securefl.ml.data",
    "securefl.ml.synth",
    "securefl.ml.train",
    "securefl.ml.local",
    "securefl.cli",
]


def _modules_after(code: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True, timeout=120,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_ml_does_not_load_tensorflow_or_keras():
    mods = _modules_after("\n".join(f"import {m}" for m in ML_MODULES))
    assert "securefl.ml.model" in mods  # the imports really happened
    heavy = [m for m in mods if m.split(".")[0] in ("tensorflow", "keras", "nilearn")]
    assert heavy == []


def test_ml_imports_none_of_the_federation_layers():
    mods = _modules_after("\n".join(f"import {m}" for m in ML_MODULES if m != "securefl.cli"))
    forbidden = ("crypto", "protocol", "server", "client", "tui")
    assert [m for m in mods if m.split(".")[:2][-1] in forbidden and m.startswith("securefl.")] \
        == []


def test_tensorflow_import_is_quiet_and_skips_what_keras_only_probes_for():
    """The oneDNN start-up notice is filtered, but oneDNN itself stays on; scikit-learn and
    pandas (nilearn's dependencies, which Keras probes for at import) are not loaded with
    Keras, and can still be imported afterwards by whoever needs them; the import's objects
    are frozen, so garbage collections no longer walk them."""
    code = (
        "import os, sys\n"
        "from securefl.ml._tf import keras\n"
        "k = keras()\n"
        "print(os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'default'))\n"
        "print(sorted(m for m in ('sklearn', 'pandas') if m in sys.modules))\n"
        "import gc\n"
        "print(gc.get_freeze_count())\n"
        "import sklearn, pandas\n"
        "print(k.layers.Dense.__name__, sklearn.__name__, pandas.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert "oneDNN" not in out.stderr
    onednn, loaded, frozen, after = out.stdout.strip().splitlines()[-4:]
    assert onednn != "0"
    assert loaded == "[]"
    # The import's objects are frozen out of the collector's way (about 300 000 here).
    assert int(frozen) > 100_000
    assert after == "Dense sklearn pandas"
