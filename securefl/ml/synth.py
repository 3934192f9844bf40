"""Synthetic brain-tumour MRI slices built on real anatomy, split across non-IID hospitals.

No labelled brain-tumour data set can be downloaded at run time, so the demo and the tests
use images made here.  They are **synthetic**: good for exercising the whole pipeline
(loading, training, federation, secure aggregation, evaluation) and for comparing training
set-ups with each other; worthless for judging how well a model reads real scans.

Anatomy: the MNI ICBM152 2009a symmetric T1 template and its grey/white-matter maps, which
ship inside the ``nilearn`` wheel (read offline with ``nibabel``; 197x233x189, 1 mm).  Each
image is a random axial slice of it, flipped, rotated, scaled, shifted and elastically
deformed, with a skull and scalp ring added (the template is skull-stripped).

Lesions follow the textbook appearance on contrast-enhanced T1, the sequence of the public
collections:

* glioma — an irregular, infiltrative intra-axial mass in the white matter, usually with
  ring enhancement around a dark necrotic core (otherwise a heterogeneous hypointense mass),
  surrounded by hypointense oedema that spreads along the white matter, with mass effect;
* meningioma — a well-circumscribed, homogeneously enhancing extra-axial mass with a broad
  base on the dura (convexity or falx), a thin CSF cleft, often a dural tail, pushing the
  brain away;
* pituitary — a rounded enhancing midline mass in the sellar / suprasellar region, on the
  low slices where the sella is;
* notumor — none.

Sites differ the way hospitals do: scanner contrast curve, grey/white contrast, noise level,
resolution (blur), bias field, and class balance (each site sees a lot of one class and very
little of another), so their data are not IID.  Everything is deterministic per seed: each
image has its own generator seeded by (seed, hospital, split, index).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from securefl.errors import ConfigError, DataError
from securefl.ml.lesions import _smooth_noise, paint
from securefl.ml.settings import DEFAULT_CLASSES

#: Field of view of an output image, in mm (the template's head fits in ~200 mm).
FOV_MM = 230.0
#: Axial template slices used for every class (voxel z indices; 1 mm apart).
Z_RANGE = (36, 128)
#: Slices through the sella turcica / suprasellar cistern, where pituitary tumours are seen.
SELLAR_Z = (38, 54)
#: Where the sella sits in the template's voxel grid (x midline, y).
SELLA_XY = (98.0, 138.0)
#: Split prefixes as in the public collections' file names (Tr-gl_0001.jpg).
SPLITS = {"Training": "Tr", "Testing": "Te"}

_TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


# --------------------------------------------------------------------------- template


@functools.lru_cache(maxsize=1)
def _volumes() -> dict[str, np.ndarray]:
    """The three template volumes as float32 in [0, 1] (loaded once per process)."""
    spec = importlib.util.find_spec("nilearn")  # locate the wheel without importing it
    if spec is None or spec.origin is None:
        raise DataError(
            "the brain template ships with the 'nilearn' package, which is not installed: "
            "run `make .venv/.installed` (or pip install -e .) and retry"
        )
    folder = Path(spec.origin).parent / "datasets" / "data"
    import nibabel

    out = {}
    for key, name in _TEMPLATE_FILES.items():
        path = folder / name
        if not path.is_file():
            raise DataError(f"{path} is missing from the nilearn install: reinstall nilearn")
        out[key] = np.asarray(nibabel.load(path).dataobj, dtype=np.float32) / 255.0
    return out


@dataclass(frozen=True)
class _Slice:
    """One axial slice, pre-smoothed for a given output pixel size, plus derived maps."""

    channels: np.ndarray  # (X, Y, 4): t1, gm, wm, brain mask
    signed_dist: np.ndarray  # mm to the head envelope; negative inside
    depth: np.ndarray  # mm from the brain surface, inside the brain
    boundary: np.ndarray  # (k, 2) brain-surface pixel coordinates (x, y)
    centroid: tuple[float, float]


@functools.lru_cache(maxsize=512)
def _slice(z: int, smooth: float) -> _Slice:
    from scipy import ndimage

    vols = _volumes()
    t1, gm, wm = (vols[k][:, :, z] for k in ("t1", "gm", "wm"))
    mask = ndimage.binary_fill_holes(t1 > 0.04)
    envelope = ndimage.binary_fill_holes(ndimage.gaussian_filter(mask.astype(np.float32), 9) > 0.15)
    signed = ndimage.distance_transform_edt(~envelope) - ndimage.distance_transform_edt(envelope)
    depth = ndimage.distance_transform_edt(mask)
    boundary = np.argwhere(mask & ~ndimage.binary_erosion(mask, iterations=1))
    chans = np.stack([t1, gm, wm, mask.astype(np.float32)])
    if smooth > 0:
        chans = ndimage.gaussian_filter(chans, (0, smooth, smooth))
    cx, cy = (float(c) for c in np.argwhere(mask).mean(axis=0))
    chans = np.ascontiguousarray(np.moveaxis(chans, 0, -1), dtype=np.float32)
    return _Slice(chans, signed.astype(np.float32),
                  depth.astype(np.float32), boundary, (cx, cy))


# --------------------------------------------------------------------------- sites


@dataclass(frozen=True)
class Site:
    """Scanner and population of one hospital."""

    name: str
    gamma: float  # contrast curve exponent applied to the whole image
    gm_wm: float  # extra grey/white contrast (+ more, - flatter)
    noise: float  # Rician noise sigma, fraction of full scale
    blur: float  # Gaussian blur sigma in output pixels (resolution)
    bias: float  # bias-field strength
    class_weights: tuple[float, ...]  # share of each class in the training split


def make_sites(hospitals: int, seed: int, classes: Sequence[str] = DEFAULT_CLASSES) -> list[Site]:
    """``hospitals`` sites with different scanners and rotating class imbalance.

    Hospital ``h`` sees class ``h`` a lot, class ``h+1`` very rarely and ``h+2`` less than
    usual (indices modulo the number of classes), so no hospital alone learns every class well.
    """
    if hospitals < 1:
        raise ConfigError("at least one hospital is needed")
    rng = np.random.default_rng([seed, 7919])
    n = len(classes)
    sites = []
    for h in range(hospitals):
        w = np.ones(n)
        if n > 1 and hospitals > 1:
            w[h % n] = 2.5
            w[(h + 1) % n] = 0.1
            if n > 2:
                w[(h + 2) % n] = 0.5
        sites.append(
            Site(
                name=f"hospital_{h + 1}",
                gamma=float(rng.uniform(0.7, 1.4)) if h else 1.0,
                gm_wm=float(rng.uniform(-0.08, 0.12)),
                noise=float(rng.uniform(0.015, 0.06)),
                blur=float(rng.uniform(0.0, 0.9)),
                bias=float(rng.uniform(0.05, 0.35)),
                class_weights=tuple(float(x) for x in w / w.sum()),
            )
        )
    return sites


# --------------------------------------------------------------------------- rendering


def _bilinear(
    image: np.ndarray, x: np.ndarray, y: np.ndarray, *, outside: float | None
) -> np.ndarray:
    """Sample ``image`` (X, Y, C) at float coordinates; ``outside`` fills points off the
    grid (``None``: the nearest edge value).  One gather per corner for all channels."""
    nx, ny = image.shape[:2]
    x0 = np.floor(x)
    y0 = np.floor(y)
    fx = (x - x0)[..., None].astype(np.float32)
    fy = (y - y0)[..., None].astype(np.float32)
    x0 = x0.astype(np.intp)
    y0 = y0.astype(np.intp)
    xa, xb = np.clip(x0, 0, nx - 1), np.clip(x0 + 1, 0, nx - 1)
    ya, yb = np.clip(y0, 0, ny - 1), np.clip(y0 + 1, 0, ny - 1)
    out = (image[xa, ya] * (1 - fx) * (1 - fy) + image[xb, ya] * fx * (1 - fy)
           + image[xa, yb] * (1 - fx) * fy + image[xb, yb] * fx * fy)
    if outside is not None:
        off = (x0 < 0) | (y0 < 0) | (x0 >= nx - 1) | (y0 >= ny - 1)
        out[off] = outside
    return out


def render(
    rng: np.random.Generator, label: str, site: Site, size: int = 128
) -> np.ndarray:
    """One synthetic slice of class ``label`` as seen at ``site``: uint8 (size, size)."""
    from scipy import ndimage

    if label not in ("glioma", "meningioma", "pituitary", "notumor"):
        raise ConfigError(
            f"the generator knows glioma, meningioma, pituitary and notumor, not {label!r}"
        )
    # three independent streams, so one seed gives the same anatomy, pose and acquisition
    # whatever lesion is painted (the tests compare a slice with and without one)
    geo, les, acq = rng.spawn(3)
    mm_px = FOV_MM / size
    z = int(geo.integers(*SELLAR_Z)) if label == "pituitary" else int(geo.integers(*Z_RANGE))
    sl = _slice(z, round(max(0.0, 0.45 * (mm_px - 1.0)), 2))
    cx, cy = sl.centroid

    # output grid -> template mm: flip, rotation, scale, shift, elastic warp
    c = (np.arange(size, dtype=np.float32) + 0.5 - size / 2) * mm_px
    v, u = np.meshgrid(c, c, indexing="ij")  # v: rows (down = posterior), u: columns
    if geo.random() < 0.5:
        u = -u
    ang = math.radians(geo.uniform(-10, 10))
    scale = geo.uniform(0.9, 1.1)
    ca, sa = math.cos(ang) / scale, math.sin(ang) / scale
    du, dv = geo.uniform(-6, 6, size=2)
    uu = ca * u - sa * v + du + 2.5 * _smooth_noise(geo, size, 5)
    vv = sa * u + ca * v + dv + 2.5 * _smooth_noise(geo, size, 5)
    px = cx + uu  # template x (voxel = mm)
    py = cy - vv  # template y (anterior up)

    lesion: tuple[str, float, float, float, float] | None = None  # kind, x, y, R, push
    if label == "glioma":
        r = les.uniform(13, 28)
        for _ in range(4):
            ok = np.argwhere(sl.depth > 0.6 * r + 4)
            if len(ok):
                break
            r *= 0.7
        lx, ly = (ok[les.integers(len(ok))] if len(ok) else np.array([cx, cy])).astype(float)
        lesion = ("glioma", lx, ly, r, les.uniform(0.2, 0.45))
    elif label == "meningioma":
        r = les.uniform(12, 25)
        if les.random() < 0.6:  # convexity: on the brain surface, centre pushed inward
            bx, by = sl.boundary[les.integers(len(sl.boundary))].astype(float)
            nx, ny = cx - bx, cy - by
            norm = math.hypot(nx, ny) or 1.0
            lx, ly = bx + 0.35 * r * nx / norm, by + 0.35 * r * ny / norm
        else:  # falx: against the midline, one side
            col = np.nonzero(sl.channels[98, :, 3] > 0.5)[0]
            y = float(col[les.integers(len(col))]) if len(col) else cy
            lx, ly = 98.0 + les.choice([-1, 1]) * (0.55 * r + 1), y
        lesion = ("meningioma", lx, ly, r, les.uniform(0.3, 0.55))
    elif label == "pituitary":
        r = les.uniform(10, 19)
        lesion = ("pituitary", SELLA_XY[0] + les.normal(0, 1.2), SELLA_XY[1] + les.normal(0, 3),
                  r, les.uniform(0.05, 0.2))

    # anatomy sampled through the mass effect (tissue pushed away from the lesion centre)
    sx, sy = px, py
    if lesion is not None:
        _, lx, ly, r, push = lesion
        dx, dy = px - lx, py - ly
        dist = np.sqrt(dx * dx + dy * dy) + 1e-3
        new = np.maximum(dist - push * r * np.exp(-((dist / (1.3 * r)) ** 2)), 0.0)
        sx, sy = lx + dx * new / dist, ly + dy * new / dist
    sampled = _bilinear(sl.channels, sx, sy, outside=0.0)
    t1, gm, wm, brain = (sampled[..., i] for i in range(4))
    sd = _bilinear(sl.signed_dist[..., None], px, py, outside=None)[..., 0]

    # tissue contrast of this site
    img = t1 + site.gm_wm * (wm - gm) * 0.5

    # skull and scalp: CSF/dura, inner table, diploe, outer table, scalp fat
    d = sd + 1.2 * _smooth_noise(acq, size, 8)
    w = np.cumsum([acq.uniform(1.0, 3.0), acq.uniform(1.0, 2.0), acq.uniform(2.0, 4.5),
                   acq.uniform(1.0, 2.0), acq.uniform(3.0, 6.5)])
    ring = np.select(
        [d < 0, d < w[0], d < w[1], d < w[2], d < w[3], d < w[4]],
        [0.0, 0.06, 0.03, acq.uniform(0.35, 0.6), 0.03, acq.uniform(0.55, 0.8)],
        default=0.0,
    ).astype(np.float32)
    ring *= 1 + 0.15 * _smooth_noise(acq, size, 12)
    img = np.where(d < 0, img, ring)
    if SELLAR_Z[0] <= z < SELLAR_Z[1]:  # cavernous sinuses enhance either side of the sella
        for side in (-1, 1):
            q = ((px - SELLA_XY[0] - side * 13) ** 2 + (py - SELLA_XY[1]) ** 2) / 16
            img = np.maximum(img, 0.7 * np.exp(-q))

    if lesion is not None:
        img = paint(les, img, lesion, px, py, wm, brain)

    # acquisition: bias field, contrast curve, resolution, Rician noise, windowing
    xs = (np.arange(size, dtype=np.float32) / size - 0.5) * 2
    yy, xx = np.meshgrid(xs, xs, indexing="ij")
    a = acq.normal(0, 1, 5)
    field = a[0] * xx + a[1] * yy + a[2] * xx * yy + a[3] * xx**2 + a[4] * yy**2
    img = img * np.exp(site.bias * 0.5 * field)
    img = np.clip(img * acq.uniform(0.9, 1.1), 0, None) ** (site.gamma * acq.uniform(0.92, 1.08))
    blur = site.blur + acq.uniform(0, 0.3)
    if blur > 0.05:
        img = ndimage.gaussian_filter(img, blur)
    sigma = site.noise * acq.uniform(0.8, 1.2)
    n1 = acq.standard_normal((2, size, size)).astype(np.float32) * sigma
    img = np.sqrt((img + n1[0]) ** 2 + n1[1] ** 2)
    top = float(np.percentile(img, 99.7)) or 1.0
    return np.clip(img / top * 255.0, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- writing


def _counts(total: int, weights: Sequence[float]) -> list[int]:
    raw = np.asarray(weights, dtype=float) * total
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts))[: total - counts.sum()]:
        counts[i] += 1
    return [int(c) for c in counts]


def synthesize(
    out: str | Path,
    *,
    hospitals: int = 3,
    seed: int = 0,
    train_per_hospital: int = 600,
    test_per_hospital: int = 200,
    size: int = 128,
    classes: Sequence[str] = DEFAULT_CLASSES,
    image_format: str = "jpg",
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Write ``out/hospital_<h>/{Training,Testing}/<class>/*`` for every hospital.

    Training splits follow each site's class imbalance; testing splits are balanced, so a
    pooled test set weighs every class equally.  Returns a summary (also written as
    ``out/synth.json``).
    """
    if image_format not in ("jpg", "png"):
        raise ConfigError("image format must be 'jpg' or 'png'")
    if not 16 <= size <= 1024:
        raise ConfigError("image size must be between 16 and 1024 pixels")
    from PIL import Image

    out = Path(out)
    sites = make_sites(hospitals, seed, classes)
    plan = []
    for h, site in enumerate(sites):
        for s, (split, total, weights) in enumerate(
            (("Training", train_per_hospital, site.class_weights),
             ("Testing", test_per_hospital, [1 / len(classes)] * len(classes)))
        ):
            labels = np.repeat(np.arange(len(classes)), _counts(total, weights))
            np.random.default_rng([seed, h, s, 1]).shuffle(labels)
            plan.extend((h, s, split, i, int(lab)) for i, lab in enumerate(labels))
    summary: dict = {"seed": seed, "size": size, "classes": list(classes),
                     "synthetic": True, "hospitals": {}}
    for site in sites:
        summary["hospitals"][site.name] = {"site": asdict(site), "Training": {}, "Testing": {}}
        for split in SPLITS:
            for cls in classes:
                (out / site.name / split / cls).mkdir(parents=True, exist_ok=True)
    for n, (h, s, split, i, lab) in enumerate(plan):
        site, cls = sites[h], classes[lab]
        rng = np.random.default_rng([seed, h, s, i, 2])
        pixels = render(rng, cls, site, size)
        name = f"{SPLITS[split]}-{cls[:2]}_{i:04d}.{image_format}"
        path = out / site.name / split / cls / name
        if image_format == "jpg":
            Image.fromarray(pixels, "L").save(path, quality=92)
        else:
            Image.fromarray(pixels, "L").save(path, compress_level=1)
        tally = summary["hospitals"][site.name][split]
        tally[cls] = tally.get(cls, 0) + 1
        if progress is not None:
            progress(n + 1, len(plan))
    (out / "synth.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "README.txt").write_text(
        "SYNTHETIC brain MRI slices made by `securefl data synth` from the MNI ICBM152 template\n"
        "with painted lesions. For demos and tests only: not real patients, not for any\n"
        "clinical or diagnostic use, and no measure of how a model performs on real scans.\n"
    )
    return summary
