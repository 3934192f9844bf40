"""The server optimiser's state on disk, and a step that streams it.

File layout::

    b"SFLO1\\n" | u32 BE header_len | header JSON | state vectors (float32 LE, one after the
    other, in STATE_NAMES order) | one sha256 per state vector (32 bytes each)

Header: format, settings, size, statistics, steps, version.  One digest per vector, not one
for the file, because a step writes the vectors' slices interleaved (m then v for each
slice), yet each vector's own bytes arrive in order.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import IO, NamedTuple

import numpy as np
from pydantic import ValidationError

from securefl.errors import DataError
from securefl.fedopt.core import (
    CHUNK,
    FORMAT,
    STATE_NAMES,
    ServerOptimizer,
    ServerOptSettings,
    StatisticsLayout,
    _check_inputs,
    _layout,
    _run_step,
)

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
    # head is only read from previous: not None when head is not
    reader = None if head is None or previous is None else _StateReader(previous, head)
    names = STATE_NAMES[settings.kind]

    def state(a: int, b: int) -> dict[str, np.ndarray]:
        if reader is not None:
            return reader.get(a, b)
        return {n: np.zeros(b - a, np.float32) for n in names}

    writer = _StateWriter(target, settings, size, statistics, steps + 1, version + 1)
    _run_step(settings, statistics, steps, weights, mean_update, out, state, writer.put)
    writer.finish()
    return StepReport(steps + 1, restarted)


def save_optimizer(opt: ServerOptimizer, file: IO[bytes], *, version: int | None = None) -> None:
    """Write an in-memory optimiser's state, tagged ``version``."""
    writer = _StateWriter(file, opt.settings, opt.size, opt.statistics, opt.steps, version)
    state = opt.state_arrays()
    for a in range(0, opt.size, CHUNK):
        b = min(a + CHUNK, opt.size)
        writer.put(a, b, {n: v[a:b] for n, v in state.items()})
    writer.finish()


def load_optimizer(file: IO[bytes]) -> tuple[ServerOptimizer, int | None]:
    """Read a state file into an in-memory optimiser: ``(optimiser, version)``."""
    head = read_header(file)
    opt = ServerOptimizer(head.settings, head.size, statistics=head.statistics)
    reader = _StateReader(file, head)
    arrays = {n: np.empty(head.size, np.float32) for n in head.names}
    for a in range(0, head.size, CHUNK):
        b = min(a + CHUNK, head.size)
        for n, part in reader.get(a, b).items():
            arrays[n][a:b] = part
    reader.check()
    opt.load_state(arrays, head.steps)
    return opt, head.version
