"""Shamir secret sharing over GF(2^521 - 1)."""

from __future__ import annotations

import itertools
import secrets

import pytest

from laulima.core.privacy.shamir import PRIME, SHARE_BYTES, combine, split
from laulima.errors import ConfigurationError, DataError


def test_every_threshold_subset_reconstructs() -> None:
    secret = secrets.token_bytes(32)
    shares = split(secret, 3, [1, 2, 3, 4, 5])
    assert sorted(shares) == [1, 2, 3, 4, 5]
    assert all(len(share) == SHARE_BYTES for share in shares.values())
    for size in (3, 4, 5):
        for subset in itertools.combinations(shares, size):
            assert combine({x: shares[x] for x in subset}, 3) == secret


def _at_zero(points: dict[int, int]) -> int:
    """Lagrange interpolation at 0 over the field, written out independently of the module."""
    total = 0
    for xi, yi in points.items():
        term = yi
        for xj in points:
            if xj != xi:
                term = term * xj * pow(xj - xi, -1, PRIME) % PRIME
        total = (total + term) % PRIME
    return total


def test_fewer_than_threshold_shares_do_not_give_the_secret() -> None:
    secret = secrets.token_bytes(32)
    shares = split(secret, 3, [1, 2, 3, 4, 5])
    values = {x: int.from_bytes(share, "big") for x, share in shares.items()}
    assert _at_zero({x: values[x] for x in (1, 3, 5)}) == int.from_bytes(secret, "big")
    for subset in itertools.combinations(shares, 2):
        with pytest.raises(DataError, match="needs 3 shares, 2 given"):
            combine({x: shares[x] for x in subset}, 3)
        # the line through two points of the random degree-2 polynomial misses the secret
        assert _at_zero({x: values[x] for x in subset}) != int.from_bytes(secret, "big")
    # and no share is the secret itself or reveals it in its bytes
    assert all(secret not in share for share in shares.values())


def test_secret_edge_values_and_far_xs() -> None:
    for secret in (bytes(32), b"\xff" * 32):
        shares = split(secret, 2, [1, PRIME - 1, 2**300])
        assert combine({PRIME - 1: shares[PRIME - 1], 2**300: shares[2**300]}, 2) == secret


def test_threshold_one_and_fresh_randomness() -> None:
    secret = secrets.token_bytes(32)
    assert combine({7: split(secret, 1, [7, 8])[7]}, 1) == secret
    assert split(secret, 2, [1, 2]) != split(secret, 2, [1, 2])


@pytest.mark.parametrize(
    ("secret", "threshold", "xs", "error", "match"),
    [
        (bytes(31), 2, [1, 2], DataError, "32-byte"),
        (bytes(33), 2, [1, 2], DataError, "32-byte"),
        (bytes(32), 2, [1, 1, 2], ConfigurationError, "distinct"),
        (bytes(32), 2, [0, 1], ConfigurationError, "x values"),
        (bytes(32), 2, [1, PRIME], ConfigurationError, "x values"),
        (bytes(32), 0, [1, 2], ConfigurationError, "threshold"),
        (bytes(32), 3, [1, 2], ConfigurationError, "threshold"),
    ],
)
def test_split_refuses_bad_inputs(
    secret: bytes, threshold: int, xs: list[int], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        split(secret, threshold, xs)


def test_combine_refuses_damaged_shares() -> None:
    shares = split(bytes(32), 2, [1, 2])
    with pytest.raises(DataError, match="66 bytes"):
        combine({1: shares[1][:-1], 2: shares[2]}, 2)
    with pytest.raises(DataError, match="not a field element"):
        combine({1: b"\xff" * SHARE_BYTES, 2: shares[2]}, 2)
    with pytest.raises(ConfigurationError, match="threshold"):
        combine(shares, 0)
