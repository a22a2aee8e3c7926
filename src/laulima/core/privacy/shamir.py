"""Shamir secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

A secret is the constant term of a random polynomial of degree ``threshold - 1``; share x is the
polynomial's value at x. Any `threshold` shares give the secret back (Lagrange interpolation at
0); fewer reveal nothing about it (every secret is equally consistent with them). The Mersenne
prime 2^521 - 1 exceeds every 32-byte value, so a secret is one field element.

Wire layout of a share: the value as 66 bytes, big-endian (ceil(521 / 8) = 66). The x of a
share is not encoded; it is the key of the mapping the caller keeps.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

from laulima.errors import ConfigurationError, DataError

__all__ = [
    "PRIME",
    "SECRET_BYTES",
    "SHARE_BYTES",
    "combine",
    "split",
]

PRIME = 2**521 - 1
SECRET_BYTES = 32
SHARE_BYTES = 66


def split(secret: bytes, threshold: int, xs: Sequence[int]) -> dict[int, bytes]:
    """Shares of `secret`, one per x in `xs`, any `threshold` of which reconstruct it."""
    if not isinstance(secret, bytes | bytearray) or len(secret) != SECRET_BYTES:
        raise DataError(
            f"Shamir split takes a {SECRET_BYTES}-byte secret, got "
            f"{len(secret) if isinstance(secret, bytes | bytearray) else type(secret).__name__}; "
            "share a 32-byte seed or key",
        )
    xs = list(xs)
    for x in xs:
        if isinstance(x, bool) or not isinstance(x, int) or not 1 <= x < PRIME:
            raise ConfigurationError(
                f"Shamir x values must be integers in [1, 2^521 - 1), got {x!r}; number the holders from 1",
                field="xs",
            )
    if len(set(xs)) != len(xs):
        raise ConfigurationError("Shamir x values must be distinct; give each holder its own x", field="xs")
    if isinstance(threshold, bool) or not isinstance(threshold, int) or not 1 <= threshold <= len(xs):
        raise ConfigurationError(
            f"the Shamir threshold must be between 1 and the {len(xs)} holders, got {threshold!r}",
            field="threshold",
        )
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares: dict[int, bytes] = {}
    for x in xs:
        value = 0
        for coefficient in reversed(coefficients):  # Horner
            value = (value * x + coefficient) % PRIME
        shares[x] = value.to_bytes(SHARE_BYTES, "big")
    return shares


def combine(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """The 32-byte secret from the first `threshold` of `shares` (x -> share)."""
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise ConfigurationError(f"the Shamir threshold must be an integer >= 1, got {threshold!r}", field="threshold")
    if len(shares) < threshold:
        raise DataError(
            f"Shamir reconstruction needs {threshold} shares, {len(shares)} given; collect shares from more holders",
        )
    points: list[tuple[int, int]] = []
    for x, share in list(shares.items())[:threshold]:
        if isinstance(x, bool) or not isinstance(x, int) or not 1 <= x < PRIME:
            raise DataError(f"Shamir share x must be an integer in [1, 2^521 - 1), got {x!r}")
        if not isinstance(share, bytes | bytearray) or len(share) != SHARE_BYTES:
            raise DataError(f"Shamir share {x} must be {SHARE_BYTES} bytes; it was damaged or is not a share")
        value = int.from_bytes(share, "big")
        if value >= PRIME:
            raise DataError(f"Shamir share {x} is not a field element; it was damaged or is not a share")
        points.append((x, value))
    secret = 0
    for i, (xi, yi) in enumerate(points):
        numerator, denominator = 1, 1
        for j, (xj, _) in enumerate(points):
            if j != i:
                numerator = numerator * xj % PRIME
                denominator = denominator * (xj - xi) % PRIME
        secret = (secret + yi * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >= 2 ** (8 * SECRET_BYTES):
        raise DataError(
            "Shamir reconstruction gave a value longer than 32 bytes: the shares do not belong to one secret"
        )
    return secret.to_bytes(SECRET_BYTES, "big")
