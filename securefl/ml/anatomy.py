"""The MNI152 template as the generator uses it: slices, their derived maps, sampling.

Split from ``synth.py`` (which poses, paints and acquires each image) because this part is
all about doing the expensive work once: the volumes are read once per process, each axial
slice's maps once per process and its smoothed channels once per output size, laid out so
that sampling an image is four array ``take`` calls.

Anatomy: the MNI ICBM152 2009a symmetric T1 template and its grey/white-matter maps, which
ship inside the ``nilearn`` wheel (read offline with ``nibabel``; 197x233x189, 1 mm).
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from securefl.errors import DataError

#: Axial template slices used for every class (voxel z indices; 1 mm apart).
Z_RANGE = (36, 128)
#: Slices through the sella turcica / suprasellar cistern, where pituitary tumours are seen.
SELLAR_Z = (38, 54)
#: Where the sella sits in the template's voxel grid (x midline, y).
SELLA_XY = (98.0, 138.0)

_TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}

#: Template slab kept in memory: every z any class may use.
_Z_SLAB = (min(Z_RANGE[0], SELLAR_Z[0]), max(Z_RANGE[1], SELLAR_Z[1]))
#: Zero border around each slice, so clamped coordinates off the template read 0.
_PAD = 2
#: Grid step (mm) of the head-envelope distance and the depth maps: they are smooth, and a
#: 2 mm grid makes their distance transforms four times cheaper than the 1 mm template.
_COARSE = 2


@functools.lru_cache(maxsize=1)
def _volumes() -> dict[str, np.ndarray]:
    """The three template volumes, uint8 (X, Y, z in ``_Z_SLAB``), read once per process.

    Only the slab the generator uses is decoded and kept: the gzip stream is read no further
    than its last slice.
    """
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
        # nibabel types load() as returning FileBasedImage; a NIfTI file gives a
        # Nifti1Image, which has dataobj.
        slab = nibabel.load(path).dataobj[:, :, _Z_SLAB[0]:_Z_SLAB[1]]  # type: ignore[attr-defined]
        out[key] = np.asarray(slab, dtype=np.uint8)
    return out


@dataclass(frozen=True)
class _Anatomy:
    """Size-independent maps of one axial slice (template voxels are 1 mm)."""

    mask: np.ndarray  # (X, Y) bool brain mask, holes filled
    signed_dist: np.ndarray  # (1, X' * Y') mm to the head envelope, coarse grid padded by 1
    coarse_shape: tuple[int, int]  # (X', Y') of that grid
    deep: np.ndarray  # (k, 2) brain voxel coordinates, deepest first
    neg_depth: np.ndarray  # (k,) minus their depth in mm, ascending
    boundary: np.ndarray  # (m, 2) brain-surface voxel coordinates (x, y)
    centroid: tuple[float, float]

    def head_distance(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """mm from template points (x, y) to the head envelope, negative inside it."""
        (d,) = _sample(self.signed_dist, self.coarse_shape, x / _COARSE + 1, y / _COARSE + 1)
        return d


@dataclass(frozen=True)
class _Slice:
    """One slice prepared for an output pixel size, laid out for ``_sample``."""

    anatomy: _Anatomy
    planes: np.ndarray  # (4, X' * Y') t1, wm - gm, brain mask, wm; 0 off the brain
    shape: tuple[int, int]  # (X', Y'): the grid, zero-padded by _PAD cells
    step: int  # grid cell in template voxels (mm)

    def sample(self, x: np.ndarray, y: np.ndarray, count: int) -> list[np.ndarray]:
        """The first ``count`` planes at template points (x, y), bilinear."""
        off = (self.step - 1) / 2 - _PAD * self.step  # cell i is centred on voxel k*i + off
        return _sample(self.planes, self.shape, (x - off) / self.step, (y - off) / self.step,
                       count)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` plus every background region not connected to the image border.

    Same result as ``ndimage.binary_fill_holes`` but one labelling pass instead of
    dilating until nothing changes, which costs tens of passes on a head-sized slice.
    """
    from scipy import ndimage

    labels, _ = ndimage.label(~mask)
    rim = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return ~np.isin(labels, rim[rim > 0])


