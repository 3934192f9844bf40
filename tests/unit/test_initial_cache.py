"""The server's version-0 cache: the same weights as a build, never another spec's or
another code's, never an entry someone else could have written, and a damaged entry is
built again."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import securefl.ml
from securefl.server import initial, v0cache
from securefl.server.initial import _build as build
from securefl.server.initial import ml_initial_weights
from securefl.server.v0cache import CACHE_ENV, cache_key

SPEC = {"image_size": 16, "channels": 1, "model_kind": "small",
        "classes": ["glioma", "meningioma", "notumor", "pituitary"], "seed": 3}


def _no_child(*_: object, **__: object) -> None:
    raise AssertionError("a child process was started although the cache holds the model")


@pytest.fixture(scope="module")
def fresh() -> tuple[np.ndarray, list[tuple[str, int]]]:
    """What the child makes, with no cache at all."""
    return build(SPEC, 300.0)


def test_a_kept_build_answers_the_same_spec_without_a_child_and_a_damaged_one_is_rebuilt(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh: tuple) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    built, layers = ml_initial_weights(SPEC)
    np.testing.assert_array_equal(built, fresh[0])
    assert layers == fresh[1]
    assert (tmp_path / "cache").stat().st_mode & 0o777 == 0o700
    with monkeypatch.context() as m:
        m.setattr(initial.subprocess, "run", _no_child)
        again, again_layers = ml_initial_weights(SPEC)
    np.testing.assert_array_equal(again, fresh[0])
    assert again_layers == fresh[1]
    # Cut short (a power loss while keeping it), empty, or not an array: built again.
    entry = tmp_path / "cache" / f"{cache_key(SPEC)}.npy"
    whole = entry.read_bytes()
    for damaged in (whole[:-100], b""):
        entry.write_bytes(damaged)
        rebuilt, _ = ml_initial_weights(SPEC)
        np.testing.assert_array_equal(rebuilt, fresh[0])
        assert entry.read_bytes() == whole  # and kept whole again


def _planted(folder: Path, vector: np.ndarray, layers: list[tuple[str, int]]) -> Path:
    """Another party's entry for SPEC: a version 0 of its choosing."""
    v0cache.keep(folder, cache_key(SPEC), vector, layers)
    return folder / f"{cache_key(SPEC)}.npy"


def test_an_entry_someone_else_could_have_written_is_never_taken(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh: tuple) -> None:
    folder = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(folder))
    chosen = np.full_like(fresh[0], 0.5)
    entry = _planted(folder, chosen, fresh[1])
    assert v0cache.read(folder, cache_key(SPEC)) is not None  # (the plant itself is valid)

    os.chmod(folder, 0o777)  # a shared folder: anyone may have put it there
    assert v0cache.read(folder, cache_key(SPEC)) is None
    os.chmod(folder, 0o700)
    os.chmod(entry, 0o666)  # a file anyone may have written
    assert v0cache.read(folder, cache_key(SPEC)) is None
    os.chmod(entry, 0o600)
    elsewhere = tmp_path / "elsewhere.npy"  # a symbolic link to a file of another's
    entry.replace(elsewhere)
    entry.symlink_to(elsewhere)
    assert v0cache.read(folder, cache_key(SPEC)) is None
    entry.unlink()
    _planted(folder, np.where(np.arange(chosen.size) == 7, np.inf, chosen).astype("<f4"),
             fresh[1])  # not a model: a value that is not finite
    assert v0cache.read(folder, cache_key(SPEC)) is None

    # And the server builds the real version 0 instead of any of them.
    _planted(folder, chosen, fresh[1])
    os.chmod(folder, 0o777)
    built, _ = ml_initial_weights(SPEC)
    np.testing.assert_array_equal(built, fresh[0])


def test_another_spec_other_ml_code_or_another_keras_backend_is_another_entry(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
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
    before = cache_key(SPEC)
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    assert cache_key(SPEC) != before
    monkeypatch.delenv("KERAS_BACKEND")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    (tmp_path / "keras.json").write_text('{"floatx": "float64"}')
    assert cache_key(SPEC) != before


def test_an_empty_setting_turns_the_cache_off(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, "")
    assert v0cache.cache_dir() is None
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert v0cache.cache_dir() == tmp_path / "securefl" / "initial"
