"""Server-side optimisers for federated averaging: what the server does with the mean update.

Why this exists: under secure aggregation the server learns only the sample-weighted mean
update ``Δ`` of a round, and plain FedAvg applies ``w += Δ``.  Treating ``-Δ`` as a
pseudo-gradient and giving the server its own learning rate and momentum ("adaptive
federated optimisation", Reddi et al. 2021; server momentum, Hsu et al. 2019) uses nothing
but ``Δ`` — so it needs no change to the secure round — and closes much of the gap between
FedAvg on non-IID sites and centralised training (measured in ``docs/RESULTS.md``).

Kinds (``η`` = ``server_lr``):

* ``fedavg``  — ``w ← w + η·Δ``; with ``η = 1`` this is plain FedAvg, bit for bit.
* ``fedavgm`` — ``m ← β·m + Δ;  w ← w + η·m`` (heavy-ball momentum, ``β`` = ``momentum``).
* ``fedadam`` — ``m ← β1·m + (1-β1)·Δ;  v ← β2·v + (1-β2)·Δ²;  w ← w + η·m / (√v + τ)``
  (Reddi et al.'s FedAdam, no bias correction; ``β1`` = ``momentum``, ``τ`` = ``eps``).

Running statistics (batch-norm moving means and variances) are not gradients' integrals:
extrapolating them with momentum can overshoot, and an adaptive step could even drive a
variance negative.  Ranges listed as ``plain`` (see :func:`statistics_ranges`) are therefore
always averaged exactly as FedAvg does (``w += Δ``), whatever the kind.

Memory: the server holds one model already; the state is one float32 vector for
``fedavgm`` and two for ``fedadam`` (none for ``fedavg``), and :meth:`ServerOptimizer.step`
works in slices of :data:`CHUNK` elements, writing the new weights into the mean update's
own buffer by default, so a step allocates no further model-sized array.

Persistence: :meth:`ServerOptimizer.save` / :meth:`ServerOptimizer.load` (an uncompressed
``.npz`` written to any binary file; :meth:`to_bytes` / :meth:`from_bytes` for small models
and tests) carry the settings, the step count, a caller-chosen ``version`` tag and the
state vectors.  ``step`` changes the state in place, so a caller that must be able to undo a
round (e.g. when storing the new model version fails) reloads the state it saved with the
previous version.

Pure numpy and pydantic: the server imports this, and the server must never load TensorFlow.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from securefl.errors import ConfigError, DataError

#: Elements processed per slice: temporaries stay at a few hundred KB whatever the model size.
CHUNK = 1 << 16
#: Weight names whose values are running statistics, not trained parameters.
STATISTIC_SUFFIXES = ("moving_mean", "moving_variance")
FORMAT = "securefl-fedopt/1"

Kind = Literal["fedavg", "fedavgm", "fedadam"]
#: Number of state vectors each kind keeps.
STATE_NAMES: dict[str, tuple[str, ...]] = {"fedavg": (), "fedavgm": ("m",), "fedadam": ("m", "v")}


class ServerOptSettings(BaseModel):
    """How the server applies a round's mean update (the ``[server_opt]`` settings).

    The defaults are plain FedAvg (``w += Δ``), the behaviour before this module existed.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Kind = "fedavg"
    #: Server learning rate η: the multiple of the (momentum-filtered) mean update applied.
    server_lr: float = Field(1.0, gt=0, le=100)
    #: β (fedavgm) or β1 (fedadam): the weight of earlier rounds' updates.
    momentum: float = Field(0.9, ge=0, lt=1)
    #: β2 (fedadam only): decay of the squared-update average.
    beta2: float = Field(0.99, ge=0, lt=1)
    #: τ (fedadam only): added to √v; sets the smallest update size adapted to.
    eps: float = Field(1e-3, gt=0)

    @model_validator(mode="after")
    def _finite(self) -> ServerOptSettings:
        for name in ("server_lr", "momentum", "beta2", "eps"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number")
        return self


def settings_from(mapping: dict | None) -> ServerOptSettings:
    """Settings from a TOML table (``None``: the defaults); bad values raise ``ConfigError``."""
    try:
        return ServerOptSettings.model_validate(mapping or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "server_opt"
        raise ConfigError(f"[server_opt] {where}: {first['msg']}") from None


def statistics_ranges(layers: Iterable[tuple[str, int]]) -> list[tuple[int, int]]:
    """``(start, stop)`` ranges of the running statistics in a weight vector.

    ``layers`` are ``(name, size)`` pairs in vector order — for a Keras model,
    ``[(l.name, l.size) for l in weight_spec(model).layers]``.  Adjacent ranges are merged.
    """
    ranges: list[tuple[int, int]] = []
    offset = 0
    for name, size in layers:
        if size < 0:
            raise DataError(f"layer {name} has a negative size")
        if name.endswith(STATISTIC_SUFFIXES) and size:
            if ranges and ranges[-1][1] == offset:
                ranges[-1] = (ranges[-1][0], offset + size)
            else:
                ranges.append((offset, offset + size))
        offset += size
    return ranges


def _segments(size: int, plain: Sequence[tuple[int, int]]) -> list[tuple[int, int, bool]]:
    """Cover ``[0, size)`` with ``(start, stop, is_plain)`` pieces, refusing bad ranges."""
    pieces: list[tuple[int, int, bool]] = []
    at = 0
    for start, stop in sorted((int(a), int(b)) for a, b in plain):
        if not 0 <= start <= stop <= size or start < at:
            raise DataError(f"plain range ({start}, {stop}) is out of order or outside "
                            f"the {size}-element model")
        if start > at:
            pieces.append((at, start, False))
        if stop > start:
            pieces.append((start, stop, True))
        at = stop
    if at < size:
        pieces.append((at, size, False))
    return pieces


class ServerOptimizer:
    """Applies mean updates to the global weights with a server learning rate and momentum.

    ``size`` is the length of the weight vector; ``plain`` lists ``(start, stop)`` ranges that
    are always plainly averaged (running statistics, see :func:`statistics_ranges`).
    """

    def __init__(
        self,
        settings: ServerOptSettings | None = None,
        size: int = 0,
        *,
        plain: Sequence[tuple[int, int]] = (),
    ) -> None:
        if size < 1:
            raise DataError("the server optimiser needs the model's size (at least 1)")
        self.settings = settings or ServerOptSettings()
        self.size = int(size)
        self.plain = [(int(a), int(b)) for a, b in plain]
        self._pieces = _segments(self.size, self.plain)
        self.steps = 0
        self._state = {n: np.zeros(self.size, np.float32) for n in STATE_NAMES[self.settings.kind]}

    # -- the update ------------------------------------------------------------------------

    def step(
        self, weights: np.ndarray, mean_update: np.ndarray, *, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Return the next global weights; ``weights`` is left as it is unless it is ``out``.

        The result is written into ``out``, by default ``mean_update`` itself (the update is
        consumed, as the server's ``np.add(new, weights, out=new)`` does today).  Both inputs
        are checked before any state changes: a wrong shape or dtype, or a NaN/Inf anywhere,
        raises ``DataError`` and leaves the optimiser untouched.
        """
        for what, arr in (("weights", weights), ("mean update", mean_update)):
            if not isinstance(arr, np.ndarray) or arr.dtype != np.float32 \
                    or arr.shape != (self.size,):
                raise DataError(f"the {what} must be a float32 vector of {self.size} values, "
                                f"got {getattr(arr, 'dtype', type(arr))} {np.shape(arr)}")
            for a in range(0, self.size, CHUNK):
                if not np.isfinite(arr[a:a + CHUNK]).all():
                    raise DataError(f"the {what} contains NaN or infinite values: refusing "
                                    "to apply the round")
        if weights is mean_update:
            raise DataError("weights and mean update must be different arrays")
        out = mean_update if out is None else out
        if out.dtype != np.float32 or out.shape != (self.size,):
            raise DataError(f"out must be a float32 vector of {self.size} values")
        for start, stop, is_plain in self._pieces:
            for a in range(start, stop, CHUNK):
                b = min(a + CHUNK, stop)
                if is_plain:
                    np.add(weights[a:b], mean_update[a:b], out=out[a:b])
                else:
                    self._apply(weights[a:b], mean_update[a:b], out[a:b], a, b)
        self.steps += 1
        return out

    def _apply(self, w: np.ndarray, d: np.ndarray, out: np.ndarray, a: int, b: int) -> None:
        s = self.settings
        lr = np.float32(s.server_lr)
        if s.kind == "fedavg":
            if s.server_lr == 1.0:
                np.add(w, d, out=out)  # exactly plain FedAvg
            else:
                np.add(w, lr * d, out=out)
            return
        m = self._state["m"][a:b]
        if s.kind == "fedavgm":
            m *= np.float32(s.momentum)
            m += d
            np.add(w, lr * m, out=out)
            return
        # fedadam
        v = self._state["v"][a:b]
        m *= np.float32(s.momentum)
        m += np.float32(1.0 - s.momentum) * d
        v *= np.float32(s.beta2)
        v += np.float32(1.0 - s.beta2) * np.square(d)
        step = np.sqrt(v)
        step += np.float32(s.eps)
        np.divide(m, step, out=step)
        step *= lr
        np.add(w, step, out=out)

    # -- state -----------------------------------------------------------------------------

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The state vectors by name (live views: copy them if the optimiser keeps running)."""
        return dict(self._state)

    def load_state(self, arrays: dict[str, np.ndarray], steps: int) -> None:
        """Replace the state (e.g. from :meth:`state_arrays` of a saved optimiser)."""
        names = STATE_NAMES[self.settings.kind]
        if set(arrays) != set(names):
            raise DataError(f"a {self.settings.kind} state holds {list(names) or 'nothing'}, "
                            f"got {sorted(arrays)}")
        fresh = {}
        for n in names:
            arr = np.asarray(arrays[n])
            if arr.dtype != np.float32 or arr.shape != (self.size,) \
                    or not np.isfinite(arr).all():
                raise DataError(f"server optimiser state {n!r} is not a finite float32 "
                                f"vector of {self.size} values")
            fresh[n] = np.array(arr, dtype=np.float32, copy=True)
        if steps < 0:
            raise DataError("a step count cannot be negative")
        self._state, self.steps = fresh, int(steps)

    def save(self, file: IO[bytes] | str | Path, *, version: int | None = None) -> None:
        """Write settings, step count, ``version`` and state as an uncompressed ``.npz``.

        ``version`` tags the model version this state belongs to, so a reader can tell a
        state that lags the model store.  Writing to a temporary file, fsyncing and renaming
        it into place (as the model store does) is the caller's part.
        """
        meta = {"format": FORMAT, "settings": self.settings.model_dump(), "size": self.size,
                "plain": self.plain, "steps": self.steps, "version": version}
        raw = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        np.savez(file, meta=raw, **self._state)

    @classmethod
    def load(cls, file: IO[bytes] | str | Path) -> tuple[ServerOptimizer, int | None]:
        """Read what :meth:`save` wrote: ``(optimiser, version)``; a bad file is a DataError."""
        try:
            with np.load(file, allow_pickle=False) as npz:
                meta = json.loads(bytes(npz["meta"]).decode())
                arrays = {n: npz[n] for n in npz.files if n != "meta"}
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}")
            opt = cls(ServerOptSettings.model_validate(meta["settings"]), int(meta["size"]),
                      plain=[tuple(r) for r in meta["plain"]])
        except (OSError, EOFError, ValueError, KeyError, TypeError, ValidationError,
                zipfile.BadZipFile) as exc:
            raise DataError(f"the server optimiser state is unreadable ({exc})") from exc
        opt.load_state(arrays, int(meta["steps"]))
        version = meta.get("version")
        return opt, None if version is None else int(version)

    def to_bytes(self, *, version: int | None = None) -> bytes:
        """:meth:`save` into memory (a model-sized copy: fine for tests and small models)."""
        buf = io.BytesIO()
        self.save(buf, version=version)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> tuple[ServerOptimizer, int | None]:
        """The inverse of :meth:`to_bytes`."""
        return cls.load(io.BytesIO(data))
