"""Named weight arrays: the only thing that travels between hub and sites.

Weights are a plain ``dict[str, numpy.ndarray]``; this module serializes them to
safetensors (never pickle), digests them, and checks one set against another's schema.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
from safetensors.numpy import load as _st_load

from laulima.errors import WeightsError

__all__ = [
    "SAFETENSORS_DTYPES",
    "TensorSpec",
    "Weights",
    "WeightsSchema",
    "check_finite",
    "check_matches",
    "from_safetensors",
    "parse_safetensors_header",
    "safetensors_chunks",
    "schema_of",
    "sha256_hex",
    "to_safetensors",
]

Weights = dict[str, np.ndarray]

#: dtypes a weight set may carry; safetensors names on the left.
SAFETENSORS_DTYPES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
_ST_DTYPE_OF: dict[str, str] = {numpy_name: st_name for st_name, numpy_name in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one named array."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


WeightsSchema = dict[str, TensorSpec]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def schema_of(weights: Mapping[str, np.ndarray]) -> WeightsSchema:
    return {k: TensorSpec(tuple(int(d) for d in v.shape), v.dtype.name) for k, v in weights.items()}


def safetensors_chunks(
    weights: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> Iterator[bytes | memoryview]:
    """The safetensors encoding of ``weights``, piece by piece: the header, then each tensor's
    bytes as a view of the array (no copy). Writers stream these to a file or a socket, so
    no second copy of a large model is ever built.

    Deterministic: tensors and metadata keys are sorted, so equal weights and metadata give
    equal bytes and equal digests (``safetensors.numpy.save`` orders metadata at random).
    """
    arrays = {name: _c_contiguous_le(name, weights[name]) for name in sorted(weights)}
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(metadata[k]) for k in sorted(metadata)}
    offset = 0
    for name, array in arrays.items():
        header[name] = {
            "dtype": _ST_DTYPE_OF[array.dtype.name],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # tensor data starts 8-byte aligned
    yield struct.pack("<Q", len(text)) + text
    for array in arrays.values():
        if array.nbytes:
            yield array.reshape(-1).view(np.uint8).data


def to_safetensors(weights: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialize named arrays into one bytes object; ``metadata`` travels in the header."""
    return b"".join(safetensors_chunks(weights, metadata))


def _c_contiguous_le(name: str, array: np.ndarray) -> np.ndarray:
    """Little-endian, C-contiguous, 0-d arrays kept 0-d (``np.ascontiguousarray`` makes them 1-d)."""
    array = np.asarray(array)
    if array.dtype.name not in _ST_DTYPE_OF:
        raise WeightsError(
            f"tensor {name!r} has dtype {array.dtype}, which safetensors cannot carry; "
            f"use one of {sorted(_ST_DTYPE_OF)}",
            where=name,
        )
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array if array.flags.c_contiguous else array.copy(order="C")


def from_safetensors(data: bytes, *, where: str = "weights") -> Weights:
    """Deserialize safetensors bytes; malformed input raises ``WeightsError`` naming ``where``."""
    try:
        return dict(_st_load(data))
    except Exception as exc:  # safetensors raises its own SafetensorError and ValueErrors
        raise WeightsError(
            f"{where}: not a valid safetensors file ({exc}); send weights serialized "
            "with laulima.core.weights.to_safetensors",
            where=where,
        ) from exc


def parse_safetensors_header(head: bytes, *, where: str = "weights") -> tuple[WeightsSchema, dict[str, str], int]:
    """Read the schema and metadata from the first bytes of a safetensors file.

    Returns ``(schema, metadata, data_start)``. ``head`` must hold at least the 8-byte
    length and the JSON header. Lets the hub refuse a wrong upload before storing its body.
    """
    if len(head) < 8:
        raise WeightsError(f"{where}: truncated safetensors header", where=where)
    (n,) = struct.unpack("<Q", head[:8])
    if n > 100_000_000:
        raise WeightsError(f"{where}: safetensors header of {n} bytes is implausible", where=where)
    if len(head) < 8 + n:
        raise WeightsError(f"{where}: truncated safetensors header", where=where)
    try:
        header = json.loads(head[8 : 8 + n])
    except ValueError as exc:
        raise WeightsError(f"{where}: safetensors header is not JSON ({exc})", where=where) from exc
    if not isinstance(header, dict):
        raise WeightsError(f"{where}: safetensors header is not an object", where=where)
    metadata = header.pop("__metadata__", None) or {}
    schema: WeightsSchema = {}
    for name, info in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise WeightsError(
                f"{where}: tensor {name!r} has an unsupported or malformed entry {info!r}",
                where=where,
            ) from exc
        schema[name] = TensorSpec(shape, dtype)
    return schema, {str(k): str(v) for k, v in metadata.items()}, 8 + n


def check_matches(expected: WeightsSchema, actual: WeightsSchema, *, where: str = "update") -> None:
    """Refuse ``actual`` unless it has exactly ``expected``'s keys, shapes and dtypes."""
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {_first(missing)}")
        if extra:
            parts.append(f"unexpected {_first(extra)}")
        raise WeightsError(f"{where}: keys differ from the global model: {'; '.join(parts)}", where=where)
    for name, spec in expected.items():
        got = actual[name]
        if got.shape != spec.shape:
            raise WeightsError(
                f"{where}: tensor {name!r} has shape {list(got.shape)}, expected {list(spec.shape)}",
                where=where,
            )
        if got.dtype != spec.dtype:
            raise WeightsError(
                f"{where}: tensor {name!r} has dtype {got.dtype}, expected {spec.dtype}",
                where=where,
            )


def check_finite(name: str, array: np.ndarray, *, where: str = "update") -> None:
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = "NaN" if np.isnan(array).any() else "Inf"
        raise WeightsError(f"{where}: tensor {name!r} contains {bad} values", where=where)


def _first(names: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")
