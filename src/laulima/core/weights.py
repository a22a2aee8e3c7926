"""Named weight arrays: the only thing that travels between hub and sites.

Weights are a plain ``dict[str, numpy.ndarray]``; this module serializes them to
safetensors (never pickle), digests them, and checks one set against another's schema.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
from safetensors.numpy import load as _st_load

from laulima.errors import WeightsError

__all__ = [
    "MAX_TENSOR_DIMS",
    "MAX_TENSOR_NAME",
    "SAFETENSORS_DTYPES",
    "SAFETENSORS_HEADER_MAX",
    "SafetensorsHeader",
    "TensorSpec",
    "Weights",
    "WeightsSchema",
    "check_finite",
    "check_matches",
    "check_weights_finite",
    "from_safetensors",
    "parse_safetensors_header",
    "read_safetensors_header",
    "safetensors_header_length",
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

SAFETENSORS_HEADER_MAX = 16 * 1024 * 1024
"""Largest JSON header of any safetensors file Laulima reads. A 3D U-Net's is a few KiB; a
header is parsed whole into Python objects (about 20x its size), so this bounds that cost."""

MAX_TENSOR_DIMS = 16
"""Most dimensions a tensor may have (models use at most 5 or 6)."""

MAX_TENSOR_NAME = 1024
"""Longest tensor name, in characters."""

_INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one named array."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize  # exact: no int64 wrap-around


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


@dataclass(frozen=True)
class SafetensorsHeader:
    """Everything the JSON header of a safetensors file says, checked, from one parse."""

    schema: WeightsSchema
    metadata: dict[str, str]
    offsets: dict[str, tuple[int, int]]
    """Each tensor's ``[begin, end)`` in the data section (relative to ``data_start``)."""
    data_start: int
    """File offset of the data section: 8 + the header's length."""


def safetensors_header_length(
    head: bytes, *, where: str = "weights", limit: int = SAFETENSORS_HEADER_MAX, limit_reason: str | None = None
) -> int:
    """The JSON header's length, from the file's first 8 bytes; refused above ``limit``
    (``limit_reason`` says where that limit comes from) before a byte of it is read."""
    if len(head) < 8:
        raise WeightsError(f"{where}: truncated safetensors header; not a valid safetensors file", where=where)
    (n,) = struct.unpack("<Q", head[:8])
    limit = min(limit, SAFETENSORS_HEADER_MAX)
    if n > limit:
        why = f" ({limit_reason})" if limit_reason else ""
        raise WeightsError(
            f"{where}: safetensors header of {n} bytes is above the limit of {limit} bytes{why}; "
            "send weights serialized with laulima.core.weights.to_safetensors",
            where=where,
        )
    return int(n)


def read_safetensors_header(
    head: bytes, *, where: str = "weights", limit: int = SAFETENSORS_HEADER_MAX, limit_reason: str | None = None
) -> SafetensorsHeader:
    """Parse and check the header at the start of ``head`` (8-byte length + JSON).

    Refuses, with ``WeightsError`` naming ``where`` and the entry: a header above ``limit``,
    JSON nested too deeply, ``__metadata__`` that is not a table of strings, tensor names
    longer than MAX_TENSOR_NAME, unknown dtypes, shapes with more than MAX_TENSOR_DIMS
    dimensions or dimensions outside int64, byte sizes beyond int64, ``data_offsets`` that
    are not two integers spanning exactly the tensor's bytes. Offsets are not compared with
    the file's size here: the caller knows it.
    """
    n = safetensors_header_length(head, where=where, limit=limit, limit_reason=limit_reason)
    if len(head) < 8 + n:
        raise WeightsError(f"{where}: truncated safetensors header; not a valid safetensors file", where=where)
    try:
        header = json.loads(head[8 : 8 + n])
    except RecursionError:
        raise WeightsError(
            f"{where}: safetensors header is nested too deeply; not a valid safetensors file", where=where
        ) from None
    except ValueError as exc:  # also UnicodeDecodeError
        raise WeightsError(f"{where}: safetensors header is not JSON ({exc})", where=where) from exc
    if not isinstance(header, dict):
        raise WeightsError(f"{where}: safetensors header is not an object", where=where)
    metadata = _header_metadata(header.pop("__metadata__", None), where)
    schema: WeightsSchema = {}
    offsets: dict[str, tuple[int, int]] = {}
    for name, info in header.items():
        schema[name], offsets[name] = _header_entry(name, info, where)
    return SafetensorsHeader(schema, metadata, offsets, 8 + n)


