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

Memory: :meth:`ServerOptimizer.step` works in slices of :data:`CHUNK` elements and writes
the new weights into the mean update's own buffer by default, so a step allocates no further
model-sized array.  The in-memory optimiser (benchmarks, tests) keeps one float32 state
vector for ``fedavgm`` and two for ``fedadam``.  The server keeps none: :func:`step_file`
streams the state from the file saved with the current model version into a new file, one
slice at a time, so the server's memory stays what secure aggregation alone needs.

Persistence: one format for both (``MAGIC`` header, the state vectors, a sha256 per vector;
see :func:`read_header`), tagged with the model version the state belongs to.  The previous
file is never modified: a round that fails to publish leaves it as it was.

Pure numpy and pydantic: the server imports this, and the server must never load TensorFlow.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import struct
from collections.abc import Callable, Iterable, Sequence
from typing import IO, Literal, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from securefl.errors import DataError

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


def _follows(s: ServerOptSettings, steps: int) -> bool:
    """Whether a step moves the statistics like the weights (see the module doc)."""
    if s.kind == "fedavg" and s.server_lr == 1.0:
        return False  # the weights are plainly averaged: so are the statistics, exactly
    return s.statistics == "follow" and s.kind != "fedadam" and steps > 0


def _update(s: ServerOptSettings, w: np.ndarray, d: np.ndarray, out: np.ndarray,
            st: dict[str, np.ndarray]) -> None:
    """One slice of a step; ``st`` holds this slice of each state vector, updated in place."""
    lr = np.float32(s.server_lr)
    if s.kind == "fedavg":
        if s.server_lr == 1.0:
            np.add(w, d, out=out)  # exactly plain FedAvg
        else:
            np.add(w, lr * d, out=out)
        return
    m = st["m"]
    if s.kind == "fedavgm":
        m *= np.float32(s.momentum)
        m += d
        np.add(w, lr * m, out=out)
        return
    v = st["v"]  # fedadam
    m *= np.float32(s.momentum)
    m += np.float32(1.0 - s.momentum) * d
    v *= np.float32(s.beta2)
    v += np.float32(1.0 - s.beta2) * np.square(d)
    step = np.sqrt(v)
    step += np.float32(s.eps)
    np.divide(m, step, out=step)
    step *= lr
    np.add(w, step, out=out)


#: ``state(a, b)`` -> this slice of every state vector (views, or buffers read from disk).
StateSlices = Callable[[int, int], dict[str, np.ndarray]]
#: ``sink(a, b, slices)`` receives the slices once updated (written to the next state file).
StateSink = Callable[[int, int, dict[str, np.ndarray]], None]


def _run_step(
    s: ServerOptSettings, layout: StatisticsLayout, steps: int, weights: np.ndarray,
    mean_update: np.ndarray, out: np.ndarray, state: StateSlices, sink: StateSink | None,
) -> None:
    """The whole step, slice by slice in increasing order: that order is what lets the
    on-disk state be read from one file and written to the next as a stream."""
    follow = _follows(s, steps)
    for start, stop, is_statistics in _pieces(weights.shape[0], layout.ranges):
        for a in range(start, stop, CHUNK):
            b = min(a + CHUNK, stop)
            st = state(a, b)
            if is_statistics and not follow:
                np.add(weights[a:b], mean_update[a:b], out=out[a:b])
            else:
                _update(s, weights[a:b], mean_update[a:b], out[a:b], st)
            if sink is not None:
                sink(a, b, st)
    if follow:  # extrapolated variances may cross 0; averaged ones cannot
        for a, b in layout.variances:
            np.maximum(out[a:b], np.float32(0), out=out[a:b])


def _check_inputs(size: int, weights: np.ndarray, mean_update: np.ndarray,
                  out: np.ndarray | None) -> np.ndarray:
    """Shapes, dtypes and finiteness, checked before any state changes; returns ``out``."""
    for what, arr in (("weights", weights), ("mean update", mean_update)):
        if not isinstance(arr, np.ndarray) or arr.dtype != np.float32 or arr.shape != (size,):
            raise DataError(f"the {what} must be a float32 vector of {size} values, "
                            f"got {getattr(arr, 'dtype', type(arr))} {np.shape(arr)}")
        for a in range(0, size, CHUNK):
            if not np.isfinite(arr[a:a + CHUNK]).all():
                raise DataError(f"the {what} contains NaN or infinite values: refusing "
                                "to apply the round")
    if weights is mean_update:
        raise DataError("weights and mean update must be different arrays")
    out = mean_update if out is None else out
    if out.dtype != np.float32 or out.shape != (size,):
        raise DataError(f"out must be a float32 vector of {size} values")
    return out


def _layout(statistics: StatisticsLayout, size: int) -> StatisticsLayout:
    ranges = _checked(statistics.ranges, size, "statistics")
    variances = _checked(statistics.variances, size, "variance")
    if any(not any(a <= s and e <= b for a, b in ranges) for s, e in variances):
        raise DataError("every variance range must lie inside a statistics range")
    return StatisticsLayout(ranges, variances)


