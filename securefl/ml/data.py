"""Loading a hospital's scans from the layout of the public brain-tumour MRI collections.

::

    ROOT/Training/<class>/*.jpg|png     ROOT/Testing/<class>/*.jpg|png

Images of any size, RGB or grayscale, are converted to the model's channels and fitted into a
square keeping their aspect ratio (black padding, as MRI backgrounds are black).  They are
decoded once, with Pillow, into one uint8 array: a corrupt or unreadable file is skipped and
reported, never allowed to stop a training run half way.  :func:`make_dataset` then feeds the
array to Keras through ``tf.data`` with shuffling, batching and ``AUTOTUNE`` prefetch.

What is read from a class folder (docs/ML.md, "Data"):

- images (.jpg, .jpeg, .png) in the folder *and in its subfolders, at any depth* — exports
  often come as one folder per patient or per study, and such a scan belongs to the class
  of the class folder it sits under;
- hidden files and folders (names starting with ".", e.g. ``.DS_Store``) and the thumbnail
  caches Windows writes (``Thumbs.db``, ``desktop.ini``) are ignored without a word;
- any other file (``notes.txt``, a DICOM ``.dcm``) and any image that cannot be decoded is
  *skipped*: listed in :attr:`ImageSet.skipped` with the reason, and every front end tells
  the user through :func:`describe_skipped`.  A class left with no readable image is an
  error, as an empty class folder is: training without a class silently is worse than not
  training.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from securefl.errors import DataError
from securefl.ml.settings import DEFAULT_CLASSES

if TYPE_CHECKING:  # pragma: no cover
    import tensorflow as tf
    from PIL.Image import Image as PILImage

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
SPLITS = ("Training", "Testing")
DECODE_THREADS = 2
#: Files operating systems drop into folders by themselves: never scans, never reported.
SYSTEM_FILES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini"})
#: Why a file in a class folder was not used (the reasons for undecodable images vary).
NOT_AN_IMAGE = "not a .jpg/.jpeg/.png file"


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

    def subset(self, indices: Sequence[int] | np.ndarray, *, skipped: bool = True) -> ImageSet:
        """The images at ``indices`` (in that order); ``skipped`` keeps the list of files of
        the folder that were not used (both parts of a train/validation split keep it: either
        may be what a user looks at)."""
        idx = np.asarray(indices, dtype=np.int64)
        return ImageSet(
            images=self.images[idx], labels=self.labels[idx], classes=self.classes,
            paths=tuple(self.paths[i] for i in idx) if self.paths else (),
            skipped=self.skipped if skipped else (),
        )

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


class _Unreadable(Exception):
    """A file that is there but cannot be decoded: ``reason`` is short and has no path."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def _window_to_8bit(arr: np.ndarray) -> np.ndarray:
    """A 16-bit or float image onto 0-255 through the same percentile window the model
    applies to every image (``securefl.ml.preprocess``), so a 16-bit file and its 8-bit
    export reach the network alike and a few hot pixels cannot crush the rest into a handful
    of grey levels (as stretching from the minimum to the maximum did)."""
    from securefl.ml.preprocess import WINDOW_HIGH, WINDOW_LOW

    lo, hi = np.quantile(arr, [WINDOW_LOW, WINDOW_HIGH])
    span = float(hi - lo) or 1.0
    return (np.clip((arr - lo) / span, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


#: The smallest side, in pixels, of an image ``classify`` takes for a scan.  Why: a 1x1 or
#: 8x8 picture (an icon, a thumbnail) padded up to the model's input is no scan, and the
#: model still answered it "meningioma 99.9%" (found walking it).
MIN_SCAN_SIDE = 32
#: The mean colourfulness (max - min of R, G, B per pixel, 0-255) above which ``classify``
#: refuses a picture as no scan.  Why: MRI slices are grey however they are exported (an
#: RGB JPEG of one has R = G = B up to compression noise of a few levels; a coloured arrow
#: or label adds little to the mean), while a walk's coloured noise picture was answered
#: "glioma 80.5%".  200 of the project's synthetic scans re-saved as RGB JPEG measure 0.0.
MAX_SCAN_COLOURFULNESS = 24.0


def _decode(path: Path, size: int, channels: int, *, as_scan: bool = False) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    img: PILImage  # opened as an ImageFile, then converted
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit / float scans
                img = Image.fromarray(_window_to_8bit(np.asarray(img, dtype=np.float32)), "L")
            if as_scan:
                _refuse_colour_picture(path, img)
            img = img.convert("L" if channels == 1 else "RGB")
            if as_scan:
                _refuse_non_scan(path, img)
            img = ImageOps.pad(img, (size, size), method=Image.Resampling.BILINEAR, color=0)
            arr = np.asarray(img, dtype=np.uint8)
    except FileNotFoundError:
        raise
    except UnidentifiedImageError as exc:
        raise _Unreadable("not a readable JPEG or PNG image", str(exc)) from None
    except Image.DecompressionBombError as exc:
        raise _Unreadable("too large to decode", str(exc)) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise _Unreadable(f"damaged image: {exc}", str(exc)) from None
    return arr.reshape(size, size, channels)


def _refuse_colour_picture(path: Path, img: PILImage) -> None:
    """A clearly coloured picture is no MRI scan: refused before it is made grey."""
    if img.mode in ("L", "LA", "1", "I", "I;16", "I;16B", "I;16L", "F"):
        return
    extrema = img.getextrema()
    if all(lo == hi for lo, hi in (extrema if isinstance(extrema[0], tuple) else (extrema,))):
        return  # one colour all over: "blank" says more (``_refuse_non_scan``)
    rgb = np.asarray(img.convert("RGB"), dtype=np.int16)
    colourfulness = float((rgb.max(axis=2) - rgb.min(axis=2)).mean())
    if colourfulness > MAX_SCAN_COLOURFULNESS:
        raise DataError(f"{path} is a colour picture, and MRI scans are grey: nothing was "
                        "classified; give the scan itself (an export in colour maps or a "
                        "photo of the screen is not read)")


def _refuse_non_scan(path: Path, img: PILImage) -> None:
    """A picture that cannot be a scan gets a refusal, not a confident answer."""
    width, height = img.size
    if min(width, height) < MIN_SCAN_SIDE:
        raise DataError(f"{path} is {width}x{height} pixels, too small to be a scan (at least "
                        f"{MIN_SCAN_SIDE} pixels a side): nothing was classified; give the "
                        "scan itself, not a thumbnail")
    extrema = img.getextrema()
    bands = extrema if isinstance(extrema[0], tuple) else (extrema,)
    if all(lo == hi for lo, hi in bands):
        raise DataError(f"{path} is blank (every pixel has the value {bands[0][0]}), not a "
                        "scan: nothing was classified; check the file exported correctly")


def load_image(path: str | Path, size: int, channels: int = 1, *,
               as_scan: bool = False) -> np.ndarray:
    """One image as uint8 (size, size, channels); :class:`DataError` if it cannot be read.

    ``as_scan`` (classify): also refuse a picture that cannot be a scan (blank, or smaller
    than :data:`MIN_SCAN_SIDE`), since the model answers anything with a class."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder, not a scan: give the path of a JPEG or PNG file")
    try:
        return _decode(path, size, channels, as_scan=as_scan)
    except FileNotFoundError:
        raise DataError(f"{path} does not exist: check the file name and its folder") from None
    except _Unreadable as exc:
        raise DataError(f"{path} is not a readable JPEG or PNG image ({exc.detail})") from None


def scan_files(folder: str | Path) -> tuple[list[Path], list[Path]]:
    """``(images, other files)`` in ``folder`` and all its subfolders, each sorted.

    Hidden files and folders and the operating systems' own files (:data:`SYSTEM_FILES`) are
    in neither list.  Symbolic links to folders are followed, each real folder once.  The
    hospital's data summary counts with this too, so it shows what training will read.
    """
    images: list[Path] = []
    others: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link back up the tree: walked already
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or name.lower() in SYSTEM_FILES:
                continue
            path = Path(dirpath) / name
            if not path.is_file():  # a dangling link, a socket
                continue
            (images if path.suffix.lower() in IMAGE_SUFFIXES else others).append(path)
    return sorted(images), sorted(others)


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
            f"folders {', '.join(folders)}: rename or move them, or, if one holds a class "
            "under another name, map that class to it in [ml.class_folders] (the classes "
            "themselves belong to the federation's model and stay as they are)"
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
        images, others = scan_files(folder)
        ignored += [(p, NOT_AN_IMAGE) for p in others]
        if not images:
            raise DataError(
                f"{folder} has no JPEG or PNG images (subfolders included): add scans of class "
                f"'{name}' (the federation's model needs at least one of every class it "
                "knows, so a class cannot be left out)"
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
    """Decode ``root/split/<class>/**`` into an :class:`ImageSet` (labels in ``classes`` order;
    ``folders``, when given, names each class's folder).

    Files that cannot be used are skipped and listed with their reason in ``skipped``; a
    class none of whose images can be read is a :class:`DataError` naming its folder.
    """
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
            return _decode(item[0], size, channels)
        except FileNotFoundError:
            return "removed while the scans were being read"
        except _Unreadable as exc:
            return exc.reason

    with ThreadPoolExecutor(DECODE_THREADS) as pool:
        decoded = list(pool.map(read, files))
    images, labels, paths = [], [], []
    unreadable: dict[int, list[tuple[Path, str]]] = {}
    for (path, label), result in zip(files, decoded, strict=True):
        if isinstance(result, str):
            skipped.append((path, result))
            unreadable.setdefault(label, []).append((path, result))
        else:
            images.append(result)
            labels.append(label)
            paths.append(path)
    _refuse_unreadable_classes(split_dir, classes, set(labels), unreadable)
    if not images:
        raise DataError(f"no readable images under {split_dir}: every file was skipped")
    return ImageSet(
        images=np.stack(images),
        labels=np.asarray(labels, dtype=np.int32),
        classes=tuple(classes),
        paths=tuple(paths),
        skipped=tuple(sorted(skipped)),
    )


def _refuse_unreadable_classes(
    split_dir: Path, classes: Sequence[str], readable: set[int],
    unreadable: dict[int, list[tuple[Path, str]]],
) -> None:
    """A class whose every image was skipped would silently vanish from training (and its
    label from the model's experience): refuse, as for an empty class folder."""
    lost = sorted(label for label in unreadable if label not in readable)
    if not lost:
        return
    parts = []
    for label in lost:
        bad = unreadable[label]
        folder = split_dir / bad[0][0].relative_to(split_dir).parts[0]
        first, reason = bad[0]
        parts.append(f"class '{classes[label]}' has no readable scans in {folder} (all "
                     f"{len(bad)} image file(s) were skipped, e.g. {first.name}: {reason})")
    raise DataError("; ".join(parts) + ": replace them with readable JPEG or PNG scans (the "
                    "federation's model needs at least one of every class it knows)")


def _split_key(data: ImageSet, i: int, root: Path | None, seed: int) -> bytes:
    """Where image ``i`` falls in its class's shuffled order: a hash of the seed and its path
    relative to ``root`` (or, for an in-memory set, of its pixels), so neither the order in
    which files were listed nor where the scans folder lives changes the split."""
    h = hashlib.sha256(f"securefl-validation/{seed}/".encode())
    if data.paths:
        path = data.paths[i]
        if root is not None and path.is_relative_to(root):
            path = path.relative_to(root)
        h.update(path.as_posix().encode())
    else:
        h.update(np.ascontiguousarray(data.images[i]).tobytes())
    return h.digest()


def validation_count(n: int, fraction: float, minimum: int) -> int:
    """How many of a class's ``n`` scans go to validation: ``fraction`` of them, rounded,
    and at least ``minimum``."""
    return max(minimum, round(n * fraction))


def split_validation(
    data: ImageSet, *, fraction: float = 0.15, min_per_class: int = 5, seed: int = 0,
    root: str | Path | None = None, class_dirs: Sequence[str | Path] | None = None,
) -> tuple[ImageSet, ImageSet]:
    """``(train, validation)``: a stratified, deterministic split of a hospital's Training scans.

    Why: early stopping, the temperature of the calibrated probabilities and every setting
    are chosen on validation scans, so the Testing scans stay untouched for the figures
    that are reported.  Each class's scans are ordered by a hash of the seed and their path
    relative to ``root`` (:func:`_split_key`) and the first
    ``max(min_per_class, round(fraction * n))`` go to validation: the same scans every run,
    on every machine, whatever order the files were listed in; a scan added later moves at
    most a few others.  A class with too few scans to leave ``min_per_class`` for validation
    and one to train on is a :class:`DataError` naming it (and its folder, from ``class_dirs``).
    """
    root_path = Path(root) if root is not None else None
    train_idx: list[int] = []
    val_idx: list[int] = []
    for label, name in enumerate(data.classes):
        members = [int(i) for i in np.flatnonzero(data.labels == label)]
        n = len(members)
        k = validation_count(n, fraction, min_per_class)
        if n < k + 1:
            where = f" in {class_dirs[label]}" if class_dirs is not None else ""
            raise DataError(
                f"class '{name}' has {n} training scan{'s' if n != 1 else ''}{where} but needs "
                f"at least {min_per_class + 1} ({min_per_class} held out for validation, "
                "[ml] min_validation_per_class, and one to train on): add scans of this class "
                "or lower min_validation_per_class")
        members.sort(key=lambda i: (_split_key(data, i, root_path, seed), i))
        val_idx += members[:k]
        train_idx += members[k:]
    return data.subset(sorted(train_idx)), data.subset(sorted(val_idx))


SkippedFiles = Iterable[tuple[str | Path, str]]


def _skipped_items(skipped: ImageSet | SkippedFiles, root: str | Path | None
                   ) -> list[tuple[str, str]]:
    items = skipped.skipped if isinstance(skipped, ImageSet) else skipped
    out = []
    for path, reason in items:
        p = Path(path)
        if root is not None and p.is_relative_to(root):
            p = p.relative_to(root)
        out.append((p.as_posix(), str(reason)))
    return out


def describe_skipped(skipped: ImageSet | SkippedFiles, root: str | Path | None = None,
                     limit: int = 3) -> str | None:
    """One line for people about the files that were not used, or ``None`` if none were.

    The one wording every front end shows (CLI, hospital app, demo): how many, the first
    ``limit`` with their reason, paths relative to ``root`` (the scans folder), e.g.
    ``2 files were skipped and not used: Training/glioma/x.jpg (not a readable JPEG or PNG
    image), ...``.
    """
    items = _skipped_items(skipped, root)
    if not items:
        return None
    n = len(items)
    listed = ", ".join(f"{path} ({reason})" for path, reason in items[:limit])
    more = f" and {n - limit} more" if n > limit else ""
    them = "it" if n == 1 else "them"
    return (f"{n} file{' was' if n == 1 else 's were'} skipped and not used: {listed}{more}; "
            f"replace {them} with readable JPEG or PNG scans, or remove {them}")


def skipped_record(skipped: ImageSet | SkippedFiles, root: str | Path | None = None,
                   limit: int = 20) -> dict[str, object]:
    """The history entry's account of skipped files: the count and the first ``limit``."""
    items = _skipped_items(skipped, root)
    return {"skipped_files": len(items),
            "skipped": [{"file": path, "reason": reason} for path, reason in items[:limit]]}


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
