"""The PRG of secure aggregation: a 32-byte seed -> a uint32 mask, AES-256-CTR keystream.

AES in counter mode under a uniformly random key is a standard pseudorandom generator; with the
key used for nothing else, a fixed (all-zero) nonce is safe. The keystream is read as
little-endian uint32 straight into numpy, without Python loops: models of tens of MB are
expanded once per peer per round.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from laulima.errors import ConfigurationError, DataError

__all__ = ["SEED_BYTES", "expand"]

SEED_BYTES = 32
_NONCE = bytes(16)


def expand(seed: bytes, length: int) -> np.ndarray:
    """`length` pseudorandom uint32 values from `seed`, the same for the same seed (a read-only array:
    add it into another one, e.g. ``y += expand(seed, y.size)``)."""
    if not isinstance(seed, bytes | bytearray) or len(seed) != SEED_BYTES:
        raise DataError(f"a PRG seed must be {SEED_BYTES} bytes; the seed given is not one")
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ConfigurationError(f"the mask length must be an integer >= 0, got {length!r}", field="length")
    encryptor = Cipher(algorithms.AES(bytes(seed)), modes.CTR(_NONCE)).encryptor()
    stream = encryptor.update(bytes(4 * length))
    encryptor.finalize()  # CTR buffers nothing: this returns b""
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32, copy=False)
