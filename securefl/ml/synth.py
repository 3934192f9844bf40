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
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from securefl.errors import ConfigError
from securefl.ml.anatomy import SELLA_XY, SELLAR_Z, Z_RANGE, _Anatomy, _slice
from securefl.ml.lesions import _smooth_noise, paint
from securefl.ml.settings import DEFAULT_CLASSES

#: Field of view of an output image, in mm (the template's head fits in ~200 mm).
FOV_MM = 230.0
#: Split prefixes as in the public collections' file names (Tr-gl_0001.jpg).
SPLITS = {"Training": "Tr", "Testing": "Te"}


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


#: Template planes each class needs (t1, wm - gm, brain mask, wm): each costs a bilinear fetch.
_PLANES = {"glioma": 4, "meningioma": 3, "pituitary": 2, "notumor": 2}


@dataclass(frozen=True)
class _Grid:
    """Per-size constants of the output grid, computed once."""

    u: np.ndarray  # (size, size) column offset from the centre, mm
    v: np.ndarray  # (size, size) row offset from the centre, mm (down = posterior)
    bias: np.ndarray  # (5, size * size) x, y, xy, x², y² over [-1, 1]², for the bias field


@functools.lru_cache(maxsize=16)
def _grid(size: int) -> _Grid:
    c = (np.arange(size, dtype=np.float32) + 0.5 - size / 2) * np.float32(FOV_MM / size)
    v, u = np.meshgrid(c, c, indexing="ij")
    xs = (np.arange(size, dtype=np.float32) / size - 0.5) * 2
    yy, xx = np.meshgrid(xs, xs, indexing="ij")
    bias = np.stack([xx, yy, xx * yy, xx**2, yy**2]).reshape(5, -1)
    return _Grid(u, v, bias)


def _lesion(les: np.random.Generator, label: str, anat: _Anatomy
            ) -> tuple[str, float, float, float, float] | None:
    """Where the lesion of class ``label`` sits: (kind, x, y, radius mm, mass-effect push)."""
    cx, cy = anat.centroid
    if label == "glioma":  # deep in the white matter, shrunk until it fits the slice
        r = les.uniform(13, 28)
        for _ in range(4):
            n = int(np.searchsorted(anat.neg_depth, -(0.6 * r + 4)))
            if n:
                break
            r *= 0.7
        lx, ly = (float(c) for c in anat.deep[les.integers(n)]) if n else (cx, cy)
        return ("glioma", lx, ly, r, les.uniform(0.2, 0.45))
    if label == "meningioma":
        r = les.uniform(12, 25)
        if les.random() < 0.6:  # convexity: on the brain surface, centre pushed inward
            bx, by = (float(c) for c in anat.boundary[les.integers(len(anat.boundary))])
            nx, ny = cx - bx, cy - by
            norm = math.hypot(nx, ny) or 1.0
            return ("meningioma", bx + 0.35 * r * nx / norm, by + 0.35 * r * ny / norm, r,
                    les.uniform(0.3, 0.55))
        col = np.nonzero(anat.mask[98])[0]  # falx: against the midline, one side
        y = float(col[les.integers(len(col))]) if len(col) else cy
        lx = 98.0 + float(les.choice([-1, 1])) * (0.55 * r + 1)
        return ("meningioma", lx, y, r, les.uniform(0.3, 0.55))
    if label == "pituitary":
        r = les.uniform(10, 19)
        return ("pituitary", SELLA_XY[0] + les.normal(0, 1.2), SELLA_XY[1] + les.normal(0, 3),
                r, les.uniform(0.05, 0.2))
    return None


