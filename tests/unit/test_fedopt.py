"""The server optimiser (securefl.fedopt): plain FedAvg exactly, the momentum and Adam
arithmetic on small vectors, the rules for running statistics, state round trips, refusals."""

import io
import subprocess
import sys

import numpy as np
import pytest

from securefl import config, fedopt
from securefl.errors import ConfigError, DataError
from securefl.fedopt import (
    ServerOptimizer,
    ServerOptSettings,
    StatisticsLayout,
    statistics_layout,
)


def vec(*values):
    return np.array(values, dtype=np.float32)


def opt(kind="fedavgm", size=3, **kw):
    return ServerOptimizer(ServerOptSettings(kind=kind, **kw), size)


def test_fedavg_lr1_is_the_plain_add_bit_for_bit():
    rng = np.random.default_rng(0)
    w = rng.standard_normal(200_003).astype(np.float32)  # more than one chunk
    d = rng.standard_normal(200_003).astype(np.float32) * 1e-3
    expected = w + d
    o = ServerOptimizer(ServerOptSettings(kind="fedavg", server_lr=1.0), w.size)
    got = o.step(w, d.copy())
    assert got.dtype == np.float32
    assert np.array_equal(got, expected)
    assert o.state_arrays() == {}


def test_fedavgm_without_momentum_is_plain_fedavg():
    w, d = vec(1, 2, 3), vec(0.1, -0.2, 0.3)
    assert np.array_equal(opt(momentum=0.0).step(w, d.copy()), w + d)


def test_step_writes_into_the_update_and_leaves_the_weights():
    w, d = vec(1, 2, 3), vec(0.5, 0.5, 0.5)
    w_before = w.copy()
    out = opt(kind="fedavg").step(w, d)
    assert out is d
    assert np.array_equal(w, w_before)
    out2 = opt(kind="fedavg").step(w, vec(1, 1, 1), out=w)  # in place on the weights
    assert out2 is w and np.array_equal(w, vec(2, 3, 4))


def test_server_learning_rate_scales_the_update():
    w = vec(1, 1, 1)
    got = opt(kind="fedavg", server_lr=2.5).step(w, vec(0.2, -0.4, 0))
    np.testing.assert_allclose(got, [1.5, 0.0, 1.0], rtol=1e-6)


def test_heavy_ball_momentum_by_hand():
    o = opt(momentum=0.5, server_lr=2.0, size=2)
    w = vec(0, 0)
    for d, m, w_expected in [((1, -2), (1, -2), (2, -4)),
                             ((1, 0), (1.5, -1), (5, -6)),
                             ((0, 0), (0.75, -0.5), (6.5, -7))]:
        w = o.step(w, vec(*d))
        np.testing.assert_allclose(o.state_arrays()["m"], m, rtol=1e-6)
        np.testing.assert_allclose(w, w_expected, rtol=1e-6)
    assert o.steps == 3


def test_fedadam_by_hand():
    o = opt(kind="fedadam", size=2, server_lr=0.1, momentum=0.9, beta2=0.99, eps=1e-3)
    w = vec(1, 1)
    d = vec(0.2, -0.02)
    w = o.step(w, d.copy())
    m = 0.1 * d.astype(np.float64)
    v = 0.01 * d.astype(np.float64) ** 2
    np.testing.assert_allclose(o.state_arrays()["m"], m, rtol=1e-6)
    np.testing.assert_allclose(o.state_arrays()["v"], v, rtol=1e-5)
    np.testing.assert_allclose(w, 1 + 0.1 * m / (np.sqrt(v) + 1e-3), rtol=1e-5)
    # second step, zero update: momentum keeps moving the weights
    w_prev = w.copy()
    w = o.step(w, vec(0, 0))
    m, v = 0.9 * m, 0.99 * v
    np.testing.assert_allclose(w, w_prev + 0.1 * m / (np.sqrt(v) + 1e-3), rtol=1e-5)


def test_statistics_layout_from_layer_names():
    layers = [("b1_conv/kernel", 9), ("b1_bn/gamma", 2), ("b1_bn/beta", 2),
              ("b1_bn/moving_mean", 2), ("b1_bn/moving_variance", 2),
              ("classes/kernel", 4), ("b2_bn/moving_mean", 3), ("b2_bn/moving_variance", 3)]
    layout = statistics_layout(layers)
    assert layout.ranges == ((13, 17), (21, 27))
    assert layout.variances == ((15, 17), (24, 27))
    assert statistics_layout([("dense/kernel", 5)]) == StatisticsLayout()


