import itertools
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securefl.crypto import shamir
from securefl.errors import CryptoError


@settings(max_examples=40, deadline=None)
@given(secret=st.binary(min_size=32, max_size=32), n=st.integers(1, 7), data=st.data())
def test_every_t_subset_reconstructs_and_t_minus_1_fails(secret, n, data):
    t = data.draw(st.integers(1, n))
    xs = data.draw(st.permutations(range(1, 50)))[:n]
    shares = shamir.split(secret, xs, t)
    for subset in itertools.combinations(xs, t):
        assert shamir.reconstruct({x: shares[x] for x in subset}, t) == secret
    if t > 1:
        for subset in itertools.combinations(xs, t - 1):
            with pytest.raises(CryptoError, match="needs"):
                shamir.reconstruct({x: shares[x] for x in subset}, t)


@given(secret=st.binary(min_size=32, max_size=32), other=st.binary(min_size=32, max_size=32))
def test_t_minus_1_shares_are_consistent_with_any_secret(secret, other):
    """Perfect secrecy, checked constructively: some polynomial through the t-1 known
    shares also passes through any other secret, so they say nothing about it."""
    t = 3
    shares = shamir.split(secret, [1, 2, 3], t)
    known = {1: shares[1], 2: shares[2]}
    # Choose f(3) so that f(0) = other: solve with Lagrange at x = 3.
    l0, l1, l2 = shamir._lagrange_at_zero((1, 2, 3))
    target = int.from_bytes(other, "big")
    y3 = (target - l0 * known[1] - l1 * known[2]) * pow(l2, -1, shamir.PRIME) % shamir.PRIME
    assert shamir.reconstruct({**known, 3: y3}, t) == other


def test_a_tampered_share_changes_the_result_or_is_caught():
    secret = os.urandom(32)
    shares = shamir.split(secret, range(1, 6), 3)
    shares[2] = (shares[2] + 1) % shamir.PRIME
    try:
        assert shamir.reconstruct({x: shares[x] for x in (1, 2, 3)}, 3) != secret
    except CryptoError as err:
        assert "inconsistent" in str(err)


def test_share_bytes_round_trip_and_range():
    value = shamir.PRIME - 1
    assert shamir.share_from_bytes(shamir.share_to_bytes(value)) == value
    with pytest.raises(CryptoError, match="outside the field"):
        shamir.share_from_bytes(shamir.PRIME.to_bytes(33, "big"))
    with pytest.raises(CryptoError, match="33 bytes"):
        shamir.share_from_bytes(bytes(32))


@pytest.mark.parametrize(
    ("xs", "t", "secret"),
    [([0, 1, 2], 2, bytes(32)), ([1, 1, 2], 2, bytes(32)), ([1, 2], 3, bytes(32)),
     ([1, 2], 2, bytes(31))],
)
def test_bad_split_arguments(xs, t, secret):
    with pytest.raises(CryptoError):
        shamir.split(secret, xs, t)


def test_prime_is_prime_and_above_two_to_the_256():
    """Miller-Rabin with fixed bases: the field must really be a field."""
    p = shamir.PRIME
    assert p > 2**256
    d, s = p - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41):
        x = pow(a, d, p)
        if x in (1, p - 1):
            continue
        for _ in range(s - 1):
            x = pow(x, 2, p)
            if x == p - 1:
                break
        else:
            pytest.fail(f"{a} witnesses that the prime is composite")
