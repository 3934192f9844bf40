"""The demo's sizes, apart from the demo itself: the CLI shows them as its options'
defaults without importing the demo (which loads the hospital and server code)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DemoSettings:
    """Defaults chosen so the run takes under three minutes on two quiet cores and the benefit
    of federation shows (docs/RESULTS.md has the longer experiment behind them, and the
    demo's times at 32, 48 and 64 px: four processes share the two cores)."""

    hospitals: int = 3
    rounds: int = 10
    epochs: int = 1
    image_size: int = 32
    train_images: int = 480
    test_images: int = 120
    model_kind: str = "small"
    seed: int = 0
    keep: Path | None = None
    #: Each hospital's [ml] min_validation_per_class; None: 5, or fewer when the rarest
    #: tumour type has fewer than 10 training scans (:func:`validation_minimum`).
    min_validation_per_class: int | None = None
