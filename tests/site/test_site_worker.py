"""The worker's streaming safetensors writer: readable by safetensors, digest of the bytes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from safetensors.numpy import load

from laulima.core.weights import parse_safetensors_header
from laulima.site.worker import write_safetensors


def test_round_trip_of_every_dtype_and_odd_layouts(tmp_path: Path):
    weights = {
        "f64": np.ones((2, 3)),
        "f16": np.arange(5, dtype=np.float16),
        "scalar": np.array(3, dtype=np.int64),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "mask": np.array([True, False]),
        "u8": np.arange(3, dtype=np.uint8),
        "big_endian_strided": np.arange(6, dtype=">f4").reshape(2, 3)[:, ::2],
    }
    path = tmp_path / "result.safetensors"
    digest, size = write_safetensors(path, weights, {"laulima.task": "t-1"})
    data = path.read_bytes()
    assert (hashlib.sha256(data).hexdigest(), len(data)) == (digest, size)
    back = load(data)
    for name, array in weights.items():
        assert back[name].shape == array.shape and np.array_equal(back[name], array), name
    schema, metadata, start = parse_safetensors_header(data)
    assert metadata == {"laulima.task": "t-1"} and start % 8 == 0
    assert [p.name for p in tmp_path.iterdir()] == ["result.safetensors"]
