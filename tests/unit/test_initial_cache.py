"""The server's version-0 cache: the same weights as a build, never another spec's or
another code's, and a damaged entry is built again."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import securefl.ml
from securefl.server import initial
from securefl.server.initial import CACHE_ENV, cache_key, ml_initial_weights
from securefl.server.initial import _build as build

SPEC = {"image_size": 16, "channels": 1, "model_kind": "small",
        "classes": ["glioma", "meningioma", "notumor", "pituitary"], "seed": 3}


def _no_child(*_: object, **__: object) -> None:
    raise AssertionError("a child process was started although the cache holds the model")


def test_a_kept_build_answers_the_same_spec_without_a_child_and_a_damaged_one_is_rebuilt(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    built, layers = ml_initial_weights(SPEC)
    fresh, fresh_layers = build(SPEC, 300.0)  # what the child makes, with no cache at all
    np.testing.assert_array_equal(built, fresh)
    assert layers == fresh_layers
    with monkeypatch.context() as m:
        m.setattr(initial.subprocess, "run", _no_child)
        again, again_layers = ml_initial_weights(SPEC)
    np.testing.assert_array_equal(again, fresh)
    assert again_layers == fresh_layers
    # A half-written entry (a server killed while keeping it) is built again, not read.
    entry = tmp_path / "cache" / f"{cache_key(SPEC)}.npy"
    entry.write_bytes(entry.read_bytes()[:-100])
    rebuilt, _ = ml_initial_weights(SPEC)
    np.testing.assert_array_equal(rebuilt, fresh)
    assert np.load(entry).shape == fresh.shape  # and kept whole again


def test_another_spec_or_other_ml_code_is_another_entry(tmp_path: Path) -> None:
    assert cache_key(SPEC) != cache_key({**SPEC, "seed": 4})
    assert cache_key(SPEC) != cache_key({**SPEC, "image_size": 32})
    assert cache_key(SPEC) == cache_key(dict(reversed(list(SPEC.items()))))
    code = tmp_path / "ml"
    shutil.copytree(Path(securefl.ml.__file__).parent, code,
                    ignore=shutil.ignore_patterns("__pycache__"))
    assert cache_key(SPEC, code) == cache_key(SPEC)
    model = code / "model.py"
    model.write_text(model.read_text() + "\n# another initialiser\n")
    assert cache_key(SPEC, code) != cache_key(SPEC)


def test_an_empty_setting_turns_the_cache_off(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, "")
    assert initial.cache_dir() is None
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert initial.cache_dir() == tmp_path / "securefl" / "initial"