def parse_safetensors_header(head: bytes, *, where: str = "weights") -> tuple[WeightsSchema, dict[str, str], int]:
    """Read the schema and metadata from the first bytes of a safetensors file.

    Returns ``(schema, metadata, data_start)``. ``head`` must hold at least the 8-byte
    length and the JSON header. Lets the hub refuse a wrong upload before storing its body.
    Checked as :func:`read_safetensors_header` describes.
    """
    header = read_safetensors_header(head, where=where)
    return header.schema, header.metadata, header.data_start


def _header_metadata(raw: object, where: str) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise WeightsError(
            f"{where}: safetensors '__metadata__' must be an object of strings, got {_shown(raw)}", where=where
        )
    return dict(raw)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= _INT64_MAX


def _header_entry(name: str, info: object, where: str) -> tuple[TensorSpec, tuple[int, int]]:
    """One tensor's entry of a safetensors header, checked: its spec and its data offsets."""
    if not 1 <= len(name) <= MAX_TENSOR_NAME:
        raise WeightsError(
            f"{where}: tensor name {name[:60]!r}... is {len(name)} characters; at most {MAX_TENSOR_NAME} are accepted"
            if name
            else f"{where}: a tensor has an empty name",
            where=where,
        )

    def bad(what: str) -> WeightsError:
        return WeightsError(f"{where}: tensor {name!r} {what}; not a valid safetensors file", where=where)

    if not isinstance(info, dict):
        raise bad(f"has entry {_shown(info)}, not an object with dtype, shape and data_offsets")
    extra = sorted(set(info) - {"dtype", "shape", "data_offsets"})
    if extra:
        raise bad(f"has unknown entry field(s) {', '.join(map(repr, extra[:5]))}")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
    if missing:
        raise bad(f"has no {' and no '.join(missing)}")
    dtype, shape, span = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise WeightsError(
            f"{where}: tensor {name!r} has an unsupported dtype {_shown(dtype)}; "
            f"supported are {', '.join(SAFETENSORS_DTYPES)}",
            where=where,
        )
    if not isinstance(shape, list) or len(shape) > MAX_TENSOR_DIMS or not all(_is_int(d) for d in shape):
        raise bad(
            f"has shape {_shown(shape)}; a shape is a list of at most {MAX_TENSOR_DIMS} non-negative 64-bit integers"
        )
    spec = TensorSpec(tuple(shape), SAFETENSORS_DTYPES[dtype])
    nbytes = spec.nbytes
    if nbytes > _INT64_MAX:
        raise bad(f"has shape {shape}, {nbytes} bytes of {dtype}: beyond any file")
    if not isinstance(span, list) or len(span) != 2 or not all(_is_int(x) for x in span):
        raise bad(f"has data_offsets {_shown(span)}; expected two non-negative integers [begin, end]")
    begin, end = span
    if end - begin != nbytes:
        raise bad(f"has data_offsets [{begin}, {end}), which do not hold its {nbytes} bytes of shape {shape}")
    return spec, (begin, end)


def _shown(value: object, limit: int = 80) -> str:
    """A short description of a header value for an error message (it may be huge or deep)."""
    if isinstance(value, dict | list):
        return f"a {type(value).__name__} of {len(value)} entries" if len(value) > 8 else _short_repr(value, limit)
    return _short_repr(value, limit)


def _short_repr(value: object, limit: int) -> str:
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # deeply nested, or an int too long to print
        return f"a {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_weights_finite(weights: Mapping[str, np.ndarray], *, where: str = "aggregate") -> None:
    """Refuse ``weights`` if any float tensor holds NaN or Inf, naming the first such tensor.

    For a freshly aggregated model: the strategies cannot overflow on finite float16/float32
    inputs (they accumulate in float64), but a float64 model near its range, or a bug, still
    could, and a non-finite global model must never be checkpointed. Reads each tensor in
    pieces, so it needs no second copy of a large tensor.
    """
    for name, array in weights.items():
        array = np.asarray(array)
        if array.dtype.kind != "f":
            continue
        flat = array.reshape(-1)
        for start in range(0, flat.size, _FINITE_CHUNK):
            check_finite(name, flat[start : start + _FINITE_CHUNK], where=where)


_FINITE_CHUNK = 1 << 20


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
