"""A hospital's whole job in one object: the one owner of its local state.

Why one owner: the CLI, the hospital app (and its training child process) and the demo all
do the same things — get the global model, train on local scans, send the update through
secure aggregation, evaluate, classify — and each step depends on what the others left
behind (which global version the local model started from, whether and on what it was
trained, whether an update already went out).  Two front ends that kept this bookkeeping
each in their own way drifted apart before: the CLI's ``train`` never recorded that it had
trained, and the app sent a model cached before its child process trained.  Here every
path reads and writes the same files through the same methods.

Files in the hospital's ``state_dir`` (network state) and ``[ml] model_dir``:
  global.npy / global.json   the last downloaded global model and its version, sha256
  model.keras                the hospital's model: after ``get`` the global weights made its
                             own (``[ml] personalise``: by default whichever of the download
                             as is, its batch-norm statistics measured on its training scans,
                             and a fine-tuning epoch after that reads the validation scans
                             best), after ``train`` the trained model; what evaluate and
                             classify use.  Reloaded whenever the file changes
  local.json                 which global version the local model is based on, how it was
                             personalised, whether it was trained since, on how many scans,
                             and the sha256 of the trained weights (``send`` refuses a model
                             that is not that one) and of the model file after training
  trained.npy                the trained weights as one vector: ``send`` reads them without
                             importing TensorFlow while model.keras is the file training
                             wrote (otherwise it loads the model and checks its weights)
  send.json, sent/           the durable record of the last send and the updates handed to
                             rounds (``securefl.client.outbox``)
  history.jsonl              training and evaluation metrics over time (securefl.ml)
  log.jsonl                  the hospital's own log: every get, train and send step, and why
                             one stopped (``securefl.client.hospital_log``)

The first ``train`` after ``get`` starts from global.npy, and ``send`` computes the update
against it (the model as downloaded), never against the personalised copy: the
personalisation is the hospital's own and stays here.

TensorFlow work is blocking: async callers get it through ``asyncio.to_thread``.  The Keras
model and the decoded scans stay in memory between steps (the app and the demo run for many
rounds); they are read again only when their files change.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from securefl import config
from securefl.client import trained
from securefl.client.hospital_log import HospitalLog, logged
from securefl.client.outbox import Outbox, SendRecord, vector_sha256, write_json
from securefl.client.session import GlobalModel, HospitalSession, RoundOutcome, RoundStep
from securefl.config import ML_TABLE_ADVICE
from securefl.crypto.secagg.policy import SignedList
from securefl.errors import (
    ConfigError,
    DataError,
    HospitalBusyError,
    SecureFLError,
    ServerWentBackError,
    TransportError,
)
from securefl.fsutil import replace_file
from securefl.ml.settings import MLSettings
from securefl.protocol import messages as wm

if TYPE_CHECKING:  # pragma: no cover
    from securefl.ml.data import ImageSet
    from securefl.ml.train import Classification, EvalReport, ProgressFn, TrainResult

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


@dataclass(frozen=True)
class LocalState:
    """What the local model is: based on which global version, trained since, on how much."""

    base_version: int | None
    trained: bool
    num_samples: int
    #: sha256 of the trained weights (float32 little-endian): what ``send`` must find.
    weights_sha256: str | None = None
    #: The class order the model was trained with (its output units, in order).
    classes: tuple[str, ...] = ()
    #: How the downloaded global model was made this hospital's own (``"finetune"``,
    #: ``"recalibrate"``, ``"downloaded"``: kept as is because it read the validation scans
    #: best), "" for the global model as is without a choice; on how many training scans;
    #: the note: why not (or not all of it), and each candidate's figure under ``"best"``.
    personalisation: str = ""
    personalised_scans: int = 0
    personalisation_note: str = ""
    #: sha256 of the model file's bytes right after training: while the file is unchanged,
    #: ``send`` takes the trained weights from ``trained.npy`` without loading Keras.
    model_file_sha256: str | None = None


class Hospital:
    """One hospital: ``settings`` for the network, ``ml`` (may be None) for its data and model.

    Without ``ml`` (a site that trains with its own tools) ``get`` and ``send_update`` work;
    ``train``, ``evaluate``, ``classify`` and ``send`` need the ``[ml]`` table.
    """

    def __init__(self, settings: config.ClientSettings, ml: MLSettings | None) -> None:
        self.settings, self._ml = settings, ml
        self.state_dir = Path(settings.state_dir)
        self.outbox = Outbox(self.state_dir)
        self.log = HospitalLog(self.state_dir)
        self._model: Any = None  # a keras.Model; only securefl.ml names Keras
        self._model_ident: tuple[int, int, int] | None = None
        self._scans: dict[str, tuple[tuple[int, float], ImageSet]] = {}
        self._validation: tuple[ImageSet, ImageSet] | None = None  # (Training folder, part)

    @classmethod
    def from_file(cls, path: str | Path, *, require_ml: bool = True) -> Hospital:
        """Both halves of ``hospital.toml``: the connection and the ``[ml]`` table."""
        settings = config.load(path, config.ClientSettings)
        if settings.ml is None:
            if require_ml:
                raise ConfigError(f"{path} has no [ml] table: {ML_TABLE_ADVICE}")
            return cls(settings, None)
        return cls(settings, settings.ml)

    @property
    def ml(self) -> MLSettings:
        if self._ml is None:
            raise ConfigError("this hospital's settings have no [ml] table, which training, "
                              f"evaluating and classifying need: {ML_TABLE_ADVICE}")
        return self._ml

    @ml.setter
    def ml(self, value: MLSettings) -> None:
        self._ml = value

    @property
    def has_ml(self) -> bool:
        return self._ml is not None

    @property
    def name(self) -> str:
        from securefl.certs import load_credential

        return load_credential(self.settings.cert, self.settings.key).name

    def session(self) -> HospitalSession:
        return HospitalSession(self.settings)

    # -- local state -----------------------------------------------------------------------
    def global_meta(self) -> dict[str, Any] | None:
        path = self.state_dir / "global.json"
        try:
            meta = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            meta = None
        if not isinstance(meta, dict) or not isinstance(meta.get("version"), int):
            raise DataError(f"{path} is damaged (not the record `get` writes): run `securefl "
                            "client get` to download the global model again")
        return meta

    def server_went_back(self, server_version: int) -> str | None:
        """The sentence to show when the server's newest version is older than one this
        hospital already holds, else None.

        Why: a server started from an older backup of its store says "at version 1" while
        hospitals hold version 3; every download is then refused and every update told to
        "download, retrain and send again", which cannot help.  Saying what happened, and
        who can fix it, is the one useful answer (QUICKSTART §6, "Restoring from a backup")."""
        held = self._held_version()
        if held is None or server_version >= held:
            return None
        return _went_back(server_version, held)

    def _held_version(self) -> int | None:
        """The global version downloaded here (None: none, or a damaged record, which the
        next ``get`` replaces)."""
        try:
            held = self.global_meta()
        except DataError:
            return None
        return None if held is None else int(held["version"])

    async def check_server_not_behind(self, session: HospitalSession,
                                      server_version: int | None = None) -> None:
        """Refuse to go on with a server whose newest version is older than one held here,
        after telling it so.

        Why tell it: the refusal is this hospital's own, so without a word the server's
        console, audit log and administrator would learn nothing while the federation
        stalls.  The word is a ``join`` on the version held, which the server refuses and
        records (``refused``); it carries nothing of any update."""
        if server_version is None:
            # Asked now: a session lives on (the agent's, the app's) while versions are
            # published, so the welcome's version may be long out of date.
            server_version = (await session.status()).version
        held = await asyncio.to_thread(self._held_version)
        if held is None or server_version >= held:
            return
        with contextlib.suppress(SecureFLError, OSError):
            await session.conn.request(wm.Join(base_version=held))
        raise ServerWentBackError(_went_back(server_version, held))

    def global_weights(self) -> np.ndarray:
        """The downloaded global model's weights (``state/global.npy``), float32."""
        path = self.state_dir / "global.npy"
        try:
            return np.load(path, allow_pickle=False).astype(np.float32).reshape(-1)
        except FileNotFoundError:
            raise DataError("no downloaded global model: run `securefl client get` "
                            "first") from None
        except (OSError, ValueError, EOFError):
            raise DataError(f"{path} is damaged (cut off or overwritten): run `securefl "
                            "client get` to download the global model again") from None

    def local_state(self) -> LocalState:
        path = self.state_dir / "local.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return LocalState(None, False, 0)
        except (ValueError, UnicodeDecodeError):
            raw = None
        if not isinstance(raw, dict):
            raise DataError(
                f"{path} is damaged, so this hospital no longer knows what its local model "
                "was trained on: run `securefl client get --replace-trained` to start again "
                "from the global model (a training not yet sent is then replaced)")
        return LocalState(raw.get("base_version"), bool(raw.get("trained")),
                          int(raw.get("num_samples", 0)), raw.get("weights_sha256"),
                          tuple(raw.get("classes") or ()),
                          str(raw.get("personalisation") or ""),
                          int(raw.get("personalised_scans", 0)),
                          str(raw.get("personalisation_note") or ""),
                          raw.get("model_file_sha256"))

    def _set_local_state(self, state: LocalState) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.state_dir / "local.json", asdict(state), durable=True)

    def send_record(self) -> SendRecord | None:
        return self.outbox.record()

    def note_abandoned(self, round_id: int) -> None:
        self.outbox.note_abandoned(round_id)
        self.log.round_ended(round_id)

    def note_published(self, round_id: int, version: int) -> bool:
        """The server says ``round_id`` published ``version`` while this hospital was away;
        True when this hospital's update is in it (recorded as published, never resent)."""
        mine = self.outbox.note_published(round_id, version)
        if mine:
            self.log.round_published(round_id, version)
        return mine

    def sent_update(self, base_version: int) -> np.ndarray | None:
        return self.outbox.sent_update(base_version)

    @logged("send", base="base_version")
    def check_can_send(self, base_version: int) -> SignedList | None:
        """Raise if an update on ``base_version`` may not be sent; else the signed list a
        resend must repeat exactly (None: any round)."""
        return self.outbox.check_can_send(base_version)

    def data_summary(self) -> dict[str, dict[str, int]]:
        """Images per class in Training/ and Testing/, counted from file names (no decoding),
        subfolders included as training reads them."""
        from securefl.ml.data import scan_files

        summary: dict[str, dict[str, int]] = {}
        for split in ("Training", "Testing"):
            counts = {}
            for cls, folder_name in zip(self.ml.classes, self.ml.folders, strict=True):
                folder = self.ml.scans_dir / split / folder_name
                counts[cls] = len(scan_files(folder)[0]) if folder.is_dir() else 0
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
        state = self.local_state()
        if state.trained and state.classes and state.classes != ours:
            raise DataError(
                f"the local model was trained with the classes [{', '.join(state.classes)}] "
                f"but this hospital's [ml] classes are now [{', '.join(ours)}]: get the "
                "global model and train again")

    # -- ML (blocking) ------------------------------------------------------------------------
    def _model_file_ident(self) -> tuple[int, int, int] | None:
        try:
            st = self.ml.model_path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def model(self) -> Any:
        """The local Keras model, kept in memory and reloaded whenever its file changes.

        Why the file's identity: another process (the app's training child, a CLI run in a
        second terminal) may have written a newer model; reading the cached one would send
        or evaluate a stale model without a word.
        """
        ident = self._model_file_ident()
        if self._model is None or ident != self._model_ident:
            from securefl.ml.local import load_or_create_model

            self._model = load_or_create_model(self.ml)
            self._model_ident = ident
        return self._model

    def _saved_model(self) -> Any:
        """The model for evaluating and classifying: only one that was trained or downloaded."""
        from securefl.ml.local import load_saved_model

        if self._model is None or self._model_file_ident() != self._model_ident:
            self._model = load_saved_model(self.ml)
            self._model_ident = self._model_file_ident()
        return self._model

    def _after_save(self) -> None:
        self._model_ident = self._model_file_ident()

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

    @contextlib.contextmanager
    def busy(self, what: str) -> Iterator[None]:
        """This hospital's model and send record for ``what`` alone, against other processes.

        Why: two ``send`` commands both joined one round (the server counted the hospital
        twice and one send waited forever), and two ``train`` runs, or ``train`` beside
        ``get``, overwrite each other's model.  One lock (``state_dir/.work.lock``) for
        train, get and send, whichever program runs them; refused at once, never queued (a
        training can take hours)."""
        from securefl.fsutil import acquire, release

        try:
            key = acquire(self.state_dir / ".work.lock")
        except BlockingIOError:
            raise HospitalBusyError(
                f"another train, get or send of this hospital is running (in another "
                f"terminal, the app or a script; it holds {self.state_dir / '.work.lock'}), so "
                f"`{what}` was not run: wait for it to finish, then run `{what}` again"
            ) from None
        try:
            yield
        finally:
            release(key)

    @logged("train")
    def train(self, progress: ProgressFn | None = None,
              cancel: threading.Event | None = None) -> TrainResult:
        """Train the local model on this hospital's scans and record what was trained (base
        version, scans, the weights' sha256).  The first training after ``get`` starts from
        the global weights as downloaded (``global.npy``), not from the personalised model;
        a second one continues from the trained model."""
        with self.busy("train"):
            return self._train(progress, cancel)

    def _train(self, progress: ProgressFn | None,
               cancel: threading.Event | None) -> TrainResult:
        from securefl.ml.local import run_train
        from securefl.ml.model import to_vector

        self.check_classes()
        meta = self.global_meta()
        model = self.model()
        state = self.local_state()
        if meta is not None and not state.trained and state.base_version == meta["version"]:
            # Train from the global weights as downloaded, not from this hospital's
            # personalised copy: the update is trained minus downloaded.
            from securefl.ml.model import from_vector

            from_vector(model, self.global_weights())
        result = run_train(self.ml, model=model, data=self.scans("Training"),
                           progress=progress, cancel=cancel)
        if result.cancelled:
            self._model = None  # the file still holds the model; memory holds half a run
        else:
            self._after_save()
            base = meta["version"] if meta else None
            trained_w = to_vector(model)
            kept = trained.keep(self.state_dir, trained_w)
            self._set_local_state(LocalState(
                base, True, result.num_samples, vector_sha256(trained_w),
                tuple(self.ml.classes),
                model_file_sha256=result.model_file_sha256 if kept else None))
        self.log.trained(meta["version"] if meta else None, result.num_samples,
                         cancelled=result.cancelled)
        return result

    def validation(self) -> ImageSet:
        """The validation part of the Training folder (``securefl.ml.local.split_training``)."""
        from securefl.ml.local import split_training

        data = self.scans("Training")
        if self._validation is None or self._validation[0] is not data:
            self._validation = (data, split_training(self.ml, data)[1])
        return self._validation[1]

    def model_label(self) -> str:
        """Which model evaluates and classifies, in words (the version it comes from)."""
        from securefl.ml.local import PERSONALISATION_LABELS

        state = self.local_state()
        if state.trained:
            start = (f"global version {state.base_version}" if state.base_version is not None
                     else "a new model")
            return f"the local model trained here from {start}"
        if state.base_version is not None:
            how = PERSONALISATION_LABELS.get(state.personalisation)
            return f"global version {state.base_version}" + (f", {how}" if how else "")
        return "the local model"

    def evaluate(self, split: str = "validation") -> EvalReport:
        """Score the local model on this hospital's validation scans (what every round
        shows) or, with ``split="testing"``, on its Testing scans (figures to report)."""
        from securefl.ml.local import run_evaluate

        self.check_classes()
        model = self._saved_model()
        validation = self.validation()
        data = validation if split == "validation" else (
            self.scans("Testing") if split == "testing" else None)
        return run_evaluate(self.ml, model=model, data=data, split=split,
                            validation=validation)

    def classify(self, image: str | Path) -> Classification:
        """Calibrated probabilities for one scan, with the model's version and a
        low-confidence mark (``securefl.ml.local.run_classify``)."""
        from securefl.ml.data import load_image
        from securefl.ml.local import calibration_for, run_classify

        self.check_classes()
        load_image(image, self.ml.image_size, self.ml.channels, as_scan=True)  # or not a scan
        model = self._saved_model()
        validation = None
        if calibration_for(self.ml, model) is None:  # fitting one needs the scans
            with contextlib.suppress(DataError):  # else answered uncalibrated, and it says so
                validation = self.validation()
        return run_classify(self.ml, image, model=model, validation=validation,
                            model_label=self.model_label())

    def apply_global(self, weights: np.ndarray, version: int,
                     progress: ProgressFn | None = None, *,
                     personalise: bool = True,
                     cancel: threading.Event | None = None) -> LocalState:
        """Make the hospital's model the global one, personalised (what ``get`` ends with).

        The global weights are loaded and made this hospital's own as ``[ml] personalise``
        says (``securefl.ml.local.personalise``: batch-norm statistics re-measured on its
        training scans, a fine-tuning epoch); that model is what evaluate and classify use.
        global.npy keeps the model as downloaded, which ``send`` computes the update
        against.  When the scans cannot be used (none yet, a class with too few) the global
        model is kept as is and the reason is recorded (``LocalState.personalisation_note``).
        A saved model of another architecture (an older securefl's) is replaced by the one
        the settings build.  ``personalise=False`` keeps the global model as downloaded: for
        a caller that trains on it at once (the agent), since training starts from
        global.npy and replaces the model file, so a fine-tuning epoch would be thrown away.
        ``cancel`` set stops the fine-tuning epoch within a batch (the recalibrated model is
        kept, or under ``"best"`` the better of it and the download): a stopping agent must
        not wait minutes for it.
        """
        from securefl.ml.local import load_or_create_model
        from securefl.ml.local import personalise as personalise_model
        from securefl.ml.model import from_vector, save_model

        try:
            model = self.model()
        except DataError:
            model = self._model = load_or_create_model(self.ml, replace_other=True)
        from_vector(model, weights)
        trained.forget(self.state_dir)  # the last training's copy means nothing now
        kind, scans, note = "", 0, ""
        try:
            if not personalise:
                save_model(model, self.ml.model_path)
            else:
                made = personalise_model(self.ml, model, data=self.scans("Training"),
                                         seed=version, progress=progress, cancel=cancel)
                kind = "" if made.kind == "none" else made.kind
                scans, note = made.scans, made.note
        except DataError as exc:
            note = exc.message
            from_vector(model, weights)  # nothing half-done: the global model as is
            save_model(model, self.ml.model_path)
        self._after_save()
        state = LocalState(version, False, 0, personalisation=kind, personalised_scans=scans,
                           personalisation_note=note)
        self._set_local_state(state)
        return state

    @logged("send")
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
        global_w = self.global_weights()
        local_w = trained.kept(self.state_dir, self.ml.model_path, state.model_file_sha256,
                               state.weights_sha256)
        if local_w is None:  # an older state folder, or the model file changed since
            local_w = to_vector(self.model())
        if local_w.shape != global_w.shape:
            raise DataError("the local model does not match the global model's shape: check "
                            "the [ml] settings against the server's model")
        if state.weights_sha256 is not None and vector_sha256(local_w) != state.weights_sha256:
            raise DataError(f"{self.ml.model_path} is not the model that was trained (it "
                            "changed since training): train again, then send")
        return local_w - global_w, state.num_samples, int(meta["version"])

    # -- federation (async) --------------------------------------------------------------------
    def unsent_training(self, server_version: int) -> int | None:
        """The version a trained local model is based on, when that model could still be
        sent (trained on ``server_version``, its update not sent yet); otherwise None."""
        state = self.local_state()
        if not (self.has_ml and state.trained and state.base_version == server_version):
            return None
        rec = self.send_record()
        if rec is not None and rec.base_version == server_version and (
                rec.stage == "published" or rec.pending_round is not None):
            return None  # already went out: nothing to lose
        return server_version

    def holds_untrained(self, version: int) -> bool:
        """True when global ``version`` is already here, made this hospital's own, and not
        trained on: a round on that version can start training at once.

        Why: an agent downloads (and fine-tunes) every version it helped publish right
        away, to evaluate it; the next round opens on that same version, and doing it all
        again cost a fine-tuning epoch per round for nothing."""
        if not self.has_ml or not (self.state_dir / "global.npy").is_file():
            return False
        meta, state = self.global_meta(), self.local_state()
        return (meta is not None and int(meta["version"]) == version
                and state.base_version == version and not state.trained)

    @logged("get")
    async def get(self, session: HospitalSession,
                  on_progress: Callable[[int, int], None] | None = None, *,
                  replace_trained: bool = False,
                  on_personalise: ProgressFn | None = None,
                  personalise: bool = True,
                  cancel: threading.Event | None = None) -> GlobalModel:
        """Download (sha256-checked), keep it, and load it into the local model.

        ``on_progress`` hears the download's bytes; ``on_personalise`` every batch of the
        fine-tuning epoch that makes the model this hospital's own (called from a worker
        thread: the app hands it to its event loop).

        A local model trained on the version the server still has, and not sent, would be
        overwritten: that is refused unless ``replace_trained`` (training can take hours).
        ``personalise``, ``cancel``: see :meth:`apply_global`.
        """
        with self.busy("get"):
            return await self._get(session, on_progress, replace_trained=replace_trained,
                                   on_personalise=on_personalise, personalise=personalise,
                                   cancel=cancel)

    async def _get(self, session: HospitalSession,
                   on_progress: Callable[[int, int], None] | None, *, replace_trained: bool,
                   on_personalise: ProgressFn | None, personalise: bool,
                   cancel: threading.Event | None) -> GlobalModel:
        known = None  # the server's version, when already asked
        if not replace_trained and self.has_ml:
            known = (await session.status()).version
            if (base := self.unsent_training(known)) is not None:
                raise DataError(
                    f"the local model was trained on version {base} and its update has not "
                    "been sent; getting the global model would overwrite that training: send "
                    "it first, or get with --replace-trained to discard it")
        # before downloading what it would refuse
        await self.check_server_not_behind(session, known)
        model = await session.get_global(on_progress)
        try:
            held = await asyncio.to_thread(self.global_meta)
        except DataError:  # a damaged record: this download is what replaces it
            held = None
        if held is not None and model.version < int(held["version"]):
            # Versions only go up.  A server that goes back could lead this hospital to
            # send a second update on an old version after its record of the first moved
            # on, and two sums on one version can be subtracted (docs/SECURITY.md).
            raise ServerWentBackError(self.server_went_back(model.version) or (
                f"the server offered global version {model.version}, but this hospital "
                f"already had version {held['version']}: global versions never go back, so "
                "nothing was saved or loaded; tell the federation operator"))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # Written whole or not at all: a full disk must not leave a cut-off copy.
        replace_file(self.state_dir / "global.npy",
                     functools.partial(np.save, arr=model.weights, allow_pickle=False))
        write_json(self.state_dir / "global.json",
                    {"version": model.version, "sha256": model.sha256,
                     "contributors": model.contributors, "total_samples": model.total_samples,
                     "created": model.created, "classes": list(model.classes)})
        if self._ml is not None:
            await asyncio.to_thread(functools.partial(
                self.apply_global, model.weights, model.version, on_personalise,
                personalise=personalise, cancel=cancel))
            from securefl.ml.train import append_history

            # every download, whichever way it was made (app, CLI, agent): the app's
            # History lists versions from this file
            await asyncio.to_thread(
                append_history, self.ml.history_path,
                {"event": "get", "version": model.version, "sha256": model.sha256,
                 "contributors": model.contributors, "total_samples": model.total_samples})
        self.log.downloaded(model.version, model.contributors, model.total_samples,
                            model.sha256)
        return model

    @logged("send")
    async def send(self, session: HospitalSession,
                   on_step: Callable[[RoundStep], None] | None = None) -> RoundOutcome:
        """Send the trained model's update through one secure-aggregation round."""
        update, samples, base = await asyncio.to_thread(self.local_update)
        outcome = await self.send_update(session, update, samples, base, on_step=on_step)
        assert outcome is not None  # only ``leave_after`` returns without an outcome
        return outcome

    @logged("send", base="base")
    async def send_update(self, session: HospitalSession, update: np.ndarray, samples: int,
                          base: int, *, on_step: Callable[[RoundStep], None] | None = None,
                          **round_options: Any) -> RoundOutcome | None:
        """Send ``update`` (trained on version ``base``), keeping the durable send record.

        ``round_options`` go to ``HospitalSession.send`` (``leave_after`` for dropout tests).
        """
        update = np.ascontiguousarray(update, dtype=np.float32).reshape(-1)
        # Before the round: an update on an old version after a newer one was held is what
        # the never-go-back rule of ``get`` is there to prevent.
        await self.check_server_not_behind(session)
        with self.busy("send"):
            journal, required = self.outbox.begin(base, samples, update,
                                                  session.settings.policy.max_attempts)
            meta = self.global_meta()
            sha = meta.get("sha256") if meta and meta.get("version") == base else None
            try:
                return await session.send(update, samples, base_version=base,
                                          on_step=on_step,
                                          journal=self.log.follow(journal, base, samples),
                                          base_sha256=sha, bound_to=required,
                                          **round_options)
            except TransportError as exc:
                raise TransportError(self._lost_during_send(str(exc), base)) from exc

    def _lost_during_send(self, reason: str, base: int) -> str:
        """What became of the update when the connection ended mid-send, from the send
        record (the transport alone could only say "if an update was being sent")."""
        reason = reason.split(":", 1)[0].split(";", 1)[0]
        record = self.outbox.record()
        if (record is not None and record.base_version == base
                and record.round_id is not None and record.round_id in record.masked_rounds):
            return (f"{reason} after this hospital's masked update went into round "
                    f"{record.round_id}, before the round published: nothing is lost; once "
                    "the server is back, run send again (it says whether the round "
                    "published, and otherwise sends the same update into the next round)")
        return (f"{reason} before this hospital's update went into a round: nothing of it "
                "was used; once the server is back, run send again")


def _went_back(server_version: int, held: int) -> str:
    return (f"the server's newest global version is {server_version}, but this hospital "
            f"already has version {held}: global versions never go back, so the server's "
            "model store was probably restored from an older backup; nothing was sent or "
            "saved here: ask the federation operator to restore the newest backup")
