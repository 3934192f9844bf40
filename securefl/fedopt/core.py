"""Settings, the statistics layout, the step itself and the in-memory optimiser (the
benchmarks' and tests'); the server streams its state with :mod:`securefl.fedopt.state`."""


from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable, Sequence
from typing import IO, Literal, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

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
        """Write the state in the on-disk format (:mod:`securefl.fedopt.state`), tagged
        ``version``."""
        from securefl.fedopt.state import save_optimizer

        save_optimizer(self, file, version=version)

    @classmethod
    def load(cls, file: IO[bytes]) -> tuple[ServerOptimizer, int | None]:
        """Read what :meth:`save` (or ``step_file``) wrote: ``(optimiser, version)``."""
        from securefl.fedopt.state import load_optimizer

        return load_optimizer(file)

    def to_bytes(self, *, version: int | None = None) -> bytes:
        """:meth:`save` into memory (a model-sized copy: fine for tests and small models)."""
        buf = io.BytesIO()
        self.save(buf, version=version)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> tuple[ServerOptimizer, int | None]:
        """The inverse of :meth:`to_bytes`."""
        return cls.load(io.BytesIO(data))