class ServerOptimizer:
    """Applies mean updates to the global weights with a server learning rate and momentum,
    keeping its state in memory (the benchmarks and tests; the server streams its state
    from disk with :func:`step_file` instead, so it holds no model-sized state vector).

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
        self.statistics = _layout(statistics, self.size)
        self.steps = 0
        self._state = {n: np.zeros(self.size, np.float32) for n in STATE_NAMES[self.settings.kind]}

    def step(
        self, weights: np.ndarray, mean_update: np.ndarray, *, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Return the next global weights; ``weights`` is left as it is unless it is ``out``.

        The result is written into ``out``, by default ``mean_update`` itself (the update is
        consumed, as plain FedAvg's ``np.add(new, weights, out=new)`` does).  Both inputs
        are checked before any state changes: a wrong shape or dtype, or a NaN/Inf anywhere,
        raises ``DataError`` and leaves the optimiser untouched.
        """
        out = _check_inputs(self.size, weights, mean_update, out)

        def views(a: int, b: int) -> dict[str, np.ndarray]:
            return {n: v[a:b] for n, v in self._state.items()}

        _run_step(self.settings, self.statistics, self.steps, weights, mean_update, out,
                  views, None)
        self.steps += 1
        return out

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

    def save(self, file: IO[bytes], *, version: int | None = None) -> None:
        """Write the state in the on-disk format (:func:`read_header`), tagged ``version``."""
        writer = _StateWriter(file, self.settings, self.size, self.statistics, self.steps,
                              version)
        for a in range(0, self.size, CHUNK):
            b = min(a + CHUNK, self.size)
            writer.put(a, b, {n: v[a:b] for n, v in self._state.items()})
        writer.finish()

    @classmethod
    def load(cls, file: IO[bytes]) -> tuple[ServerOptimizer, int | None]:
        """Read what :meth:`save` (or :func:`step_file`) wrote: ``(optimiser, version)``."""
        head = read_header(file)
        opt = cls(head.settings, head.size, statistics=head.statistics)
        reader = _StateReader(file, head)
        arrays = {n: np.empty(head.size, np.float32) for n in head.names}
        for a in range(0, head.size, CHUNK):
            b = min(a + CHUNK, head.size)
            for n, part in reader.get(a, b).items():
                arrays[n][a:b] = part
        reader.check()
        opt.load_state(arrays, head.steps)
        return opt, head.version

    def to_bytes(self, *, version: int | None = None) -> bytes:
        """:meth:`save` into memory (a model-sized copy: fine for tests and small models)."""
        buf = io.BytesIO()
        self.save(buf, version=version)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> tuple[ServerOptimizer, int | None]:
        """The inverse of :meth:`to_bytes`."""
        return cls.load(io.BytesIO(data))


# -- the state on disk -----------------------------------------------------------------------
#
#   b"SFLO1\n" | u32 BE header_len | header JSON | state vectors (float32 LE, one after the
#   other, in STATE_NAMES order) | one sha256 per state vector (32 bytes each)
#
# Header: format, settings, size, statistics, steps, version.  One digest per vector, not
# one for the file, because a step writes the vectors' slices interleaved (m then v for
# each slice) yet each vector's own bytes arrive in order.

MAGIC = b"SFLO1\n"
_HEADER_LEN = struct.Struct(">I")
_F32 = np.dtype("<f4")


class StateHeader(NamedTuple):
    settings: ServerOptSettings
    size: int
    statistics: StatisticsLayout
    steps: int
    version: int | None
    offset: int  # where the first state vector starts

    @property
    def names(self) -> tuple[str, ...]:
        return STATE_NAMES[self.settings.kind]


def read_header(file: IO[bytes]) -> StateHeader:
    """The header of a state file (positioned at its start); a bad one is a DataError."""
    try:
        magic = file.read(len(MAGIC))
        if magic != MAGIC:
            raise ValueError("not a securefl server-optimiser state file")
        (length,) = _HEADER_LEN.unpack(file.read(_HEADER_LEN.size))
        if length > 1 << 20:
            raise ValueError("header too long")
        meta = json.loads(file.read(length))
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}")
        layout = meta["statistics"]
        statistics = StatisticsLayout(tuple(map(tuple, layout["ranges"])),
                                      tuple(map(tuple, layout["variances"])))
        size, steps, version = int(meta["size"]), int(meta["steps"]), meta["version"]
        if size < 1 or steps < 0:
            raise ValueError("size or step count out of range")
        return StateHeader(ServerOptSettings.model_validate(meta["settings"]), size,
                           _layout(statistics, size), steps,
                           None if version is None else int(version),
                           len(MAGIC) + _HEADER_LEN.size + length)
    except (OSError, ValueError, KeyError, TypeError, struct.error, ValidationError,
            DataError) as exc:
        raise DataError(f"the server optimiser state is unreadable ({exc})") from exc