@functools.lru_cache(maxsize=256)
def _anatomy(z: int) -> _Anatomy:
    """Brain mask, head-envelope distance, depth order and surface of template slice ``z``.

    The envelope and depth maps only place the skull ring and the gliomas, so they are
    computed on a 2 mm grid; the half-cell offset makes the signed distance run -1, +1 mm
    (not -2, +2) either side of the envelope, so the ring's bands keep their thickness.
    """
    from scipy import ndimage

    t1 = _volumes()["t1"][:, :, z - _Z_SLAB[0]]
    mask = _fill_holes(t1 > 10)  # 0.04 of full scale
    k = _COARSE
    coarse = mask[::k, ::k].astype(np.float32)
    envelope = _fill_holes(ndimage.gaussian_filter(coarse, 9 / k) > 0.15)
    half = k / 2
    signed = np.where(envelope, half - ndimage.distance_transform_edt(envelope, sampling=k),
                      ndimage.distance_transform_edt(~envelope, sampling=k) - half)
    depth = ndimage.distance_transform_edt(coarse > 0.5, sampling=k) - half
    inside = np.argwhere(depth > 0)
    d = depth[depth > 0]
    order = np.argsort(-d, kind="stable")
    interior = mask.copy()
    interior[1:-1, 1:-1] &= (mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:])
    interior[[0, -1], :] = False
    interior[:, [0, -1]] = False
    xs, ys = np.nonzero(mask)
    signed = np.pad(signed.astype(np.float32), 1, mode="edge")
    return _Anatomy(
        mask=mask,
        signed_dist=signed.reshape(1, -1),
        coarse_shape=(signed.shape[0], signed.shape[1]),
        deep=inside[order] * k,
        neg_depth=-d[order],
        boundary=np.argwhere(mask & ~interior),
        centroid=(float(xs.mean()), float(ys.mean())),
    )


@functools.lru_cache(maxsize=512)
def _slice(z: int, mm_px: float) -> _Slice:
    """Template slice ``z`` anti-aliased for output pixels of ``mm_px`` mm, zero-padded and
    flattened, so ``_sample`` reads each channel with 1-D ``take`` calls.

    The anti-alias blur (sigma 0.45 * (mm_px - 1) mm) is cheapest as a block mean onto a
    coarser grid followed by a small Gaussian for the rest of the variance: at 64 px the
    grid is 2 mm, at 48 px 3 mm, and sampling the smaller grid is kinder to the cache too.
    """
    from scipy import ndimage

    vols = _volumes()
    anat = _anatomy(z)
    t1, gm, wm = (vols[key][:, :, z - _Z_SLAB[0]].astype(np.float32) / 255.0
                  for key in ("t1", "gm", "wm"))
    chans = np.stack([t1, wm - gm, anat.mask.astype(np.float32), wm])
    k = max(1, int(mm_px / 1.5))
    if k > 1:
        nx, ny = chans.shape[1] // k, chans.shape[2] // k
        chans = chans[:, :nx * k, :ny * k].reshape(4, nx, k, ny, k).mean(axis=(2, 4))
    var = (0.45 * max(mm_px - 1.0, 0.0)) ** 2 - (k * k - 1) / 12  # a k-box adds (k²-1)/12
    sigma = math.sqrt(max(var, 0.0)) / k
    if sigma > 0.4:  # below, the 3-tap kernel puts < 5 % on the neighbours: not worth a pass
        chans = ndimage.gaussian_filter(chans, (0, sigma, sigma), truncate=3.0)
    chans = np.pad(chans, ((0, 0), (_PAD, _PAD), (_PAD, _PAD)))
    planes = np.ascontiguousarray(chans.reshape(4, -1), dtype=np.float32)
    return _Slice(anat, planes, (chans.shape[1], chans.shape[2]), k)


def _sample(planes: np.ndarray, shape: tuple[int, int], x: np.ndarray, y: np.ndarray,
            count: int | None = None) -> list[np.ndarray]:
    """Bilinear samples of the first ``count`` of ``planes`` ((C, X*Y), flattened grids) at
    float grid coordinates ``x``, ``y``, clamped to the grid: one float32 array per plane,
    shaped like ``x``.

    The corner indices and weights are computed once for every plane; each plane then costs
    four 1-D ``take`` calls and nine in-place operations, all on arrays of one image's size.
    That is ten times faster than 2-D fancy indexing or ``map_coordinates`` (which redoes
    the weights per channel), and no temporary is big enough for the allocator to hand it
    straight back to the OS (page faults on every image cost as much as the arithmetic).
    """
    nx, ny = shape
    fx = np.clip(x, 0.0, nx - 1.001)
    fy = np.clip(y, 0.0, ny - 1.001)
    xf, yf = np.floor(fx), np.floor(fy)
    fx -= xf  # fractional parts (float32 - int32 would promote to float64, floor keeps 32)
    fy -= yf
    i00 = xf.astype(np.intp)
    i00 *= ny
    i00 += yf.astype(np.intp)
    i10, i01 = i00 + ny, i00 + 1
    i11 = i10 + 1
    out = []
    for p in planes[:count]:
        # indices are in range by the clamp; mode="wrap" skips numpy's slower checked path
        a, b = p.take(i00, mode="wrap"), p.take(i10, mode="wrap")
        b -= a
        b *= fx
        a += b  # along x at the lower y
        c, d = p.take(i01, mode="wrap"), p.take(i11, mode="wrap")
        d -= c
        d *= fx
        c += d  # along x at the upper y
        c -= a
        c *= fy
        a += c
        out.append(a)
    return out
