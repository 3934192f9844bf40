"""The loader: the public collections' folder layout, its failure modes, and image fitting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from securefl.errors import DataError
from securefl.ml.data import ImageSet, load_image, load_split

CLASSES = ("glioma", "meningioma", "notumor", "pituitary")


def _tree(root: Path, per_class: int = 2, size: tuple[int, int] = (40, 30)) -> Path:
    rng = np.random.default_rng(0)
    for split in ("Training", "Testing"):
        for cls in CLASSES:
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                px = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(px, "RGB").save(folder / f"{i}.jpg")
    return root


def test_loads_layout_with_labels_in_class_order(tmp_path):
    root = _tree(tmp_path)
    data = load_split(root, "Training", classes=CLASSES, size=16)
    assert data.images.shape == (8, 16, 16, 1) and data.images.dtype == np.uint8
    assert data.counts() == dict.fromkeys(CLASSES, 2)
    for path, label in zip(data.paths, data.labels, strict=True):
        assert path.parent.name == CLASSES[label]
    assert data.skipped == ()


def test_missing_root_says_what_to_do(tmp_path):
    with pytest.raises(DataError, match=r"not found.*scans_dir"):
        load_split(tmp_path / "nowhere", "Training", classes=CLASSES)


def test_missing_split_folder(tmp_path):
    (tmp_path / "Training").mkdir()
    with pytest.raises(DataError, match="no Testing/ folder"):
        load_split(tmp_path, "Testing", classes=CLASSES)


def test_unknown_class_folder_is_refused(tmp_path):
    root = _tree(tmp_path)
    (root / "Training" / "astrocytoma").mkdir()
    with pytest.raises(DataError, match=r"astrocytoma.*not among the classes"):
        load_split(root, "Training", classes=CLASSES)


def test_empty_class_is_refused(tmp_path):
    root = _tree(tmp_path)
    for f in (root / "Training" / "pituitary").iterdir():
        f.unlink()
    (root / "Training" / "pituitary" / "notes.txt").write_text("no scans yet")
    with pytest.raises(DataError, match=r"pituitary.*no JPEG or PNG"):
        load_split(root, "Training", classes=CLASSES)


def test_missing_class_folder_is_refused(tmp_path):
    root = _tree(tmp_path)
    for f in (root / "Testing" / "notumor").iterdir():
        f.unlink()
    (root / "Testing" / "notumor").rmdir()
    with pytest.raises(DataError, match="notumor is missing"):
        load_split(root, "Testing", classes=CLASSES)


def test_corrupt_and_foreign_files_are_skipped_and_counted(tmp_path):
    root = _tree(tmp_path)
    glioma = root / "Training" / "glioma"
    (glioma / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = (glioma / "0.jpg").read_bytes()
    (glioma / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (glioma / "Thumbs.db").write_bytes(b"\x00" * 10)
    (glioma / ".DS_Store").write_bytes(b"\x00")
    data = load_split(root, "Training", classes=CLASSES, size=16)
    assert len(data) == 8
    skipped = {p.name for p, _ in data.skipped}
    assert skipped == {"broken.jpg", "truncated.jpg", "Thumbs.db"}


def test_custom_class_list(tmp_path):
    sub = tmp_path / "two"
    for cls in ("notumor", "glioma"):
        (sub / "Training" / cls).mkdir(parents=True)
        Image.new("L", (10, 10), 100).save(sub / "Training" / cls / "a.png")
    two = load_split(sub, "Training", classes=("notumor", "glioma"), size=8)
    assert two.classes == ("notumor", "glioma")
    assert {two.paths[i].parent.name: int(lab) for i, lab in enumerate(two.labels)} == {
        "notumor": 0, "glioma": 1}


def test_rgb_becomes_grayscale_and_aspect_ratio_is_kept(tmp_path):
    img = np.zeros((20, 60, 3), dtype=np.uint8)  # wide image, pure red
    img[..., 0] = 255
    Image.fromarray(img, "RGB").save(tmp_path / "wide.png")
    out = load_image(tmp_path / "wide.png", 30, 1)
    assert out.shape == (30, 30, 1)
    # red -> luma 76; the image fills the width and a 10-pixel band in the middle
    assert abs(int(out[15, 15, 0]) - 76) <= 2
    assert out[:8, :, 0].max() == 0 and out[-8:, :, 0].max() == 0
    rgb = load_image(tmp_path / "wide.png", 30, 3)
    assert rgb.shape == (30, 30, 3) and rgb[15, 15, 0] > 250 and rgb[15, 15, 1] < 5


def test_sixteen_bit_png_is_scaled_to_eight_bits(tmp_path):
    arr = np.linspace(0, 4000, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "deep.png")
    out = load_image(tmp_path / "deep.png", 64, 1)
    assert out.min() == 0 and out.max() >= 250


def test_unreadable_single_image_is_a_data_error(tmp_path):
    (tmp_path / "x.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a readable"):
        load_image(tmp_path / "x.png", 16)


def test_pooling_sets():
    a = ImageSet(np.zeros((2, 4, 4, 1), np.uint8), np.array([0, 1], np.int32), ("a", "b"))
    b = ImageSet(np.ones((1, 4, 4, 1), np.uint8), np.array([1], np.int32), ("a", "b"))
    pooled = ImageSet.concat([a, b])
    assert len(pooled) == 3 and pooled.counts() == {"a": 1, "b": 2}
    with pytest.raises(DataError):
        ImageSet.concat([a, ImageSet(a.images, a.labels, ("x", "y"))])


def test_dataset_pipeline_batches_everything(train_set):
    from securefl.ml.data import make_dataset

    ds = make_dataset(train_set, batch_size=100, shuffle=True, seed=1)
    sizes = [int(x.shape[0]) for x, _ in ds]
    assert sum(sizes) == len(train_set) and max(sizes) == 100
