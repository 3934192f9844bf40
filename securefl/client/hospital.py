"""A hospital's whole job in one object: its own ML and its part in the federation.

Why one object: the CLI, the hospital TUI and the demo all do the same four things — get
the global model, train on local scans, send the update through secure aggregation,
evaluate — and each step depends on files the others wrote (which global version the local
model started from, how many scans it was trained on).  Keeping that bookkeeping here means
the three front ends cannot drift apart.

Files, all in the hospital's ``state_dir`` (network state) and ``[ml] model_dir``:
  global.npy / global.json   the last downloaded global model and its version, sha256
  model.keras                the local model (the global weights after ``get``, trained after
                             ``train``)
  local.json                 which global version the local model is based on, whether it
                             has been trained since, and on how many scans
  history.jsonl              training and evaluation metrics over time (securefl.ml)

TensorFlow work is blocking: async callers get it through ``asyncio.to_thread``.  The Keras
model and the decoded scans stay in memory between steps (a TUI or the demo runs for many
rounds); the scans are read again only when their folder changes.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from securefl import config
from securefl.client.session import GlobalModel, HospitalSession, RoundOutcome, RoundStep
from securefl.errors import ConfigError, DataError
from securefl.ml.settings import MLSettings

if TYPE_CHECKING:  # pragma: no cover
    from securefl.ml.data import ImageSet
    from securefl.ml.train import EvalReport, ProgressFn, TrainResult

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


@dataclass(frozen=True)
class LocalState:
    """What the local model is: based on which global version, trained since, on how much."""

    base_version: int | None
    trained: bool
    num_samples: int


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


class Hospital:
    """One hospital: ``settings`` for the network, ``ml`` for its data and model."""

    def __init__(self, settings: config.ClientSettings, ml: MLSettings) -> None:
        self.settings, self.ml = settings, ml
        self.state_dir = Path(settings.state_dir)
        self._model: Any = None  # a keras.Model; only securefl.ml names Keras
        self._scans: dict[str, tuple[tuple[int, float], ImageSet]] = {}

    @classmethod
    def from_file(cls, path: str | Path) -> Hospital:
        """Both halves of ``hospital.toml``: the connection and the ``[ml]`` table."""
        settings = config.load(path, config.ClientSettings)
        if settings.ml is None:
            raise ConfigError(f"{path} has no [ml] table: add scans_dir and model_dir for the "
                              "hospital's scans and model")
        return cls(settings, settings.ml)

    @property
    def name(self) -> str:
        from securefl.certs import load_credential

        return load_credential(self.settings.cert, self.settings.key).name

    def session(self) -> HospitalSession:
        return HospitalSession(self.settings)

    # -- local state -----------------------------------------------------------------------
    def global_meta(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.state_dir / "global.json").read_text())
        except FileNotFoundError:
            return None

    def local_state(self) -> LocalState:
        try:
            raw = json.loads((self.state_dir / "local.json").read_text())
        except FileNotFoundError:
            return LocalState(None, False, 0)
        return LocalState(raw.get("base_version"), bool(raw.get("trained")),
                          int(raw.get("num_samples", 0)))

    def _set_local_state(self, state: LocalState) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        _write_json(self.state_dir / "local.json", state.__dict__)

    def data_summary(self) -> dict[str, dict[str, int]]:
        """Images per class in Training/ and Testing/, counted from file names (no decoding)."""
        summary: dict[str, dict[str, int]] = {}
        for split in ("Training", "Testing"):
            counts = {}
            for cls, folder_name in zip(self.ml.classes, self.ml.folders, strict=True):
                folder = self.ml.scans_dir / split / folder_name
                counts[cls] = sum(1 for p in folder.glob("*")
                                  if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else 0
            summary[split] = counts
        return summary

    def check_classes(self) -> None:
        """Refuse to use a model whose labels mean other classes than this hospital's.

        The federation's class order comes with every downloaded version (``global.json``);
        a hospital whose ``[ml] classes`` differ would train, score and send with swapped
        labels and nobody would be told.  Called before train, evaluate, classify and send.
        """
        meta = self.global_meta()
        theirs = tuple(meta.get("classes") or ()) if meta else ()
        ours = tuple(self.ml.classes)
        if theirs and theirs != ours:
            raise DataError(
                f"the federation's model has the classes [{', '.join(theirs)}] but this "
                f"hospital's [ml] classes are [{', '.join(ours)}]: set classes to the "
                "federation's list in that order (map differently named folders in "
                "[ml.class_folders]), then get the global model again")

    # -- ML (blocking) ------------------------------------------------------------------------
    def model(self) -> Any:
        """The local Keras model, loaded (or built) once and kept."""
        if self._model is None:
            from securefl.ml.local import load_or_create_model

            self._model = load_or_create_model(self.ml)
        return self._model

    def scans(self, split: str) -> ImageSet:
        """Decoded scans of one split; decoded again only if files were added or changed."""
        from securefl.ml.local import load_data

        folder = self.ml.scans_dir / split
        files = [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
        signature = (len(files), max((p.stat().st_mtime for p in files), default=0.0))
        cached = self._scans.get(split)
        if cached is None or cached[0] != signature:
            cached = (signature, load_data(self.ml, split))
            self._scans[split] = cached
        return cached[1]

    def train(self, progress: ProgressFn | None = None,
              cancel: threading.Event | None = None) -> TrainResult:
        """Train the local model on this hospital's scans, starting from what it holds now."""
        from securefl.ml.local import run_train

        self.check_classes()
        meta = self.global_meta()
        result = run_train(self.ml, model=self.model(), data=self.scans("Training"),
                           progress=progress, cancel=cancel)
        if not result.cancelled:
            base = meta["version"] if meta else None
            self._set_local_state(LocalState(base, True, result.num_samples))
        return result

    def evaluate(self) -> EvalReport:
        from securefl.ml.local import run_evaluate

        self.check_classes()
        return run_evaluate(self.ml, model=self.model(), data=self.scans("Testing"))

    def classify(self, image: str | Path) -> dict[str, float]:
        from securefl.ml.local import run_classify

        self.check_classes()
        if not self.ml.model_path.is_file():
            raise DataError("there is no model yet: get the global model or train first")
        return run_classify(self.ml, image, model=self.model())

    def apply_global(self, weights: np.ndarray, version: int) -> None:
        """Make the local model the global one (what ``get`` ends with)."""
        from securefl.ml.model import from_vector, save_model

        model = self.model()
        from_vector(model, weights)
        save_model(model, self.ml.model_path)
        self._set_local_state(LocalState(version, False, 0))

    def local_update(self) -> tuple[np.ndarray, int, int]:
        """``(w_local - w_global, samples, base version)`` of the trained local model."""
        from securefl.ml.model import to_vector

        self.check_classes()
        state, meta = self.local_state(), self.global_meta()
        if meta is None:
            raise DataError("no global model downloaded yet: get the global model, train, "
                            "then send")
        if not state.trained or state.num_samples < 1:
            raise DataError("the local model has not been trained since the last download: "
                            "train first")
        if state.base_version != meta["version"]:
            raise DataError(f"the local model was trained from version {state.base_version} "
                            f"but version {meta['version']} was downloaded since: train again")
        global_w = np.load(self.state_dir / "global.npy").astype(np.float32)
        local_w = to_vector(self.model())
        if local_w.shape != global_w.shape:
            raise DataError("the local model does not match the global model's shape: check "
                            "the [ml] settings against the server's model")
        return local_w - global_w, state.num_samples, int(meta["version"])

    # -- federation (async) --------------------------------------------------------------------
    async def get(self, session: HospitalSession,
                  on_progress: Callable[[int, int], None] | None = None) -> GlobalModel:
        """Download (sha256-checked), keep it, and load it into the local model."""
        model = await session.get_global(on_progress)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        np.save(self.state_dir / "global.npy", model.weights)
        _write_json(self.state_dir / "global.json",
                    {"version": model.version, "sha256": model.sha256,
                     "contributors": model.contributors, "total_samples": model.total_samples,
                     "created": model.created, "classes": list(model.classes)})
        await asyncio.to_thread(self.apply_global, model.weights, model.version)
        return model

    async def send(self, session: HospitalSession,
                   on_step: Callable[[RoundStep], None] | None = None) -> RoundOutcome:
        """Send the trained model's update through one secure-aggregation round."""
        update, samples, base = await asyncio.to_thread(self.local_update)
        outcome = await session.send(update, samples, base_version=base, on_step=on_step)
        assert outcome is not None
        return outcome
