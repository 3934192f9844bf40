"""The server optimiser's state, kept on disk next to the model store.

Why on disk and streamed: FedAvgM's momentum is one more model-sized vector.  Held in memory
it would stay resident for the server's whole life, on top of the global model and the round's
running sum.  ``securefl.fedopt.step_file`` instead reads the state saved with the current
model version and writes the next one slice by slice, so aggregation needs no more memory than
before.

Files in the store folder:

* ``server_opt.state``: the state saved with the latest model version.  It is tagged with that
  version, so a state that lags the store is detected.  That happens after a crash between
  publishing a version and renaming the new state into place.
* ``server_opt.state.tmp``: the next state, written during ``aggregate``.  It is renamed into
  place only once the new model version is stored.  Left over from a crash, the model store
  deletes it on start, as it does every ``*.tmp``.
* ``layers.json`` (``securefl.server.initial``): ``[name, size]`` of each weight tensor, for
  ML models; the optimiser finds the batch-norm statistics from them, which follow their own
  rule (``securefl.fedopt``).

Losing the state never loses a model version.  The momentum restarts from zero, and the audit
log says why.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import numpy as np

from securefl.errors import DataError
from securefl.fedopt import (
    NO_STATISTICS,
    ServerOptSettings,
    StatisticsLayout,
    StepReport,
    read_header,
    step_file,
)
from securefl.server import testhook
from securefl.server.store import StorageError, fault_reason

log = logging.getLogger("securefl.server")

STATE_FILE = "server_opt.state"

class OptimiserState:
    """Steps the global model through the server optimiser, with its state on disk."""

    def __init__(self, settings: ServerOptSettings, root: Path,
                 statistics: StatisticsLayout = NO_STATISTICS) -> None:
        self.settings, self.statistics = settings, statistics
        self.path = Path(root) / STATE_FILE
        self.tmp = self.path.with_name(STATE_FILE + ".tmp")

    def why_it_will_restart(self, version: int) -> str | None:
        """Why the next step will start the momentum from zero, read from the saved state's
        header only (None: it will continue).  Why at start-up: walking a restore, the
        operator heard of the restart only at the next ``aggregate``, far from its cause."""
        try:
            with open(self.path, "rb") as f:
                head = read_header(f)
        except FileNotFoundError:
            return "no saved state" if version > 0 else None
        except (OSError, DataError) as exc:
            return f"it cannot be read ({getattr(exc, 'message', None) or exc})"
        if head.settings.kind != self.settings.kind:
            return f"it was kept for {head.settings.kind}, the settings now say " \
                   f"{self.settings.kind}"
        if head.version != version:
            return f"it belongs to model version {head.version}, the latest is {version}"
        return None

    def step(self, weights: np.ndarray, mean_update: np.ndarray, version: int) -> StepReport:
        """Write the next weights into ``mean_update`` and the next state to the temporary
        file (fsynced).  ``weights`` are model ``version``.  Blocking: run it in a thread."""
        try:
            with contextlib.ExitStack() as stack:
                previous = None
                with contextlib.suppress(FileNotFoundError):
                    previous = stack.enter_context(open(self.path, "rb"))
                testhook.fail_write("store", self.tmp, "open")  # test-only; see its module
                target = stack.enter_context(open(self.tmp, "wb"))
                if testhook.armed("optimiser"):  # test-only; see its module
                    target = testhook.PauseHalfway(  # type: ignore[assignment]
                        target, "optimiser", weights.nbytes // 2, self.tmp)
                report = step_file(self.settings, self.statistics, weights, mean_update,
                                   previous=previous, version=version, target=target)
                testhook.fail_write("store", self.tmp, "write")
                target.flush()
                os.fsync(target.fileno())
            return report
        except OSError as exc:  # e.g. a full disk, a read-only store
            self.discard()
            raise StorageError(
                f"could not write the server optimiser state {self.tmp} "
                f"({fault_reason(exc)}); nothing was published and the previous version is "
                "intact", reason=fault_reason(exc)) from exc
        except BaseException:
            self.discard()
            raise

    def commit(self) -> None:
        """Make the temporary state the current one (after the new version is stored)."""
        os.replace(self.tmp, self.path)
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def discard(self) -> None:
        """Drop the temporary state (the new version could not be stored).

        Never raises: it runs while another error is on its way out, and on a read-only
        store the removal fails too -- raising here once hid that error behind "internal
        server error" (issue 14).  A stray file is deleted at the next start."""
        try:
            testhook.fail_write("store", self.tmp, "open")
            self.tmp.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not remove %s (%s); it is removed at the next start",
                        self.tmp, fault_reason(exc))

