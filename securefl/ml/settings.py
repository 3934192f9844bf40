"""A hospital's machine-learning settings, loaded from the ``[ml]`` table of a TOML file.

Kept here (not in the full hospital configuration) so the ML layer can be used and tested on
its own; the hospital configuration nests :class:`MLSettings` as its ``ml`` field.

Example ``hospital.toml``::

    [ml]
    data_dir = "data/hospital_1"     # holds Training/<class>/* and Testing/<class>/*
    model_dir = "runs/hospital_1"    # model.keras and history.jsonl are written here
    image_size = 128
    epochs = 2
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from securefl.errors import ConfigError

#: The four classes of the public brain-tumour MRI collections, in label order.
DEFAULT_CLASSES: tuple[str, ...] = ("glioma", "meningioma", "notumor", "pituitary")

ModelKind = Literal["seed", "small"]


class MLSettings(BaseModel):
    """Everything the local training, evaluation and classification need."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    data_dir: Path = Field(description="folder with Training/<class>/ and Testing/<class>/")
    model_dir: Path = Field(description="where model.keras and history.jsonl are kept")
    classes: tuple[str, ...] = DEFAULT_CLASSES
    image_size: int = Field(128, ge=16, le=1024, description="square input side in pixels")
    channels: Literal[1, 3] = Field(1, description="1 = grayscale (default), 3 = colour")
    model_kind: ModelKind = Field("seed", description="'seed' (original CNN) or 'small'")
    epochs: int = Field(1, ge=1, le=1000)
    batch_size: int = Field(32, ge=1, le=4096)
    learning_rate: float = Field(1e-3, gt=0, le=1)
    augment: bool = Field(True, description="random flips/rotations/zoom while training")
    prior_correction: bool = Field(
        True, description="factor this hospital's mix of tumour types out of the training "
                          "loss, so the model learns what tells the classes apart")
    seed: int = Field(0, ge=0, description="same seed everywhere = same initial weights")

    @field_validator("classes")
    @classmethod
    def _classes_ok(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(v) < 2:
            raise ValueError("at least two classes are needed")
        if len(set(v)) != len(v):
            raise ValueError("class names must be different from each other")
        return v

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, self.channels)

    @property
    def model_path(self) -> Path:
        return self.model_dir / "model.keras"

    @property
    def history_path(self) -> Path:
        return self.model_dir / "history.jsonl"


def load_ml_settings(path: str | Path) -> MLSettings:
    """Read the ``[ml]`` table of a TOML file; relative paths are relative to that file."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(
            f"configuration file {path} not found: check the path given with --config"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML ({exc}): fix the file and retry") from None
    table = doc.get("ml")
    if not isinstance(table, dict):
        raise ConfigError(f"{path} has no [ml] table: add one with at least data_dir and model_dir")
    base = path.resolve().parent
    table = dict(table)
    for key in ("data_dir", "model_dir"):
        if key in table and isinstance(table[key], str):
            p = Path(table[key]).expanduser()
            table[key] = p if p.is_absolute() else base / p
    try:
        return MLSettings.model_validate(table)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e['loc']) or 'ml'}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"{path} [ml]: {problems}") from None
