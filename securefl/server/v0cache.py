"""Version-0 models the server built before, kept for the next federation with the same spec.

Why: building version 0 costs a child process 5-20 s of importing TensorFlow, paid again by
every new federation on the machine (each ``securefl demo``, each test server).  The same
spec with the same code and libraries builds the same weights, so a build is kept under a
key naming all of them (:func:`cache_key`).

What a kept build becomes is the first model of a federation, so the cache is only used
when nobody else can write to it: the folder and its files must belong to the server's
user and be writable by nobody else, and are opened without following symbolic links
(``SECUREFL_CACHE_DIR`` pointing at a shared folder, or a cache folder someone else made
first, turns it off rather than trusting it).  An entry is read whole and checked (one
vector of finite float32 values, as long as its layer sizes say) or built again.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from securefl.fsutil import replace_file

#: Where built version-0 models are kept; set empty to turn the cache off.  Default:
#: ``$XDG_CACHE_HOME/securefl/initial`` (``~/.cache/securefl/initial``).
CACHE_ENV = "SECUREFL_CACHE_DIR"

Layers = list[tuple[str, int]]


def cache_dir() -> Path | None:
    """The version-0 cache folder, or None when ``SECUREFL_CACHE_DIR`` is set empty."""
    env = os.environ.get(CACHE_ENV)
    if env is not None:
        return Path(env) if env else None
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "securefl" / "initial"


def _environment() -> str:
    """What else decides the weights: TensorFlow (under any of its distribution names),
    Keras and NumPy versions, the Keras backend and Keras' own settings file."""
    from importlib.metadata import distributions

    names = []
    for dist in distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name in ("keras", "numpy") or "tensorflow" in name or name.startswith("tf-"):
            names.append(f"{name}={dist.version}")
    keras_home = os.environ.get("KERAS_HOME") or str(Path.home() / ".keras")
    try:
        keras_json = (Path(keras_home) / "keras.json").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        keras_json = ""
    return json.dumps([sorted(names), os.environ.get("KERAS_BACKEND", "tensorflow"),
                       keras_json])


def cache_key(spec: Mapping[str, Any], sources: Path | None = None) -> str:
    """Names what the child would build: the spec, the libraries and their settings
    (:func:`_environment`), and every byte of securefl's ML code (``sources``), so a
    changed model, layer or initialiser can never be answered from an older build."""
    import securefl.ml

    root = sources or Path(securefl.ml.__file__).parent
    h = hashlib.sha256(json.dumps(dict(spec), sort_keys=True).encode())
    h.update(_environment().encode())
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:40]


def _private(st: os.stat_result, kind: int) -> bool:
    return (stat.S_IFMT(st.st_mode) == kind and st.st_uid == os.geteuid()
            and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def _read_private(path: Path) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not _private(os.fstat(f.fileno()), stat.S_IFREG):
            return None
        return f.read()


def _folder_ok(folder: Path) -> bool:
    try:
        return _private(os.lstat(folder), stat.S_IFDIR)
    except OSError:
        return False


def read(folder: Path, key: str) -> tuple[np.ndarray, Layers] | None:
    """The kept build for ``key``, or None (missing, not private, damaged: build again)."""
    if not _folder_ok(folder):
        return None
    try:
        raw_layers = _read_private(folder / f"{key}.json")
        raw_vector = _read_private(folder / f"{key}.npy")
        if raw_layers is None or raw_vector is None:
            return None
        layers = [(str(name), int(size)) for name, size in json.loads(raw_layers)]
        vector = np.load(io.BytesIO(raw_vector), allow_pickle=False)
        if not isinstance(vector, np.ndarray) or vector.ndim != 1 \
                or vector.dtype != np.dtype("<f4") \
                or sum(size for _, size in layers) != vector.shape[0] \
                or not np.isfinite(vector).all():
            return None
    except Exception:  # any damage (cut short, another format): build again
        return None
    return vector, layers


def keep(folder: Path, key: str, vector: np.ndarray, layers: Layers) -> None:
    """Keep a build (best effort: a cache that cannot be written only costs a build)."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not _folder_ok(folder):
            return  # someone else's or a shared folder: never written, never read
        parts = ((f"{key}.npy", lambda f: np.save(f, np.ascontiguousarray(vector, "<f4"))),
                 (f"{key}.json", lambda f: f.write(json.dumps(layers).encode())))
        for name, write in parts:
            replace_file(folder / name, write)
    except OSError:
        return