# weights 0 and 3, a mean at 1 and a variance at 2
LAYOUT = StatisticsLayout(ranges=((1, 3),), variances=((2, 3),))


def test_plain_statistics_are_averaged_whatever_the_kind():
    settings = ServerOptSettings(kind="fedavgm", momentum=0.9, server_lr=3.0, statistics="plain")
    o = ServerOptimizer(settings, 4, statistics=LAYOUT)
    w = vec(0, 1, 1, 0)
    d = vec(1, 0.5, -0.5, 1)
    for _ in range(3):
        w = o.step(w, d.copy())
    np.testing.assert_allclose(w[1:3], [2.5, -0.5], rtol=1e-6)  # three plain adds
    assert np.all(o.state_arrays()["m"][1:3] == 0)  # no momentum kept for statistics
    # heavy ball on the weights: m = 1, 1.9, 2.71 and w = 3 * (sum of the m's)
    np.testing.assert_allclose(w[[0, 3]], 3.0 * (1 + 1.9 + 2.71), rtol=1e-6)


def test_following_statistics_are_plain_first_then_move_like_the_weights():
    settings = ServerOptSettings(kind="fedavgm", momentum=0.5, server_lr=1.0)
    assert settings.statistics == "follow"
    o = ServerOptimizer(settings, 4, statistics=LAYOUT)
    w = vec(0, 0, 1, 0)
    w = o.step(w, vec(1, 4, 3, 1))  # first step: statistics plainly averaged, no momentum
    np.testing.assert_allclose(w, [1, 4, 4, 1])
    np.testing.assert_allclose(o.state_arrays()["m"], [1, 0, 0, 1])
    w = o.step(w, vec(1, 1, -1, 1))  # then heavy ball for everything: m = 0.5 m + d
    np.testing.assert_allclose(o.state_arrays()["m"], [1.5, 1, -1, 1.5])
    np.testing.assert_allclose(w, [2.5, 5, 3, 2.5])
    w = o.step(w, vec(0, 0, -3.4, 0))  # the variance would be 3 - 3.9 < 0: kept at 0
    np.testing.assert_allclose(w, [3.25, 5.5, 0, 3.25])


def test_fedadam_keeps_statistics_plain():
    settings = ServerOptSettings(kind="fedadam", server_lr=0.1, statistics="follow")
    o = ServerOptimizer(settings, 4, statistics=LAYOUT)
    w = vec(0, 0, 1, 0)
    for _ in range(3):
        w = o.step(w, vec(1, 1, 1, 1))
    np.testing.assert_allclose(w[1:3], [3, 4])


def test_fedavg_lr1_leaves_even_negative_variances_alone():
    o = ServerOptimizer(ServerOptSettings(kind="fedavg"), 4, statistics=LAYOUT)
    w = o.step(vec(0, 0, 1, 0), vec(1, 1, 1, 1))
    w = o.step(w, vec(1, 1, -2.5, 1))  # only a broken hospital could send this: no clamp
    np.testing.assert_allclose(w, [2, 2, -0.5, 2])


@pytest.mark.parametrize("layout", [
    StatisticsLayout(((0, 6),), ()), StatisticsLayout(((2, 1),), ()),
    StatisticsLayout(((0, 2), (1, 3)), ()), StatisticsLayout(((-1, 2),), ()),
    StatisticsLayout(((0, 2),), ((1, 3),)),
])
def test_bad_statistics_layouts_are_refused(layout):
    with pytest.raises(DataError):
        ServerOptimizer(ServerOptSettings(), 5, statistics=layout)


