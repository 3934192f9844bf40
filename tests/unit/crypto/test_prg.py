import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from securefl.crypto.prg import CHUNK, MaskBuffer, derive_seed, expand, keystream_into
from securefl.errors import CryptoError

seeds = st.binary(min_size=32, max_size=32)


@given(seed=seeds, n=st.integers(1, 5000), dtype=st.sampled_from([np.uint32, np.uint64]))
def test_same_seed_same_stream(seed, n, dtype):
    assert np.array_equal(expand(seed, n, dtype), expand(seed, n, dtype))


@given(seed=seeds, n=st.integers(8, 2000))
def test_prefix_property_and_reused_buffer(seed, n):
    """A reused, dirty buffer must give exactly the fresh stream (it is zeroed first)."""
    buf = np.full(n, 0xDEADBEEF, np.uint32)
    keystream_into(seed, buf)
    assert np.array_equal(buf, expand(seed, n, np.uint32))
    assert np.array_equal(expand(seed, n // 2, np.uint32), buf[: n // 2])


@given(key=st.binary(min_size=1, max_size=64), a=st.text(min_size=1, max_size=12),
       b=st.text(min_size=1, max_size=12))
def test_labels_give_independent_seeds(key, a, b):
    a, b = a.replace("|", "_"), b.replace("|", "_")
    if a != b:
        assert derive_seed(key, a) != derive_seed(key, b)
    assert derive_seed(key, a, b"round-1") != derive_seed(key, a, b"round-2")


def test_different_seeds_give_unrelated_streams():
    x = expand(bytes(32), 100_000, np.uint32)
    y = expand(bytes(31) + b"\x01", 100_000, np.uint32)
    assert np.count_nonzero(x == y) < 5


def test_stream_bytes_look_uniform():
    raw = expand(derive_seed(b"k", "test"), 250_000, np.uint32).view(np.uint8)
    counts = np.bincount(raw, minlength=256)
    expected = raw.size / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 400  # 255 degrees of freedom: p < 1e-6 above ~350


def test_known_answer_aes_ctr():
    """Pins the PRG to AES-256-CTR with a zero nonce (the NIST SP 800-38A F.5.5 key)."""
    key = bytes.fromhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    want = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(64))
    assert expand(key, 16, np.uint32).tobytes() == want


def test_mask_buffer_add_then_subtract_is_identity():
    target = np.arange(1000, dtype=np.uint64)
    masks = MaskBuffer(1000, np.uint64)
    masks.add(target, bytes(range(32)))
    assert not np.array_equal(target, np.arange(1000, dtype=np.uint64))
    masks.subtract(target, bytes(range(32)))
    assert np.array_equal(target, np.arange(1000, dtype=np.uint64))


@pytest.mark.parametrize("seed", [b"", bytes(16), bytes(33)])
def test_bad_seed_length(seed):
    with pytest.raises(CryptoError):
        expand(seed, 4, np.uint32)


def test_label_may_not_contain_separator():
    with pytest.raises(CryptoError):
        derive_seed(b"k", "a|b")


@pytest.mark.parametrize("n", [1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5])
@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
def test_chunked_mask_is_exactly_the_whole_stream(n, dtype):
    """``MaskBuffer`` makes the keystream a piece at a time; the mask it adds must be the
    same CTR stream as ``expand`` (else pairwise masks would not cancel)."""
    seed = bytes(range(32))
    target = np.zeros(n, dtype)
    MaskBuffer(n, dtype).add(target, seed)
    assert np.array_equal(target, expand(seed, n, dtype))
    assert MaskBuffer(n, dtype)._scratch.nbytes <= CHUNK * np.dtype(dtype).itemsize
    with pytest.raises(CryptoError):
        MaskBuffer(n, dtype).add(np.zeros(n + 1, dtype), seed)


def test_ring_elements_are_little_endian_words_whatever_the_array_byte_order():
    """A hospital on a big-endian machine must draw the same masks: the keystream is read
    as little-endian words, also into an array of the other byte order."""
    key = bytes.fromhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    ks = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(64))
    words = [int.from_bytes(ks[i:i + 4], "little") for i in range(0, 64, 4)]
    for order in ("<u4", ">u4"):
        out = keystream_into(key, np.empty(16, dtype=order))
        assert [int(v) for v in out] == words
