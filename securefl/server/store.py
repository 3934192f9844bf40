"""The model store: every global version as one file, written so a crash never corrupts one.

File ``v<version:08d>.sflm``::

    b"SFLM1\\n" | u32 BE metadata_len | metadata JSON | weights (float32 little-endian)

Metadata: version, contributors, total_samples, created (UTC ISO), sha256 (of the weight
bytes), length and classes (the class names in label order; versions written before they
were recorded take the server's configured ones).

Why one file per version: nothing is ever rewritten, so the previous version stays
byte-identical whatever happens to the next one.  A version is written to a temporary name,
fsynced, renamed into place and the directory fsynced: after a crash (or ENOSPC) either the
whole new version exists or only a stray ``.tmp`` that the next start deletes.  Versions
only go up.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from securefl.errors import DataError
from securefl.fsutil import sync_folder
from securefl.server import testhook

MAGIC = b"SFLM1\n"


class StorageError(DataError):
    """The server could not write to its store folder (read-only, not permitted, disk full).

    A ``DataError`` for everything that already handles those; the coordinator tells it
    apart because a storage fault may pass: it then holds the round's result and publishes
    it once the store is writable again instead of giving the round up.
    """

    def __init__(self, message: str, *, reason: str, code: str | None = None) -> None:
        super().__init__(message, code=code)
        #: The system's words for the fault ("Read-only file system", "No space left ...").
        self.reason = reason


def fault_reason(exc: OSError) -> str:
    """The system's short description of a storage fault, for messages and the audit."""
    return exc.strerror or str(exc)
_LEN = struct.Struct(">I")


@dataclass(frozen=True)
class VersionInfo:
    version: int
    contributors: int
    total_samples: int
    created: str
    sha256: str
    length: int
    #: The model's class names in label order (empty for a plain vector model).
    classes: tuple[str, ...] = ()


def weights_sha256(weights: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(weights, dtype="<f4").data).hexdigest()


def initial_weights(params: int, seed: int, scale: float = 0.05) -> np.ndarray:
    """A reproducible starting vector when no ML model spec is given (tests, benchmarks)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(params) * scale).astype("<f4")


#: The next step after a damaged version file (a version hospitals may hold must come back
#: as it was; nothing else can stand in for it).
_RESTORE = "restore that file from a backup and start the server again"


class ModelStore:
    """Versions in one folder; the latest is kept in memory (it is what hospitals download)."""

    def __init__(self, root: Path, classes: tuple[str, ...] = (), *,
                 tidy: bool = True) -> None:
        """``tidy=False`` for a reader beside a running server (the demo and the unattended
        bench watch its store): a ``.tmp`` there is a version being written, not a stray."""
        self.root = Path(root)
        #: What new versions record, and what older versions without them are taken to have.
        self.classes = tuple(classes)
        if tidy:
            self.root.mkdir(parents=True, exist_ok=True)
            for stray in self.root.glob("*.tmp"):
                stray.unlink()
        self._latest: tuple[VersionInfo, np.ndarray] | None = None
        versions = self.versions()
        if versions:
            self._latest = self.read(versions[-1])

    def _path(self, version: int) -> Path:
        return self.root / f"v{version:08d}.sflm"

    def versions(self) -> list[int]:
        found = []
        for path in self.root.glob("v*.sflm"):
            try:
                found.append(int(path.stem[1:]))
            except ValueError:
                continue
        return sorted(found)

    @property
    def empty(self) -> bool:
        return self._latest is None

    def latest(self) -> tuple[VersionInfo, np.ndarray]:
        if self._latest is None:
            raise DataError(f"the model store {self.root} holds no version yet")
        return self._latest

    def read(self, version: int) -> tuple[VersionInfo, np.ndarray]:
        """Read and verify one version (its sha256 must match its weights)."""
        data = self._path(version).read_bytes()
        try:
            if not data.startswith(MAGIC):
                raise ValueError("magic")
            (meta_len,) = _LEN.unpack_from(data, len(MAGIC))
            start = len(MAGIC) + _LEN.size
            meta = json.loads(data[start : start + meta_len])
            weights = np.frombuffer(data, dtype="<f4", offset=start + meta_len)
            info = self._info(meta)
        except (ValueError, TypeError, struct.error) as exc:
            raise DataError(f"model version file {self._path(version)} is unreadable: "
                            f"{_RESTORE}") from exc
        if weights_sha256(weights) != info.sha256 or info.version != version:
            raise DataError(f"model version file {self._path(version)} is corrupt (its "
                            f"sha256 does not match): {_RESTORE}")
        return info, weights

    def _info(self, meta: dict) -> VersionInfo:
        classes = meta.pop("classes", None)
        return VersionInfo(**meta, classes=self.classes if classes is None else tuple(classes))

    def info(self, version: int) -> VersionInfo:
        """One version's metadata without reading its weights (for the admin's history)."""
        try:
            with self._path(version).open("rb") as f:
                head = f.read(len(MAGIC) + _LEN.size)
                if not head.startswith(MAGIC):
                    raise ValueError("magic")
                (meta_len,) = _LEN.unpack_from(head, len(MAGIC))
                return self._info(json.loads(f.read(meta_len)))
        except (OSError, ValueError, TypeError, struct.error) as exc:
            raise DataError(f"model version file {self._path(version)} is unreadable") from exc

    def write(
        self, weights: np.ndarray, *, contributors: int, total_samples: int,
        version: int | None = None,
    ) -> VersionInfo:
        """Publish the next version atomically; on any failure the store is unchanged."""
        current = -1 if self._latest is None else self._latest[0].version
        version = current + 1 if version is None else version
        if version <= current:
            raise DataError(f"version {version} would not go up from {current}")
        weights = np.ascontiguousarray(weights, dtype="<f4").reshape(-1)
        info = VersionInfo(
            version=version, contributors=contributors, total_samples=total_samples,
            created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            sha256=weights_sha256(weights), length=int(weights.shape[0]),
            classes=self.classes,
        )
        meta = json.dumps(info.__dict__).encode()
        final = self._path(version)
        if final.exists():
            # Never replaced: a version hospitals may hold is never swapped for another model
            # under the same number (the server's lock keeps a second server out; this
            # catches a file copied in by hand).
            raise DataError(f"version {version} already exists in {final}, although this "
                            f"server's newest is {current}: nothing was overwritten; move "
                            "that file out of the store and restart the server")
        tmp = final.with_name(final.name + ".tmp")
        try:
            testhook.fail_write("store", tmp, "open")  # test-only; see its module
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                with os.fdopen(fd, "wb", closefd=False) as f:
                    f.write(MAGIC)
                    f.write(_LEN.pack(len(meta)))
                    f.write(meta)
                    half = weights.shape[0] // 2
                    f.write(weights[:half].data)
                    testhook.pause("version", f, tmp)  # test-only; see its module
                    testhook.fail_write("store", tmp, "write")
                    f.write(weights[half:].data)
                    f.flush()
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except OSError as exc:
            # The clean-up may fail for the same reason (a read-only mount): the error that
            # matters is the write's, and a stray .tmp is deleted at the next start.
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise StorageError(
                f"could not write model version {version} ({fault_reason(exc)}); the previous "
                "version is intact", reason=fault_reason(exc)
            ) from exc
        self._latest = (info, weights)  # renamed into place: it is the latest, come what may
        sync_folder(self.root)  # the rename is done; at worst it is not yet durable
        testhook.stop("renamed", final)  # test-only: a kill here must not lose the record
        return info
