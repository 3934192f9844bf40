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


def _spoil(root: Path) -> None:
    """Two undecodable images and a note among glioma's training scans, plus the files an
    operating system leaves behind (which are not the user's business)."""
    glioma = root / "Training" / "glioma"
    (glioma / "broken.jpg").write_bytes(b"a web page saved as .jpg")
    good = (glioma / "0.jpg").read_bytes()
    (glioma / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (glioma / "notes.txt").write_text("scanner export log")
    (glioma / "Thumbs.db").write_bytes(b"\x00" * 10)
    (glioma / ".DS_Store").write_bytes(b"\x00")


def test_corrupt_and_foreign_files_are_skipped_with_their_reason(tmp_path):
    root = _tree(tmp_path)
    _spoil(root)
    data = load_split(root, "Training", classes=CLASSES, size=16)
    assert len(data) == 8
    reasons = {p.name: why for p, why in data.skipped}
    assert set(reasons) == {"broken.jpg", "truncated.jpg", "notes.txt"}  # not Thumbs.db
    assert reasons["broken.jpg"] == "not a readable JPEG or PNG image"
    assert reasons["truncated.jpg"].startswith("damaged image")
    assert reasons["notes.txt"] == "not a .jpg/.jpeg/.png file"


def test_skipped_files_are_described_in_one_line_relative_to_the_scans_folder(tmp_path):
    from securefl.ml.data import describe_skipped

    root = _tree(tmp_path)
    _spoil(root)
    (root / "Training" / "pituitary" / "x.png").write_bytes(b"garbage")
    data = load_split(root, "Training", classes=CLASSES, size=16)
    line = describe_skipped(data, root)
    assert line is not None
    assert line.startswith("4 files were skipped and not used: "
                           "Training/glioma/broken.jpg (not a readable JPEG or PNG image), "
                           "Training/glioma/notes.txt (not a .jpg/.jpeg/.png file), "
                           "Training/glioma/truncated.jpg (damaged image")
    assert "and 1 more" in line and "x.png" not in line and str(root) not in line
    assert "remove them" in line
    # The same words from the plain (path, reason) strings a result carries as JSON.
    as_strings = [[str(p), why] for p, why in data.skipped]
    assert describe_skipped(as_strings, str(root)) == line
    assert "x.png" in describe_skipped(data, root, limit=10)
    one = describe_skipped([(root / "Testing" / "a.jpg", "damaged image: x")], root)
    assert one == ("1 file was skipped and not used: Testing/a.jpg (damaged image: x); "
                   "replace it with readable JPEG or PNG scans, or remove it")
    assert describe_skipped(load_split(_tree(tmp_path / "clean"), "Training",
                                       classes=CLASSES, size=16), root) is None


def test_class_whose_scans_are_all_unreadable_is_refused_by_name(tmp_path):
    root = _tree(tmp_path)
    folder = root / "Training" / "meningioma"
    for f in folder.iterdir():
        f.write_bytes(b"\x89PNG damaged")
    with pytest.raises(DataError) as err:
        load_split(root, "Training", classes=CLASSES, size=16)
    msg = err.value.message
    assert f"class 'meningioma' has no readable scans in {folder}" in msg
    assert "all 2 image file(s) were skipped" in msg and "needs at least one of every class" in msg
    # the other split still loads: the error is about this class folder only
    assert len(load_split(root, "Testing", classes=CLASSES, size=16)) == 8


def test_images_in_subfolders_of_a_class_folder_are_loaded(tmp_path):
    """Scans exported one folder per patient (or study) belong to the class folder above
    them; hidden folders are not read."""
    root = _tree(tmp_path)
    glioma = root / "Training" / "glioma"
    scan = (glioma / "0.jpg").read_bytes()
    (glioma / "patient_07" / "series_2").mkdir(parents=True)
    (glioma / "patient_07" / "a.jpg").write_bytes(scan)
    (glioma / "patient_07" / "series_2" / "b.JPG").write_bytes(scan)
    (glioma / ".cache").mkdir()
    (glioma / ".cache" / "c.jpg").write_bytes(scan)
    # a class folder holding only a patient folder is not "empty"
    pit = root / "Training" / "pituitary"
    moved = list(pit.iterdir())
    (pit / "p1").mkdir()
    for f in moved:
        f.rename(pit / "p1" / f.name)
    data = load_split(root, "Training", classes=CLASSES, size=16)
    assert data.counts() == {"glioma": 4, "meningioma": 2, "notumor": 2, "pituitary": 2}
    names = {p.relative_to(root / "Training").as_posix() for p in data.paths}
    assert {"glioma/patient_07/a.jpg", "glioma/patient_07/series_2/b.JPG"} <= names
    assert not any(".cache" in n for n in names) and data.skipped == ()


def test_scan_files_lists_what_training_reads(tmp_path):
    """The hospital's data summary counts with ``scan_files``: it must match the loader."""
    from securefl.ml.data import scan_files

    root = _tree(tmp_path)
    _spoil(root)
    (root / "Training" / "glioma" / "p1").mkdir()
    (root / "Training" / "glioma" / "p1" / "z.png").write_bytes(b"x")
    images, others = scan_files(root / "Training" / "glioma")
    assert [p.relative_to(root).as_posix() for p in images] == [
        f"Training/glioma/{n}" for n in ("0.jpg", "1.jpg", "broken.jpg", "p1/z.png",
                                         "truncated.jpg")]
    assert [p.name for p in others] == ["notes.txt"]


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
