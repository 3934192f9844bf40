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

Running statistics (batch-norm moving means and variances) are not trained parameters,
and a server that moves the weights past the hospitals' models (momentum, a learning rate
above 1) leaves statistics measured on those models behind: the published model then
normalises with the wrong mean and variance and its accuracy collapses at inference
(measured in ``docs/RESULTS.md``).  So the statistics get their own rule
(``statistics``):

* ``follow`` (default) — the first step averages them plainly (the initial model's values are
  Keras' placeholders, mean 0 and variance 1: the first change is an initialisation, not a
  trend), later steps apply heavy-ball momentum with the same ``η`` and ``β`` as the weights,
  so they move with the weights they describe; variances are kept at 0 or above.  With
  ``fedadam`` the statistics are averaged plainly (a normalised, sign-like step means
  nothing for a mean or a variance).
* ``plain`` — always ``w += Δ``, as FedAvg does.

Which ranges of the vector are statistics comes from the layer names
(:func:`statistics_layout`); the server knows them from the model's weight spec.

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
from typing import IO, Literal, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from securefl.errors import ConfigError, DataError

#: Elements processed per slice: temporaries stay at a few hundred KB whatever the model size.
CHUNK = 1 << 16
#: Weight names whose values are running statistics, not trained parameters.
MEAN_SUFFIX, VARIANCE_SUFFIX = "moving_mean", "moving_variance"
FORMAT = "securefl-fedopt/1"

Kind = Literal["fedavg", "fedavgm", "fedadam"]
#: Number of state vectors each kind keeps.
STATE_NAMES: dict[str, tuple[str, ...]] = {"fedavg": (), "fedavgm": ("m",), "fedadam": ("m", "v")}


class ServerOptSettings(BaseModel):
    """How the server applies a round's mean update (the ``[server_opt]`` settings).

    The defaults (FedAvgM, η = 1, β = 0.3, statistics following the weights) are the ones
    measured best for this project's CNN on non-IID hospitals (``docs/RESULTS.md``);
    ``kind = "fedavg"`` with ``server_lr = 1`` is exactly the FedAvg used before.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Kind = "fedavgm"
    #: Server learning rate η: the multiple of the (momentum-filtered) mean update applied.
    server_lr: float = Field(1.0, gt=0, le=100)
    #: β (fedavgm) or β1 (fedadam): the weight of earlier rounds' updates.
    momentum: float = Field(0.3, ge=0, lt=1)
    #: β2 (fedadam only): decay of the squared-update average.
    beta2: float = Field(0.99, ge=0, lt=1)
    #: τ (fedadam only): added to √v; sets the smallest update size adapted to.
    eps: float = Field(1e-3, gt=0)
    #: Running statistics: "follow" the weights (momentum after the first step) or "plain".
    statistics: Literal["follow", "plain"] = "follow"

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


class StatisticsLayout(NamedTuple):
    """Where the running statistics sit in a weight vector, as ``(start, stop)`` ranges."""

    ranges: tuple[tuple[int, int], ...] = ()  # every statistic (means and variances)
    variances: tuple[tuple[int, int], ...] = ()  # the ones that must stay >= 0


NO_STATISTICS = StatisticsLayout()


def _merge(ranges: list[tuple[int, int]], start: int, stop: int) -> None:
    if ranges and ranges[-1][1] == start:
        ranges[-1] = (ranges[-1][0], stop)
    else:
        ranges.append((start, stop))


def statistics_layout(layers: Iterable[tuple[str, int]]) -> StatisticsLayout:
    """Find the running statistics from the weights' names (``.../moving_mean``,
    ``.../moving_variance``).

    ``layers`` are ``(name, size)`` pairs in vector order — for a Keras model,
    ``[(l.name, l.size) for l in weight_spec(model).layers]``.  Adjacent ranges are merged.
    """
    ranges: list[tuple[int, int]] = []
    variances: list[tuple[int, int]] = []
    offset = 0
    for name, size in layers:
        if size < 0:
            raise DataError(f"layer {name} has a negative size")
        if size and name.endswith((MEAN_SUFFIX, VARIANCE_SUFFIX)):
            _merge(ranges, offset, offset + size)
            if name.endswith(VARIANCE_SUFFIX):
                _merge(variances, offset, offset + size)
        offset += size
    return StatisticsLayout(tuple(ranges), tuple(variances))


def _checked(ranges: Iterable[Sequence[int]], size: int, what: str) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    for r in ranges:
        start, stop = (int(v) for v in r)
        if not 0 <= start <= stop <= size or (out and start < out[-1][1]):
            raise DataError(f"{what} range ({start}, {stop}) is out of order, overlapping or "
                            f"outside the {size}-element model")
        if stop > start:
            out.append((start, stop))
    return tuple(out)


def _pieces(size: int, stats: tuple[tuple[int, int], ...]) -> list[tuple[int, int, bool]]:
    """Cover ``[0, size)`` with ``(start, stop, is_statistics)`` pieces."""
    pieces: list[tuple[int, int, bool]] = []
    at = 0
    for start, stop in stats:
        if start > at:
            pieces.append((at, start, False))
        pieces.append((start, stop, True))
        at = stop
    if at < size:
        pieces.append((at, size, False))
    return pieces


class ServerOptimizer:
    """Applies mean updates to the global weights with a server learning rate and momentum.

    ``size`` is the length of the weight vector; ``statistics`` says where its running
    statistics are (:func:`statistics_layout`; none by default).
    """

    def __init__(
        self,
        settings: ServerOptSettings | None = None,
        size: int = 0,
        *,
        statistics: StatisticsLayout = NO_STATISTICS,
    ) -> None:
        if size < 1:
            raise DataError("the server optimiser needs the model's size (at least 1)")
        self.settings = settings or ServerOptSettings()
        self.size = int(size)
        ranges = _checked(statistics.ranges, self.size, "statistics")
        variances = _checked(statistics.variances, self.size, "variance")
        if any(not any(a <= s and e <= b for a, b in ranges) for s, e in variances):
            raise DataError("every variance range must lie inside a statistics range")
        self.statistics = StatisticsLayout(ranges, variances)
        self._pieces = _pieces(self.size, ranges)
        self.steps = 0
        self._state = {n: np.zeros(self.size, np.float32) for n in STATE_NAMES[self.settings.kind]}

    def _statistics_follow(self) -> bool:
        """Whether this step moves the statistics like the weights (see the module doc)."""
        s = self.settings
        if s.kind == "fedavg" and s.server_lr == 1.0:
            return False  # the weights are plainly averaged: so are the statistics, exactly
        return s.statistics == "follow" and s.kind != "fedadam" and self.steps > 0

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
        follow = self._statistics_follow()
        for start, stop, is_statistics in self._pieces:
            for a in range(start, stop, CHUNK):
                b = min(a + CHUNK, stop)
                if is_statistics and not follow:
                    np.add(weights[a:b], mean_update[a:b], out=out[a:b])
                else:
                    self._apply(weights[a:b], mean_update[a:b], out[a:b], a, b)
        if follow:  # extrapolated variances may cross 0; averaged ones cannot
            for a, b in self.statistics.variances:
                np.maximum(out[a:b], np.float32(0), out=out[a:b])
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
                "statistics": self.statistics._asdict(), "steps": self.steps,
                "version": version}
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
            layout = meta["statistics"]
            opt = cls(ServerOptSettings.model_validate(meta["settings"]), int(meta["size"]),
                      statistics=StatisticsLayout(tuple(map(tuple, layout["ranges"])),
                                                  tuple(map(tuple, layout["variances"]))))
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