@pytest.mark.parametrize("kind", ["fedavg", "fedavgm", "fedadam"])
def test_state_round_trip_continues_identically(kind, tmp_path):
    rng = np.random.default_rng(1)
    a = ServerOptimizer(ServerOptSettings(kind=kind, server_lr=0.5, momentum=0.8), 7,
                        statistics=StatisticsLayout(((2, 4),), ((3, 4),)))
    w = rng.standard_normal(7).astype(np.float32)
    for _ in range(3):
        w = a.step(w, rng.standard_normal(7).astype(np.float32))
    path = tmp_path / "opt.state"
    with open(path, "wb") as f:
        a.save(f, version=12)
    with open(path, "rb") as f:
        b, version = ServerOptimizer.load(f)
    c, version_c = ServerOptimizer.from_bytes(a.to_bytes())
    assert version == 12 and version_c is None
    assert b.settings == a.settings and b.statistics == a.statistics
    assert b.steps == a.steps == 3
    d = rng.standard_normal(7).astype(np.float32)
    wa = a.step(w.copy(), d.copy())
    wb = b.step(w.copy(), d.copy())
    wc = c.step(w.copy(), d.copy())
    assert np.array_equal(wa, wb) and np.array_equal(wa, wc)


def test_load_state_and_state_arrays():
    a = opt(kind="fedadam")
    a.step(vec(0, 0, 0), vec(1, 2, 3))
    b = opt(kind="fedadam")
    b.load_state({k: v.copy() for k, v in a.state_arrays().items()}, a.steps)
    assert all(np.array_equal(a.state_arrays()[k], b.state_arrays()[k]) for k in ("m", "v"))
    with pytest.raises(DataError):
        b.load_state({"m": vec(0, 0, 0)}, 1)  # v missing
    with pytest.raises(DataError):
        b.load_state({"m": vec(0, 0, 0), "v": vec(0, np.nan, 0)}, 1)
    with pytest.raises(DataError):
        b.load_state({"m": vec(0, 0), "v": vec(0, 0)}, 1)


def saved(kind="fedavgm", size=3, version=0):
    o = opt(kind=kind, size=size)
    o.step(np.zeros(size, np.float32), np.ones(size, np.float32))
    return o.to_bytes(version=version)


@pytest.mark.parametrize("data", [b"", b"not a state file", fedopt.MAGIC + b"\xff\xff",
                                  saved()[:-40], saved()[:-1] + b"\x00"])
def test_unreadable_truncated_or_corrupt_state_is_a_data_error(data):
    with pytest.raises(DataError):
        ServerOptimizer.from_bytes(data)


def test_foreign_format_is_refused():
    good = saved()
    meta_len = int.from_bytes(good[len(fedopt.MAGIC):len(fedopt.MAGIC) + 4], "big")
    start = len(fedopt.MAGIC) + 4
    meta = good[start:start + meta_len].replace(b"securefl-fedopt/1", b"securefl-fedopt/9")
    with pytest.raises(DataError, match="format"):
        ServerOptimizer.from_bytes(good[:start] + meta + good[start + meta_len:])


# -- the server's streamed state ----------------------------------------------------------------

def _stream(settings, layout, w, d, previous: bytes | None, version: int):
    target = io.BytesIO()
    report = fedopt.step_file(settings, layout, w, d, version=version, target=target,
                              previous=None if previous is None else io.BytesIO(previous))
    return report, target.getvalue()


@pytest.mark.parametrize("kind", ["fedavg", "fedavgm", "fedadam"])
def test_streamed_steps_equal_the_in_memory_optimiser_bit_for_bit(kind):
    size = 2 * fedopt.CHUNK + 1234  # several slices, statistics across a slice boundary
    layout = StatisticsLayout(((fedopt.CHUNK - 10, fedopt.CHUNK + 500),),
                              ((fedopt.CHUNK + 100, fedopt.CHUNK + 500),))
    s = ServerOptSettings(kind=kind, server_lr=0.8, momentum=0.6)
    rng = np.random.default_rng(3)
    mem = ServerOptimizer(s, size, statistics=layout)
    w_mem = rng.standard_normal(size).astype(np.float32)
    w_file, state = w_mem.copy(), None
    for version in range(4):
        d = rng.standard_normal(size).astype(np.float32)
        w_mem = mem.step(w_mem, d.copy())
        report, state = _stream(s, layout, w_file, d, state, version)
        w_file = d  # step_file writes the new weights into the update
        assert report == fedopt.StepReport(version + 1, None)
        assert np.array_equal(w_mem, w_file)
    loaded, tag = ServerOptimizer.from_bytes(state)
    assert tag == 4 and loaded.steps == 4
    for n, v in mem.state_arrays().items():
        assert np.array_equal(loaded.state_arrays()[n], v)


