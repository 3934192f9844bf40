"""Loading a hospital's scans from the layout of the public brain-tumour MRI collections.

::

    ROOT/Training/<class>/*.jpg|png     ROOT/Testing/<class>/*.jpg|png

Images of any size, RGB or grayscale, are converted to the model's channels and fitted into a
square keeping their aspect ratio (black padding, as MRI backgrounds are black).  They are
decoded once, with Pillow, into one uint8 array: a corrupt or unreadable file is skipped and
reported, never allowed to stop a training run half way.  :func:`make_dataset` then feeds the
array to Keras through ``tf.data`` with shuffling, batching and ``AUTOTUNE`` prefetch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from securefl.errors import DataError
from securefl.ml.settings import DEFAULT_CLASSES

if TYPE_CHECKING:  # pragma: no cover
    import tensorflow as tf

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
SPLITS = ("Training", "Testing")
DECODE_THREADS = 2


@dataclass(frozen=True)
class ImageSet:
    """Decoded images of one split: ``images`` uint8 (N, H, W, C), ``labels`` int32 (N,)."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    paths: tuple[Path, ...] = ()
    #: (file, reason) for every file that was not used.
    skipped: tuple[tuple[Path, str], ...] = field(default=())

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def counts(self) -> dict[str, int]:
        c = Counter(int(x) for x in self.labels)
        return {name: c.get(i, 0) for i, name in enumerate(self.classes)}

    @staticmethod
    def concat(parts: Sequence[ImageSet]) -> ImageSet:
        """Pool several sets with the same classes (e.g. every hospital's test split)."""
        if not parts:
            raise DataError("nothing to pool")
        classes = parts[0].classes
        if any(p.classes != classes for p in parts):
            raise DataError("cannot pool image sets with different class lists")
        return ImageSet(
            images=np.concatenate([p.images for p in parts]),
            labels=np.concatenate([p.labels for p in parts]),
            classes=classes,
            paths=tuple(x for p in parts for x in p.paths),
            skipped=tuple(x for p in parts for x in p.skipped),
        )


def load_image(path: str | Path, size: int, channels: int = 1) -> np.ndarray:
    """One image as uint8 (size, size, channels); :class:`DataError` if it cannot be read."""
    from PIL import Image, ImageOps

    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit / float scans
                arr = np.asarray(img, dtype=np.float32)
                lo, hi = float(arr.min()), float(arr.max())
                arr = (arr - lo) / (hi - lo or 1.0) * 255.0
                img = Image.fromarray(arr.astype(np.uint8), "L")
            img = img.convert("L" if channels == 1 else "RGB")
            img = ImageOps.pad(img, (size, size), method=Image.Resampling.BILINEAR, color=0)
            arr = np.asarray(img, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"{path} not found: check the file name") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path} is not a readable JPEG or PNG image ({exc})") from None
    return arr.reshape(size, size, channels)


def _class_files(
    split_dir: Path, classes: Sequence[str], folders: Sequence[str] | None = None
) -> tuple[list[tuple[Path, int]], list[tuple[Path, str]]]:
    folders = tuple(classes) if folders is None else tuple(folders)  # [ml] class_folders
    present = sorted(
        p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    unknown = [name for name in present if name not in folders]
    if unknown:
        raise DataError(
            f"{split_dir} has folder(s) {', '.join(unknown)} that are not among the classes' "
            f"folders {', '.join(folders)}: rename or move them, add them to 'classes' in the "
            "settings, or map a class to them in [ml.class_folders]"
        )
    files: list[tuple[Path, int]] = []
    ignored: list[tuple[Path, str]] = []
    for label, (name, folder_name) in enumerate(zip(classes, folders, strict=True)):
        folder = split_dir / folder_name
        if not folder.is_dir():
            raise DataError(
                f"{folder} is missing: every class needs a folder with at least one image "
                f"(expected {', '.join(folders)})"
            )
        entries = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        images = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES]
        ignored += [(p, "not a .jpg/.jpeg/.png file") for p in entries if p not in images]
        if not images:
            raise DataError(
                f"{folder} has no JPEG or PNG images: add scans of class '{name}' or remove the "
                "class from the settings"
            )
        files += [(p, label) for p in images]
    return files, ignored


def load_split(
    root: str | Path,
    split: str = "Training",
    *,
    classes: Sequence[str] = DEFAULT_CLASSES,
    size: int = 128,
    channels: int = 1,
    folders: Sequence[str] | None = None,
) -> ImageSet:
    """Decode ``root/split/<class>/*`` into an :class:`ImageSet` (labels in ``classes`` order;
    ``folders``, when given, names each class's folder)."""
    root = Path(root)
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    if not root.is_dir():
        raise DataError(
            f"data folder {root} not found: set scans_dir to the folder that holds Training/ and "
            "Testing/ (or make demo data with `securefl data synth`)"
        )
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(f"{root} has no {split}/ folder: expected {root}/{split}/<class>/*.jpg")
    files, skipped = _class_files(split_dir, tuple(classes), folders)

    def read(item: tuple[Path, int]) -> np.ndarray | str:
        try:
            return load_image(item[0], size, channels)
        except DataError as exc:
            return exc.message

    with ThreadPoolExecutor(DECODE_THREADS) as pool:
        decoded = list(pool.map(read, files))
    images, labels, paths = [], [], []
    for (path, label), result in zip(files, decoded, strict=True):
        if isinstance(result, str):
            skipped.append((path, result))
        else:
            images.append(result)
            labels.append(label)
            paths.append(path)
    if not images:
        raise DataError(f"no readable images under {split_dir}: every file was skipped")
    return ImageSet(
        images=np.stack(images),
        labels=np.asarray(labels, dtype=np.int32),
        classes=tuple(classes),
        paths=tuple(paths),
        skipped=tuple(skipped),
    )


def make_dataset(
    data: ImageSet, batch_size: int = 32, *, shuffle: bool = True, seed: int = 0
) -> tf.data.Dataset:
    """A batched, prefetching ``tf.data`` pipeline over ``data`` (reshuffled every epoch)."""
    from securefl.ml._tf import tensorflow

    tf = tensorflow()
    ds = tf.data.Dataset.from_tensor_slices((data.images, data.labels))
    if shuffle:
        ds = ds.shuffle(len(data), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
