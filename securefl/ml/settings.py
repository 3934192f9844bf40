"""A hospital's machine-learning settings (the ``[ml]`` table) and the server's model spec.

Kept here (not in :mod:`securefl.config`) so the ML layer can be used and tested on its own;
the ML layer never reads files: :mod:`securefl.config` parses every TOML file once and nests
:class:`MLSettings` as the hospital's ``ml`` field and :class:`ModelSpec` as the server's
``[model.ml]``.

Example ``hospital.toml``::

    [ml]
    scans_dir = "data/hospital_1"     # holds Training/<class>/* and Testing/<class>/*
    model_dir = "runs/hospital_1"    # model.keras and history.jsonl are written here
    image_size = 128
    epochs = 2

    [ml.class_folders]                 # only where a folder is not named like its class
    glioma = "glioma_tumor"
    notumor = "no_tumor"
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from securefl.errors import ConfigError

#: The four classes of the public brain-tumour MRI collections, in label order.
DEFAULT_CLASSES: tuple[str, ...] = ("glioma", "meningioma", "notumor", "pituitary")

#: How the usual class (and folder) names read in a clinic: every place a clinician reads a
#: class (Get and Classify in the app, the CLI's evaluate and classify) uses these, so one
#: answer never says "notumor" where another says "no tumour".  JSON output and settings
#: keep the class names as the model knows them.
CLINICAL_NAMES: dict[str, str] = {
    "glioma": "glioma", "glioma_tumor": "glioma", "meningioma": "meningioma",
    "meningioma_tumor": "meningioma", "notumor": "no tumour", "no_tumor": "no tumour",
    "pituitary": "pituitary tumour", "pituitary_tumor": "pituitary tumour"}


def clinical_name(name: str) -> str:
    """The words a clinician reads for class ``name`` (another class: its name, spaced)."""
    return CLINICAL_NAMES.get(name, name.replace("_", " "))

ModelKind = Literal["seed", "small"]
#: What a hospital's own model adds to the downloaded global one (``securefl.ml.local.
#: personalise``); chosen on validation scans (docs/RESULTS.md, "Personalisation").
Personalisation = Literal["best", "finetune", "recalibrate", "none"]

#: Revision of the model the ML layer builds from a spec (preprocessing and augmentation
#: layers included).  Part of the federation's model identity: a store whose version 0 was
#: built by another revision is refused (docs/QUICKSTART.md, "Changing the model").
#: 2: per-image intensity window and intensity augmentation; "small" became the default.
MODEL_FORMAT = 2

#: Default of ``[ml] confidence_threshold``: below it an answer is marked low-confidence.
DEFAULT_CONFIDENCE_THRESHOLD = 0.7


class MLSettings(BaseModel):
    """Everything the local training, evaluation and classification need."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scans_dir: Path = Field(description="folder with Training/<class>/ and Testing/<class>/")
    model_dir: Path = Field(description="where model.keras and history.jsonl are kept")
    classes: tuple[str, ...] = DEFAULT_CLASSES
    image_size: int = Field(128, ge=16, le=1024, description="square input side in pixels")
    channels: Literal[1, 3] = Field(1, description="1 = grayscale (default), 3 = colour")
    model_kind: ModelKind = Field("small", description="'small' (4 conv blocks, the default) "
                                                       "or 'seed' (the original CNN)")
    epochs: int = Field(15, ge=1, le=1000, description="the most epochs per training run: "
                        "training stops earlier when the validation loss stops improving")
    patience: int = Field(2, ge=1, le=1000, description="epochs without a lower validation "
                          "loss before training stops (the best epoch's weights are kept)")
    validation_fraction: float = Field(
        0.15, gt=0, lt=1, description="share of each class's Training scans held out for "
                                      "validation (early stopping, calibration, evaluation)")
    min_validation_per_class: int = Field(
        5, ge=1, le=1000, description="fewest validation scans of each class; a class with "
                                      "too few Training scans for it is an error")
    confidence_threshold: float = Field(
        DEFAULT_CONFIDENCE_THRESHOLD, ge=0, le=1,
        description="classify marks an answer below this calibrated probability as "
                    "low-confidence")
    batch_size: int = Field(32, ge=1, le=4096)
    learning_rate: float = Field(1e-3, gt=0, le=1)
    augment: bool = Field(True, description="random flips/rotations/zoom while training")
    prior_correction: bool = Field(
        True, description="factor this hospital's mix of tumour types out of the training "
                          "loss, so the model learns what tells the classes apart")
    seed: int = Field(0, ge=0, description="same seed everywhere = same initial weights")
    personalise: Personalisation = Field(
        "best", description="what `get` does to the global model before this hospital "
                               "evaluates and classifies with it: 'finetune' re-measures "
                               "the batch-norm statistics on this hospital's training "
                               "scans and trains one gentle epoch on them, kept if the "
                               "validation loss drops; 'recalibrate' only the former; "
                               "'best' keeps whichever of those two and the model as "
                               "downloaded reads the validation scans best (docs/ML.md); "
                               "'none' uses the global model as is")
    #: The folder name of a class in Training/ and Testing/ where it is not the class name
    #: (a site with the older ``glioma_tumor``, ``no_tumor`` folders maps them once here).
    class_folders: dict[str, str] = Field(default_factory=dict)

    @field_validator("classes")
    @classmethod
    def _classes_ok(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _check_classes(v)

    @model_validator(mode="after")
    def _folders_ok(self) -> MLSettings:
        unknown = [c for c in self.class_folders if c not in self.classes]
        if unknown:
            raise ValueError(f"class_folders names {', '.join(unknown)}, which is not among "
                             f"the classes {', '.join(self.classes)}")
        folders = list(self.folders)
        if len(set(folders)) != len(folders):
            raise ValueError("class_folders maps two classes to the same folder")
        return self

    @property
    def folders(self) -> tuple[str, ...]:
        """The folder of each class in ``classes`` order (its name unless mapped)."""
        return tuple(self.class_folders.get(c, c) for c in self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, self.channels)

    @property
    def model_path(self) -> Path:
        return self.model_dir / "model.keras"

    @property
    def history_path(self) -> Path:
        return self.model_dir / "history.jsonl"

    @property
    def calibration_path(self) -> Path:
        """The temperature fitted for the model in ``model_path`` (``securefl.ml.calibration``)."""
        return self.model_dir / "calibration.json"

    def model_spec(self) -> ModelSpec:
        """The part of these settings that must equal the federation's ``[model.ml]``."""
        return ModelSpec(image_size=self.image_size, channels=self.channels,
                         model_kind=self.model_kind, classes=self.classes, seed=self.seed)


def _check_classes(v: tuple[str, ...]) -> tuple[str, ...]:
    if len(v) < 2:
        raise ValueError("at least two classes are needed")
    if len(set(v)) != len(v):
        raise ValueError("class names must be different from each other")
    return v


class ModelSpec(BaseModel):
    """The server's ``[model.ml]``: what every party needs to build the same version 0.

    A hospital's ``[ml]`` table repeats these keys (it also has its folders and training
    settings, which the server never sees).  ``classes`` is the federation's label order:
    every version's metadata carries it, and a hospital whose ``classes`` differ is refused.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    image_size: int = Field(128, ge=16, le=1024)
    channels: Literal[1, 3] = 1
    model_kind: ModelKind = "small"
    classes: tuple[str, ...] = DEFAULT_CLASSES
    #: Seeds the initial weights; unset: the ``[model]`` table's seed.
    seed: int | None = Field(None, ge=0)

    @field_validator("classes")
    @classmethod
    def _classes_ok(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _check_classes(v)

    def identity(self, default_seed: int = 0) -> dict[str, Any]:
        """What version 0 is built from, with the ML layer's :data:`MODEL_FORMAT`: two specs
        with the same identity build the same model and the same initial weights.  The server
        keeps it beside version 0 and refuses to start with a spec whose identity differs."""
        return {"format": MODEL_FORMAT, "image_size": self.image_size,
                "channels": self.channels, "model_kind": self.model_kind,
                "classes": list(self.classes),
                "seed": default_seed if self.seed is None else self.seed}


#: Keys of older kits, with the name that replaced each (a kit is not migrated silently:
#: the two ``data_dir`` keys held different things, so guessing could point at the wrong one).
RENAMED_KEYS: dict[tuple[str, ...], str] = {
    ("data_dir",): "state_dir (where the downloaded global model and round state are kept)",
    ("ml", "data_dir"): "scans_dir (the folder with Training/<class>/ and Testing/<class>/)",
    ("round", "neighbours"): "sparse, set to true (the server now sizes the SecAgg+ degree "
                             "and threshold from corrupt_fraction and dropout_fraction, and "
                             "the hospitals check both)",
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
