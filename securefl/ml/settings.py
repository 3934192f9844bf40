"""A hospital's machine-learning settings, loaded from the ``[ml]`` table of a TOML file.

Kept here (not in the full hospital configuration) so the ML layer can be used and tested on
its own; the hospital configuration nests :class:`MLSettings` as its ``ml`` field.

Example ``hospital.toml``::

    [ml]
    scans_dir = "data/hospital_1"     # holds Training/<class>/* and Testing/<class>/*
    model_dir = "runs/hospital_1"    # model.keras and history.jsonl are written here
    image_size = 128
    epochs = 2
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from securefl.errors import ConfigError

#: The four classes of the public brain-tumour MRI collections, in label order.
DEFAULT_CLASSES: tuple[str, ...] = ("glioma", "meningioma", "notumor", "pituitary")

ModelKind = Literal["seed", "small"]


class MLSettings(BaseModel):
    """Everything the local training, evaluation and classification need."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scans_dir: Path = Field(description="folder with Training/<class>/ and Testing/<class>/")
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


#: Keys of older kits, with the name that replaced each (a kit is not migrated silently:
#: the two ``data_dir`` keys held different things, so guessing could point at the wrong one).
RENAMED_KEYS: dict[tuple[str, ...], str] = {
    ("data_dir",): "state_dir (where the downloaded global model and round state are kept)",
    ("ml", "data_dir"): "scans_dir (the folder with Training/<class>/ and Testing/<class>/)",
}


def refuse_renamed_keys(path: Path, raw: dict[str, Any]) -> None:
    """Older kits' key names get an error naming the new key, before anything else."""
    for keys, new in RENAMED_KEYS.items():
        table: Any = raw
        for k in keys[:-1]:
            table = table.get(k) if isinstance(table, dict) else None
        if isinstance(table, dict) and keys[-1] in table:
            where = f"[{'.'.join(keys[:-1])}] " if len(keys) > 1 else ""
            raise ConfigError(f"{path}: {where}{keys[-1]} was renamed {new}: rename the key "
                              "in the file and run the command again")


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
    refuse_renamed_keys(path, doc)
    table = doc.get("ml")
    if not isinstance(table, dict):
        raise ConfigError(f"{path} has no [ml] table: add one with at least scans_dir and "
                          "model_dir")
    base = path.resolve().parent
    table = dict(table)
    for key in ("scans_dir", "model_dir"):
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