class _StateReader:
    """Reads slices of every state vector from a state file, hashing each as it goes."""

    def __init__(self, file: IO[bytes], head: StateHeader) -> None:
        self.file, self.head = file, head
        self.hashes = {n: hashlib.sha256() for n in head.names}

    def get(self, a: int, b: int) -> dict[str, np.ndarray]:
        out = {}
        for k, n in enumerate(self.head.names):
            self.file.seek(self.head.offset + (k * self.head.size + a) * 4)
            raw = self.file.read((b - a) * 4)
            if len(raw) != (b - a) * 4:
                raise DataError("the server optimiser state is truncated")
            self.hashes[n].update(raw)
            out[n] = np.frombuffer(raw, dtype=_F32).astype(np.float32)  # a writable copy
        return out

    def check(self) -> None:
        """Compare the digests (call once every slice has been read, in order)."""
        self.file.seek(self.head.offset + len(self.head.names) * self.head.size * 4)
        for n in self.head.names:
            if self.file.read(32) != self.hashes[n].digest():
                raise DataError(f"the server optimiser state is corrupt (sha256 of {n!r})")


class _StateWriter:
    """Writes a state file slice by slice (each vector's slices in increasing order)."""

    def __init__(self, file: IO[bytes], settings: ServerOptSettings, size: int,
                 statistics: StatisticsLayout, steps: int, version: int | None) -> None:
        meta = json.dumps({"format": FORMAT, "settings": settings.model_dump(), "size": size,
                           "statistics": statistics._asdict(), "steps": steps,
                           "version": version}).encode()
        file.write(MAGIC + _HEADER_LEN.pack(len(meta)) + meta)
        self.file, self.size, self.offset = file, size, len(MAGIC) + _HEADER_LEN.size + len(meta)
        self.names = STATE_NAMES[settings.kind]
        self.hashes = {n: hashlib.sha256() for n in self.names}

    def put(self, a: int, b: int, slices: dict[str, np.ndarray]) -> None:
        for k, n in enumerate(self.names):
            raw = np.ascontiguousarray(slices[n], dtype=_F32).tobytes()
            self.file.seek(self.offset + (k * self.size + a) * 4)
            self.file.write(raw)
            self.hashes[n].update(raw)

    def finish(self) -> None:
        self.file.seek(self.offset + len(self.names) * self.size * 4)
        for n in self.names:
            self.file.write(self.hashes[n].digest())


class StepReport(NamedTuple):
    """What :func:`step_file` did: the step count after it, and why the state restarted from
    zero if it did (``None``: continued from the previous state, or there was none yet)."""

    steps: int
    restarted: str | None


def _usable(previous: IO[bytes], settings: ServerOptSettings, size: int,
            statistics: StatisticsLayout, version: int) -> StateHeader:
    """The previous state's header if it can continue: else a DataError saying why not."""
    head = read_header(previous)
    if head.settings.kind != settings.kind:
        raise DataError(f"it was kept for {head.settings.kind}, the settings now say "
                        f"{settings.kind}")
    if head.size != size or head.statistics != statistics:
        raise DataError("it describes a model of another shape")
    if head.version != version:
        raise DataError(f"it belongs to model version {head.version}, the latest is {version}")
    reader = _StateReader(previous, head)  # verify the digests before using any of it
    for a in range(0, size, CHUNK):
        reader.get(a, min(a + CHUNK, size))
    reader.check()
    return head


def step_file(
    settings: ServerOptSettings, statistics: StatisticsLayout, weights: np.ndarray,
    mean_update: np.ndarray, *, previous: IO[bytes] | None, version: int,
    target: IO[bytes], out: np.ndarray | None = None,
) -> StepReport:
    """One step with the state streamed from ``previous`` (the state saved with model
    ``version``, the one ``weights`` are) to ``target`` (tagged ``version + 1``).

    Why streamed: the server already holds the global model and the mean update; a resident
    momentum vector would add a third model-sized array for the server's whole life.  Here
    only one slice of the state is in memory at a time.  ``previous`` is never modified, so
    a failed round leaves it usable; the caller renames ``target`` into place once the new
    model version is stored.  A missing, unreadable, corrupt, mismatched or out-of-date
    previous state does not stop the round: the state restarts from zero (momentum is an
    accelerator, not part of the model) and the report says why.
    """
    size = int(weights.shape[0]) if isinstance(weights, np.ndarray) and weights.ndim == 1 \
        else -1
    if size < 1:
        raise DataError("the weights must be a non-empty float32 vector")
    statistics = _layout(statistics, size)
    out = _check_inputs(size, weights, mean_update, out)
    head, restarted = None, None
    if previous is not None:
        try:
            head = _usable(previous, settings, size, statistics, version)
        except DataError as exc:
            restarted = exc.message
    elif version > 0:
        restarted = "no saved state"
    steps = head.steps if head is not None else 0
    reader = _StateReader(previous, head) if previous is not None and head is not None \
        else None
    names = STATE_NAMES[settings.kind]

    def state(a: int, b: int) -> dict[str, np.ndarray]:
        if reader is not None:
            return reader.get(a, b)
        return {n: np.zeros(b - a, np.float32) for n in names}

    writer = _StateWriter(target, settings, size, statistics, steps + 1, version + 1)
    _run_step(settings, statistics, steps, weights, mean_update, out, state, writer.put)
    writer.finish()
    return StepReport(steps + 1, restarted)
