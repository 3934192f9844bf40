"""The built-in synthetic data: deterministic, in the standard layout, non-IID across sites."""

from __future__ import annotations

import json

import numpy as np
import pytest

from securefl.errors import ConfigError
from securefl.ml.settings import DEFAULT_CLASSES
from securefl.ml.synth import make_sites, render, synthesize


def test_render_is_deterministic_per_generator_seed():
    site = make_sites(3, seed=4)[1]
    for label in ("glioma", "meningioma", "pituitary", "notumor"):
        a = render(np.random.default_rng([9, 1]), label, site, 48)
        b = render(np.random.default_rng([9, 1]), label, site, 48)
        c = render(np.random.default_rng([9, 2]), label, site, 48)
        assert a.dtype == np.uint8 and a.shape == (48, 48)
        assert np.array_equal(a, b)
        assert not np.array_equal(a, c)


def test_synthesize_is_deterministic_and_in_the_standard_layout(tmp_path):
    kw = dict(hospitals=2, seed=3, train_per_hospital=24, test_per_hospital=8, size=32)
    s1 = synthesize(tmp_path / "a", **kw)
    s2 = synthesize(tmp_path / "b", **kw)
    assert s1 == s2
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.jpg"))
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.jpg"))
    assert files_a == files_b and len(files_a) == 2 * (24 + 8)
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert {p.parts[1] for p in files_a} == {"Training", "Testing"}
    assert {p.parts[2] for p in files_a} == set(DEFAULT_CLASSES)
    assert json.loads((tmp_path / "a" / "synth.json").read_text())["synthetic"] is True
    assert "SYNTHETIC" in (tmp_path / "a" / "README.txt").read_text()
    other = synthesize(tmp_path / "c", **{**kw, "seed": 4})
    first = files_a[0]
    assert (tmp_path / "c" / first).read_bytes() != (tmp_path / "a" / first).read_bytes() \
        or other != s1


def test_sites_are_not_iid():
    sites = make_sites(3, seed=0)
    weights = np.array([s.class_weights for s in sites])
    assert np.allclose(weights.sum(axis=1), 1)
    # every site is short of some class another site has plenty of
    for h in range(3):
        rare = int(weights[h].argmin())
        assert weights[h, rare] < 0.05
        assert weights[:, rare].max() > 0.2
    assert len({round(s.gamma, 3) for s in sites}) == 3
    assert len({round(s.noise, 4) for s in sites}) == 3


def test_training_split_follows_site_balance_and_testing_is_balanced(tmp_path):
    s = synthesize(tmp_path, hospitals=3, seed=0, train_per_hospital=80, test_per_hospital=40,
                   size=24)
    for name, info in s["hospitals"].items():
        assert sum(info["Training"].values()) == 80, name
        assert sorted(info["Testing"].values()) == [10, 10, 10, 10]
        assert max(info["Training"].values()) >= 40 > 4 >= min(info["Training"].values())


def test_a_lesion_changes_one_region_of_an_otherwise_identical_slice():
    """One seed fixes anatomy, pose and acquisition; only the lesion and its mass effect differ."""
    site = make_sites(1, seed=0)[0]
    for seed in range(4):
        healthy = render(np.random.default_rng([5, seed]), "notumor", site, 64).astype(float)
        for label in ("glioma", "meningioma"):
            sick = render(np.random.default_rng([5, seed]), label, site, 64).astype(float)
            # the output is windowed to its 99.7th percentile, so a bright lesion dims the
            # whole slice a little: compare after taking out that one global gain
            both = (healthy > 20) & (sick > 20)
            gain = np.median(sick[both] / healthy[both])
            changed = np.abs(sick / gain - healthy) > 12
            assert 0.005 < changed.mean() < 0.5, (label, seed, changed.mean())
            # outside the head (the corners) nothing moved: same pose, same acquisition
            for corner in (changed[:8, :8], changed[:8, -8:], changed[-8:, :8], changed[-8:, -8:]):
                assert not corner.any(), (label, seed)


def test_bad_arguments_are_config_errors(tmp_path):
    with pytest.raises(ConfigError):
        synthesize(tmp_path, hospitals=0)
    with pytest.raises(ConfigError):
        synthesize(tmp_path, image_format="gif")
    with pytest.raises(ConfigError):
        render(np.random.default_rng(0), "astrocytoma", make_sites(1, 0)[0], 32)
