"""Fixtures for the ML tests.

Everything is tiny (48x48 images, a few hundred of them, 1-3 epochs) so the whole ML suite
runs in well under two minutes on two cores.  The synthetic data set is generated once per
session because generation (template load, slice caches) is the slow part.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from securefl.ml.settings import DEFAULT_CLASSES

SIZE = 48


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One balanced synthetic hospital: 480 training and 160 testing images at 48x48."""
    from securefl.ml.synth import synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(out, hospitals=1, seed=11, train_per_hospital=480, test_per_hospital=160,
               size=SIZE, image_format="png")
    return out / "hospital_1"


@pytest.fixture(scope="session")
def train_set(synth_root: Path):
    from securefl.ml.data import load_split

    return load_split(synth_root, "Training", classes=DEFAULT_CLASSES, size=SIZE)


@pytest.fixture(scope="session")
def test_set(synth_root: Path):
    from securefl.ml.data import load_split

    return load_split(synth_root, "Testing", classes=DEFAULT_CLASSES, size=SIZE)