def render(
    rng: np.random.Generator, label: str, site: Site, size: int = 128
) -> np.ndarray:
    """One synthetic slice of class ``label`` as seen at ``site``: uint8 (size, size).

    Everything is whole-array float32 work on the output grid: one combined geometric map
    (flip, rotation, scale, shift, elastic warp from a coarse noise grid, mass effect), one
    bilinear fetch through it of the template planes the class needs, then the skull, the
    lesion and the scanner.  About 1-2 ms at 128 px on one core (it was ~7 ms with float64
    leaking in, 2-D fancy indexing and ``np.select``).
    """
    from scipy import ndimage

    if label not in ("glioma", "meningioma", "pituitary", "notumor"):
        raise ConfigError(
            f"the generator knows glioma, meningioma, pituitary and notumor, not {label!r}"
        )
    # three independent streams, so one seed gives the same anatomy, pose and acquisition
    # whatever lesion is painted (the tests compare a slice with and without one)
    geo, les, acq = rng.spawn(3)
    grid = _grid(size)
    mm_px = FOV_MM / size
    z = int(geo.integers(*SELLAR_Z)) if label == "pituitary" else int(geo.integers(*Z_RANGE))
    sl = _slice(z, mm_px)
    cx, cy = sl.anatomy.centroid

    # output grid -> template mm: flip, rotation, scale, shift, elastic warp
    u, v = grid.u, grid.v
    if geo.random() < 0.5:
        u = -u
    ang = math.radians(geo.uniform(-10, 10))
    scale = geo.uniform(0.9, 1.1)
    ca, sa = math.cos(ang) / scale, math.sin(ang) / scale
    du, dv = (float(x) for x in geo.uniform(-6, 6, size=2))
    px = (cx + du) + ca * u - sa * v + 2.5 * _smooth_noise(geo, size, 5)  # template x
    py = (cy - dv) - sa * u - ca * v - 2.5 * _smooth_noise(geo, size, 5)  # y, anterior up

    lesion = _lesion(les, label, sl.anatomy)
    # anatomy sampled through the mass effect (tissue pushed away from the lesion centre)
    sx, sy = px, py
    if lesion is not None:
        _, lx, ly, r, push = lesion
        dx, dy = px - lx, py - ly
        dist = np.sqrt(dx * dx + dy * dy) + 1e-3
        shrink = np.maximum(1 - push * r * np.exp(-((dist / (1.3 * r)) ** 2)) / dist, 0.0)
        sx, sy = lx + dx * shrink, ly + dy * shrink
    # t1 and wm - gm make the image; the brain mask and wm only matter to some lesions
    t1, wm_gm, *maps = sl.sample(sx, sy, _PLANES[label])

    # tissue contrast of this site
    img = t1 + (site.gm_wm * 0.5) * wm_gm

    # skull and scalp: CSF/dura, inner table, diploe, outer table, scalp fat
    d = sl.anatomy.head_distance(px, py) + 1.2 * _smooth_noise(acq, size, 8)
    w = np.cumsum([acq.uniform(1.0, 3.0), acq.uniform(1.0, 2.0), acq.uniform(2.0, 4.5),
                   acq.uniform(1.0, 2.0), acq.uniform(3.0, 6.5)])
    bands = np.array([0.0, 0.06, 0.03, acq.uniform(0.35, 0.6), 0.03, acq.uniform(0.55, 0.8),
                      0.0], dtype=np.float32)
    band = (d >= 0).astype(np.uint8)  # which band each pixel is in: a count of edges passed,
    for edge in w:  # cheaper than searchsorted or np.select for six edges
        band += d >= edge
    ring = bands.take(band)
    ring *= 1 + 0.15 * _smooth_noise(acq, size, 12)
    img = np.where(d < 0, img, ring)
    if SELLAR_Z[0] <= z < SELLAR_Z[1]:  # cavernous sinuses enhance either side of the sella
        for side in (-1, 1):
            q = ((px - (SELLA_XY[0] + side * 13)) ** 2 + (py - SELLA_XY[1]) ** 2) * 0.0625
            img = np.maximum(img, 0.7 * np.exp(-q))

    if lesion is not None:
        img = paint(les, img, lesion, px, py, *maps)

    # acquisition: bias field, contrast curve, resolution, Rician noise, windowing
    field = (acq.normal(0, 1, 5).astype(np.float32) @ grid.bias).reshape(size, size)
    img = img * np.exp((site.bias * 0.5) * field)
    gain, gamma = acq.uniform(0.9, 1.1), site.gamma * acq.uniform(0.92, 1.08)
    img = np.exp(gamma * np.log(np.maximum(img * gain, 1e-6)))  # (gain img)^gamma, vectorised
    blur = site.blur + acq.uniform(0, 0.3)
    if blur > 0.05:
        img = ndimage.gaussian_filter(img, blur, truncate=3.0)
    sigma = site.noise * acq.uniform(0.8, 1.2)
    # Rician magnitude |img + n1 + i n2| with (n1, n2) from Box-Muller: r² = n1² + n2², so
    # |.|² = img² + 2 img n1 + r²; uniforms plus four vector functions beat two normal draws
    uni = acq.random((2, size, size), dtype=np.float32)
    r2 = (-2 * sigma * sigma) * np.log1p(-uni[0])
    n1 = np.sqrt(r2) * np.cos((2 * np.pi) * uni[1])
    img = np.sqrt(np.maximum(img * (img + 2 * n1) + r2, 0))
    top = _top(img.ravel(), int(0.997 * (img.size - 1))) or 1.0
    return np.clip(img * (255.0 / top), 0, 255).astype(np.uint8)


def _top(flat: np.ndarray, k: int) -> float:
    """The ``k``-th smallest of ``flat`` (the window's 99.7th percentile), exactly.

    It sits among the few brightest pixels, so partitioning only the pixels above 0.7 x
    the maximum finds it at a third of the cost; if fewer than ``size - k`` pixels are that
    bright, the whole array is partitioned.
    """
    bright = flat[flat > flat.max() * np.float32(0.7)]
    above = flat.size - k  # the k-th smallest is the ``above``-th largest
    if bright.size >= above:
        return float(np.partition(bright, bright.size - above)[bright.size - above])
    return float(np.partition(flat, k)[k])


# --------------------------------------------------------------------------- writing


def class_counts(total: int, weights: Sequence[float]) -> list[int]:
    """How many of ``total`` images each class gets (largest remainders)."""
    return _counts(total, weights)


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
    plan: list[tuple[int, int, str, int, int]] = []  # (hospital, split no., split, i, label)
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
            # Huffman-only zlib: half the time of the default strategy at level 1, and smaller
            # files, since these noisy slices have few repeated strings to match
            Image.fromarray(pixels, "L").save(path, compress_level=1, compress_type=2)
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
