"""Painting the tumour classes onto a synthetic slice, and the smooth noise fields.

Split from ``synth.py``: the anatomy (template slices, sites, scanners) lives there, the
look of each lesion as radiologists describe it lives here.
"""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=64)
def _basis(size: int, grid: int) -> np.ndarray:
    """(size, grid) weights of Gaussian bumps on a coarse grid; unit variance per pixel."""
    x = (np.arange(size) + 0.5) / size * grid - 0.5
    w = np.exp(-0.5 * ((x[:, None] - np.arange(grid)[None, :]) / 0.8) ** 2)
    return (w / np.sqrt((w**2).sum(axis=1, keepdims=True))).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, grid: int = 6) -> np.ndarray:
    """Low-frequency noise field (roughly unit variance) at ``size`` x ``size``."""
    b = _basis(size, grid)
    return b @ rng.standard_normal((grid, grid)).astype(np.float32) @ b.T


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _radius(rng: np.random.Generator, theta: np.ndarray, amp: float, kmax: int) -> np.ndarray:
    """An irregular radius profile ``1 + sum a_k cos(k theta + phi_k)`` around a lesion."""
    r = np.ones_like(theta)
    for k in range(2, kmax + 1):
        r += rng.uniform(0, amp) / (k / 2) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return r


def paint(
    rng: np.random.Generator,
    img: np.ndarray,
    lesion: tuple[str, float, float, float, float],
    px: np.ndarray,
    py: np.ndarray,
    brain: np.ndarray | None = None,
    wm: np.ndarray | None = None,
) -> np.ndarray:
    """``img`` with ``lesion`` (kind, x, y, radius mm, push) painted at template coordinates
    ``px``, ``py``; ``brain`` and ``wm`` are the brain and white-matter maps as sampled
    (the glioma needs both, the meningioma the brain, the pituitary neither).

    Everything is float32 on the output grid: lesions are large (the glioma's oedema can
    cover half the slice), so cropping to a box would save little and cost branches.
    """
    kind, lx, ly, r, _ = lesion
    dx, dy = px - lx, py - ly
    dist = np.sqrt(dx * dx + dy * dy)
    theta = np.arctan2(dy, dx)
    texture = _smooth_noise(rng, img.shape[0], 16)
    if kind == "glioma":
        assert brain is not None and wm is not None
        return _glioma(rng, img, r, dist, theta, texture, wm, brain)
    if kind == "meningioma":
        assert brain is not None
        return _meningioma(rng, img, r, dist, theta, texture, brain)
    return _pituitary(rng, img, lx, ly, r, dist, theta, texture, px, py)


def _glioma(rng: np.random.Generator, img: np.ndarray, r: float, dist: np.ndarray,
            theta: np.ndarray, texture: np.ndarray, wm: np.ndarray, brain: np.ndarray
            ) -> np.ndarray:
    size = img.shape[0]
    rt = r * _radius(rng, theta, 0.28, 6) + 0.12 * r * _smooth_noise(rng, size, 10)
    inside = _sigmoid((rt - dist) / rng.uniform(0.8, 2.0))  # infiltrative margin
    ro = rt * rng.uniform(1.4, 2.2) * _radius(rng, theta, 0.3, 5)
    oedema = _sigmoid((ro - dist) / 2.5) * (0.35 + 0.65 * wm) * (brain > 0.3)
    img = img * (1 - rng.uniform(0.25, 0.45) * oedema)
    if rng.random() < 0.7:  # high grade: enhancing rim around a necrotic core
        core = rt * rng.uniform(0.4, 0.7)
        rim = _sigmoid((dist - core) / 0.8)
        val = (rng.uniform(0.12, 0.3) + 0.06 * texture) * (1 - rim) + \
            (rng.uniform(1.0, 1.3) + 0.1 * texture) * rim
    else:  # lower grade: heterogeneous hypointense mass with patchy enhancement
        patches = np.clip(_smooth_noise(rng, size, 20) - 0.8, 0, None)
        val = rng.uniform(0.3, 0.45) + 0.1 * texture + 0.9 * patches
    return img * (1 - inside) + val * inside


def _meningioma(rng: np.random.Generator, img: np.ndarray, r: float, dist: np.ndarray,
                theta: np.ndarray, texture: np.ndarray, brain: np.ndarray) -> np.ndarray:
    rt = r * _radius(rng, theta, 0.05, 3)
    inside = _sigmoid((rt - dist) / 0.5)  # sharply circumscribed
    cleft = np.exp(-(((dist - rt - 0.9) / 0.8) ** 2)) * (brain > 0.3)
    img = img * (1 - 0.6 * cleft)
    # dural tail: a thin enhancing strip along the brain surface, fading with distance
    surface = np.exp(-(((brain - 0.5) / 0.2) ** 2))
    tail = surface * np.exp(-np.maximum(dist - rt, 0) / rng.uniform(4, 9)) * (dist > rt)
    img = np.maximum(img, 1.1 * tail)
    val = rng.uniform(1.0, 1.3) + 0.03 * texture
    return img * (1 - inside) + val * inside


def _pituitary(rng: np.random.Generator, img: np.ndarray, lx: float, ly: float, r: float,
               dist: np.ndarray, theta: np.ndarray, texture: np.ndarray, px: np.ndarray,
               py: np.ndarray) -> np.ndarray:
    """Rounded, enhancing, mildly heterogeneous, sometimes a small cyst."""
    rt = r * _radius(rng, theta, 0.08, 3)
    inside = _sigmoid((rt - dist) / 0.8)
    val = rng.uniform(0.95, 1.25) + 0.08 * texture
    if rng.random() < 0.3:
        cyst = np.exp(-(((px - lx - rng.uniform(-0.3, 0.3) * r) ** 2
                         + (py - ly - rng.uniform(-0.3, 0.3) * r) ** 2) / (0.3 * r) ** 2))
        val = val * (1 - 0.6 * cyst)
    return img * (1 - inside) + val * inside
