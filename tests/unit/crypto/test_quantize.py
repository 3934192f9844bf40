import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from securefl.crypto.quantize import Encoding
from securefl.errors import ConfigError, DataError

floats = st.floats(-4.0, 4.0, allow_nan=False, width=32)


@given(
    x=arrays(np.float32, st.integers(1, 64), elements=floats),
    weight=st.integers(1, 10_000),
    ring=st.sampled_from([32, 64]),
)
def test_encode_decode_single_within_bound(x, weight, ring):
    enc = Encoding.auto(ring_bits=ring, clip=1.0, max_clients=100, max_weight=10_000)
    mean, total = enc.decode(enc.encode(x, weight))
    assert total == weight
    clipped = np.clip(x.astype(np.float64), -1.0, 1.0)
    assert np.abs(mean - clipped).max() <= enc.error_bound(1, weight)


@settings(max_examples=50)
@given(
    data=st.data(),
    n=st.integers(1, 12),
    ring=st.sampled_from([32, 64]),
)
def test_sum_of_encodings_decodes_to_weighted_mean(data, n, ring):
    d = data.draw(st.integers(1, 32))
    xs = [data.draw(arrays(np.float32, d, elements=floats)) for _ in range(n)]
    ws = [data.draw(st.integers(1, 5000)) for _ in range(n)]
    enc = Encoding.auto(ring_bits=ring, clip=2.0, max_clients=12, max_weight=5000)
    total = np.zeros(d + 1, enc.dtype)
    for x, w in zip(xs, ws, strict=True):
        total += enc.encode(x, w)  # wraps in the ring, as masked sums do
    mean, weight = enc.decode(total)
    expect = np.average(np.clip(np.stack(xs).astype(np.float64), -2, 2), axis=0, weights=ws)
    assert weight == sum(ws)
    assert np.abs(mean - expect).max() <= enc.error_bound(n, sum(ws))


def test_auto_scale_is_a_power_of_two_and_fits():
    enc = Encoding.auto(max_clients=100, max_weight=10_000)
    assert enc.scale == 2048.0
    assert 100 * 10_000 * (enc.scale + 0.5) < 2**31
    assert 100 * 10_000 * (2 * enc.scale + 0.5) >= 2**31  # the next power would overflow


def test_overflowing_configuration_is_refused_with_the_numbers():
    with pytest.raises(ConfigError) as err:
        Encoding(ring_bits=32, clip=1.0, scale=2**20, max_clients=50, max_weight=1000)
    text = str(err.value)
    for number in ("50 hospitals", "1000 samples", "32-bit", "ring_bits=64"):
        assert number in text


def test_64_bit_ring_accepts_what_32_refuses():
    with pytest.raises(ConfigError):
        Encoding(ring_bits=32, scale=2**16, max_clients=100, max_weight=10_000)
    Encoding(ring_bits=64, scale=2**16, max_clients=100, max_weight=10_000)


def test_no_scale_fits_is_a_config_error():
    with pytest.raises(ConfigError, match="no scale fits"):
        Encoding.auto(ring_bits=32, max_clients=10**5, max_weight=10**5)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_updates_are_refused(bad):
    x = np.zeros(10, np.float32)
    x[3] = bad
    with pytest.raises(DataError, match="NaN or infinite"):
        Encoding().encode(x, 5)


@pytest.mark.parametrize(
    ("update", "weight", "match"),
    [
        (np.zeros((2, 2), np.float32), 1, "flat"),
        (np.zeros(4, np.int32), 1, "floating-point"),
        (np.zeros(4, np.float32), 0, "sample count"),
        (np.zeros(4, np.float32), 10_001, "sample count"),
    ],
)
def test_bad_updates_are_refused(update, weight, match):
    with pytest.raises(DataError, match=match):
        Encoding().encode(update, weight)


def test_clipping_is_applied_before_encoding():
    enc = Encoding(clip=0.5, scale=1024)
    mean, _ = enc.decode(enc.encode(np.array([3.0, -3.0, 0.25], np.float32), 2))
    assert mean.tolist() == [0.5, -0.5, 0.25]


@pytest.mark.parametrize("ring", [32, 64])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_element_of_a_model_sized_update_is_encoded_exactly(ring, dtype):
    # Encoding runs in chunks; every element, across the chunk seams, must be exactly
    # round(weight * clip(x) * scale) in the ring, and the last one the sample count.
    from securefl.crypto.quantize import ENCODE_CHUNK

    d = 3 * ENCODE_CHUNK + 17
    x = np.random.default_rng(3).normal(0, 0.4, d).astype(dtype)
    x[ENCODE_CHUNK - 1 : ENCODE_CHUNK + 1] = [1.7, -0.3]  # one clipped, one not, at a seam
    enc = Encoding.auto(ring_bits=ring, clip=0.9, max_clients=10, max_weight=700)
    y = enc.encode(x, 613)
    expect = np.rint(np.clip(x.astype(np.float64), -0.9, 0.9) * (613.0 * enc.scale))
    assert y.dtype == enc.dtype and y.shape == (d + 1,)
    assert np.array_equal(y[:-1].view(enc.signed_dtype), expect.astype(enc.signed_dtype))
    assert y[-1] == 613
