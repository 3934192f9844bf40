"""``[ml.class_folders]``: a site whose folders have the older names (``glioma_tumor``,
``no_tumor``...) maps them to the federation's classes once, and its labels come out right."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from pydantic import ValidationError

from securefl.errors import DataError
from securefl.ml.local import load_data
from securefl.ml.settings import DEFAULT_CLASSES, MLSettings

OLD_NAMES = {"glioma": "glioma_tumor", "meningioma": "meningioma_tumor",
             "notumor": "no_tumor", "pituitary": "pituitary_tumor"}
#: Each class's scans are one flat grey level, so a label can be checked from its pixels.
GREY = {"glioma": 40, "meningioma": 100, "notumor": 160, "pituitary": 220}


def _old_layout(root: Path, per_class: int = 3) -> Path:
    for split in ("Training", "Testing"):
        for cls, folder in OLD_NAMES.items():
            (root / split / folder).mkdir(parents=True)
            for i in range(per_class):
                Image.new("L", (24, 20), GREY[cls]).save(root / split / folder / f"{i}.png")
    return root


def _settings(root: Path, **changes: object) -> MLSettings:
    return MLSettings(scans_dir=root, model_dir=root / "model", image_size=16, **changes)


def test_mapped_folders_load_with_the_federations_labels(tmp_path):
    root = _old_layout(tmp_path / "scans")
    # classes in a different order than the folders' alphabetical one, to catch any sorting
    classes = ("pituitary", "glioma", "notumor", "meningioma")
    data = load_data(_settings(root, classes=classes, class_folders=OLD_NAMES), "Training")
    assert data.classes == classes and len(data) == 12
    for image, label, path in zip(data.images, data.labels, data.paths, strict=True):
        cls = classes[int(label)]
        assert path.parent.name == OLD_NAMES[cls]
        # the fitted image's centre keeps the class's grey level (padding is black)
        assert abs(int(image[8, 8, 0]) - GREY[cls]) <= 2, (path, cls)
    assert data.counts() == dict.fromkeys(classes, 3)


def test_a_partial_mapping_uses_class_names_for_the_rest(tmp_path):
    root = tmp_path / "scans"
    for cls in DEFAULT_CLASSES:
        folder = root / "Testing" / ("no_tumor" if cls == "notumor" else cls)
        folder.mkdir(parents=True)
        Image.new("L", (16, 16), GREY[cls]).save(folder / "a.png")
    ml = _settings(root, class_folders={"notumor": "no_tumor"})
    assert ml.folders == ("glioma", "meningioma", "no_tumor", "pituitary")
    data = load_data(ml, "Testing")
    labels = {p.parent.name: DEFAULT_CLASSES[int(lab)] for p, lab in zip(data.paths, data.labels,
                                                                         strict=True)}
    assert labels["no_tumor"] == "notumor"


def test_unmapped_old_folders_are_refused_naming_the_mapping(tmp_path):
    root = _old_layout(tmp_path / "scans")
    with pytest.raises(DataError, match=r"glioma_tumor.*class_folders") as err:
        load_data(_settings(root), "Training")
    # Never "add them to 'classes'": the classes belong to the federation (walking it, the
    # advice contradicted the QuickStart's "never reorder classes").
    assert "add them to 'classes'" not in err.value.message
    assert "stay as they are" in err.value.message


@pytest.mark.parametrize(("mapping", "words"), [
    ({"gliomas": "glioma_tumor"}, "not among the classes"),
    ({"glioma": "x", "notumor": "x"}, "same folder"),
])
def test_a_mapping_that_does_not_fit_the_classes_is_refused(tmp_path, mapping, words):
    with pytest.raises(ValidationError, match=words):
        _settings(tmp_path, class_folders=mapping)
