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

from securefl.fedopt.core import (
    CHUNK,
    FORMAT,
    NO_STATISTICS,
    STATE_NAMES,
    ServerOptimizer,
    ServerOptSettings,
    StatisticsLayout,
    statistics_layout,
)
from securefl.fedopt.state import MAGIC, StateHeader, StepReport, read_header, step_file

__all__ = [
    "CHUNK", "FORMAT", "MAGIC", "NO_STATISTICS", "STATE_NAMES", "ServerOptSettings",
    "ServerOptimizer", "StateHeader", "StatisticsLayout", "StepReport", "read_header",
    "statistics_layout", "step_file",
]