@pytest.mark.parametrize("why, previous, version, settings", [
    ("no saved state", None, 3, ServerOptSettings()),
    ("belongs to model version 0, the latest is 3", "v0", 3, ServerOptSettings()),
    ("kept for fedavgm, the settings now say fedadam", "v0", 0,
     ServerOptSettings(kind="fedadam")),
    ("another shape", "size4", 0, ServerOptSettings()),
    ("corrupt", "flipped", 0, ServerOptSettings()),
    ("unreadable", "junk", 0, ServerOptSettings()),
])
def test_a_state_that_cannot_continue_restarts_from_zero_and_says_why(
        why, previous, version, settings):
    prev = {None: None, "v0": saved(version=0), "size4": saved(size=4, version=0),
            "flipped": saved(version=0)[:-33] + b"\x01" + saved(version=0)[-32:],
            "junk": b"junk"}[previous]
    w, d = vec(1, 2, 3), vec(1, 1, 1)
    report, state = _stream(settings, fedopt.NO_STATISTICS, w, d, prev, version)
    assert report.steps == 1 and why in report.restarted
    fresh = ServerOptimizer(settings, 3).step(w, vec(1, 1, 1))
    assert np.array_equal(d, fresh)  # exactly a first step
    assert ServerOptimizer.from_bytes(state)[1] == version + 1


def test_the_first_step_from_version_0_is_not_a_restart():
    report, _ = _stream(ServerOptSettings(), fedopt.NO_STATISTICS, vec(0, 0, 0),
                        vec(1, 1, 1), None, 0)
    assert report == fedopt.StepReport(1, None)


def test_a_refused_streamed_step_writes_nothing():
    target = io.BytesIO()
    with pytest.raises(DataError, match="NaN"):
        fedopt.step_file(ServerOptSettings(), fedopt.NO_STATISTICS, vec(0, 0, 0),
                         vec(1, np.nan, 1), previous=None, version=0, target=target)
    assert target.getvalue() == b""


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["weights", "update"])
def test_non_finite_input_is_refused_before_the_state_changes(bad, where):
    o = opt(momentum=0.9)
    o.step(vec(0, 0, 0), vec(1, 1, 1))
    before = o.state_arrays()["m"].copy()
    w, d = vec(0, 0, 0), vec(1, 1, 1)
    (w if where == "weights" else d)[1] = bad
    with pytest.raises(DataError, match="NaN or infinite"):
        o.step(w, d)
    assert np.array_equal(o.state_arrays()["m"], before) and o.steps == 1


def test_wrong_shapes_and_dtypes_are_refused():
    o = opt()
    with pytest.raises(DataError):
        o.step(vec(0, 0), vec(1, 1))
    with pytest.raises(DataError):
        o.step(np.zeros(3), np.zeros(3))  # float64
    w = vec(0, 0, 0)
    with pytest.raises(DataError):
        o.step(w, w)
    with pytest.raises(DataError):
        ServerOptimizer(ServerOptSettings(), 0)


SERVER = {"cert": "c", "key": "k", "ca": "a", "crl": "r"}


def test_server_opt_settings_are_validated_with_the_server_settings(tmp_path):
    path = config.write_toml(tmp_path / "server.toml", SERVER)
    assert config.load(path, config.ServerSettings).server_opt == ServerOptSettings()
    config.write_toml(path, {**SERVER, "server_opt": {"kind": "fedadam", "server_lr": 0.01}})
    assert config.load(path, config.ServerSettings).server_opt.kind == "fedadam"
    for bad in ({"kind": "sgd"}, {"momentum": 1.0}, {"server_lr": 0}, {"lr": 1},
                {"server_lr": float("nan")}, {"eps": float("inf")}, {"statistics": "local"}):
        config.write_toml(path, {**SERVER, "server_opt": bad})
        with pytest.raises(ConfigError, match="server_opt"):
            config.load(path, config.ServerSettings)


def test_importing_fedopt_loads_no_tensorflow():
    code = ("import sys, securefl.fedopt; bad = [m for m in ('tensorflow', 'keras') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
