"""Named weight arrays: safetensors round trips, digests, header parsing and schema checks."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from laulima.core.weights import (
    MAX_TENSOR_DIMS,
    MAX_TENSOR_NAME,
    SAFETENSORS_HEADER_MAX,
    TensorSpec,
    check_finite,
    check_matches,
    check_weights_finite,
    from_safetensors,
    parse_safetensors_header,
    read_safetensors_header,
    safetensors_chunks,
    schema_of,
    sha256_hex,
    to_safetensors,
)
from laulima.errors import DataError, WeightsError


@pytest.fixture
def weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "conv.weight": rng.standard_normal((4, 2, 3, 3)).astype(np.float32),
        "conv.bias": rng.standard_normal(4).astype(np.float16),
        "bn.num_batches_tracked": np.array(17, np.int64),
        "mask": np.array([True, False, True]),
        "empty": np.zeros((0, 3), np.float32),
    }


# --------------------------------------------------------------------------- round trip


def test_round_trip_keeps_values_dtypes_and_shapes(weights: dict[str, np.ndarray]) -> None:
    back = from_safetensors(to_safetensors(weights))
    assert set(back) == set(weights)
    for key, array in weights.items():
        assert back[key].dtype == array.dtype, key
        assert back[key].shape == array.shape, key  # 0-d stays 0-d
        np.testing.assert_array_equal(back[key], array)


def test_round_trip_of_non_contiguous_arrays() -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    back = from_safetensors(to_safetensors({"t": a.T, "s": a[:, ::2]}))
    np.testing.assert_array_equal(back["t"], a.T)
    np.testing.assert_array_equal(back["s"], a[:, ::2])


def test_metadata_travels_in_the_header(weights: dict[str, np.ndarray]) -> None:
    data = to_safetensors(weights, {"laulima.n_samples": "42", "laulima.task": "t-1"})
    schema, metadata, start = parse_safetensors_header(data)
    assert metadata == {"laulima.n_samples": "42", "laulima.task": "t-1"}
    assert schema == schema_of(weights)
    assert start == 8 + struct.unpack("<Q", data[:8])[0]
    assert len(data) - start == sum(a.nbytes for a in weights.values())
    np.testing.assert_array_equal(from_safetensors(data)["conv.weight"], weights["conv.weight"])


def test_no_metadata_means_empty_metadata(weights: dict[str, np.ndarray]) -> None:
    assert parse_safetensors_header(to_safetensors(weights))[1] == {}


def test_from_safetensors_refuses_garbage() -> None:
    with pytest.raises(WeightsError, match=r"^blob 7: not a valid safetensors file") as info:
        from_safetensors(b"\x00garbage" * 3, where="blob 7")
    assert "to_safetensors" in str(info.value)
    assert isinstance(info.value, DataError)
    assert info.value.context == {"where": "blob 7"}


def test_from_safetensors_refuses_truncated_body(weights: dict[str, np.ndarray]) -> None:
    data = to_safetensors(weights)
    with pytest.raises(WeightsError, match="not a valid safetensors file"):
        from_safetensors(data[:-5])


# --------------------------------------------------------------------------- digests


def test_digest_is_stable_and_independent_of_key_order(weights: dict[str, np.ndarray]) -> None:
    digest = sha256_hex(to_safetensors(weights))
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert sha256_hex(to_safetensors(weights)) == digest
    reordered = dict(reversed(list(weights.items())))
    assert sha256_hex(to_safetensors(reordered)) == digest
    copied = {k: a.copy() for k, a in weights.items()}
    assert sha256_hex(to_safetensors(copied)) == digest
    one_key = {"laulima.task": "t-1"}
    assert sha256_hex(to_safetensors(weights, one_key)) == sha256_hex(to_safetensors(weights, one_key))


def test_digest_changes_with_any_value(weights: dict[str, np.ndarray]) -> None:
    digest = sha256_hex(to_safetensors(weights))
    changed = {k: a.copy() for k, a in weights.items()}
    changed["conv.weight"][0, 0, 0, 0] += 1
    assert sha256_hex(to_safetensors(changed)) != digest
    assert sha256_hex(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


# --------------------------------------------------------------------------- header parsing


def header_bytes(header: object, *, length: int | None = None) -> bytes:
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body) if length is None else length) + body


def test_parse_header_from_the_first_bytes_only(weights: dict[str, np.ndarray]) -> None:
    data = to_safetensors(weights)
    n = struct.unpack("<Q", data[:8])[0]
    schema, _, start = parse_safetensors_header(data[: 8 + n])  # no tensor bytes needed
    assert start == 8 + n
    assert schema["bn.num_batches_tracked"] == TensorSpec((), "int64")
    assert schema["conv.bias"] == TensorSpec((4,), "float16")
    assert schema["mask"] == TensorSpec((3,), "bool")


@pytest.mark.parametrize(
    ("head", "message"),
    [
        (b"", "truncated safetensors header"),
        (b"\x10\x00\x00", "truncated safetensors header"),
        (struct.pack("<Q", 500) + b"{}", "truncated safetensors header"),
        (struct.pack("<Q", 2**40), "header of 1099511627776 bytes is above the limit of 16777216 bytes"),
        (struct.pack("<Q", 5) + b"nope!", "safetensors header is not JSON"),
        (header_bytes([1, 2]), "safetensors header is not an object"),
        (header_bytes({"w": {"dtype": "F8", "shape": [2], "data_offsets": [0, 2]}}), "tensor 'w' has an unsupported"),
        (header_bytes({"w": {"shape": [2]}}), "tensor 'w' has no dtype and no data_offsets"),
        (header_bytes({"w": {"dtype": "F32", "shape": ["x"], "data_offsets": [0, 4]}}), "tensor 'w' has shape"),
        (header_bytes({"w": "F32"}), "tensor 'w' has entry 'F32', not an object"),
    ],
)
def test_parse_header_refuses_truncated_or_garbage_input(head: bytes, message: str) -> None:
    with pytest.raises(WeightsError, match=rf"^upload from site-a: .*{message}") as info:
        parse_safetensors_header(head, where="upload from site-a")
    assert info.value.context == {"where": "upload from site-a"}


def test_parse_header_of_truncated_real_file(weights: dict[str, np.ndarray]) -> None:
    data = to_safetensors(weights)
    for cut in (0, 7, 8, 20):
        with pytest.raises(WeightsError, match="truncated"):
            parse_safetensors_header(data[:cut])


# --------------------------------------------------------------------------- schema checks


def test_check_matches_accepts_equal_schema(weights: dict[str, np.ndarray]) -> None:
    check_matches(schema_of(weights), schema_of({k: a.copy() for k, a in weights.items()}))


def test_check_matches_names_missing_and_unexpected_keys(weights: dict[str, np.ndarray]) -> None:
    expected = schema_of(weights)
    actual = {k: v for k, v in expected.items() if k != "mask"} | {"extra": TensorSpec((1,), "float32")}
    with pytest.raises(
        WeightsError, match=r"^site b: keys differ from the global model: missing 'mask'; unexpected 'extra'$"
    ):
        check_matches(expected, actual, where="site b")


def test_check_matches_shortens_long_key_lists() -> None:
    expected = {f"k{i}": TensorSpec((1,), "float32") for i in range(8)}
    with pytest.raises(WeightsError, match=r"missing 'k0', 'k1', 'k2', 'k3', 'k4' and 3 more"):
        check_matches(expected, {})


def test_check_matches_names_shape_and_dtype(weights: dict[str, np.ndarray]) -> None:
    expected = schema_of(weights)
    with pytest.raises(WeightsError, match=r"^update: tensor 'conv.bias' has shape \[5\], expected \[4\]$"):
        check_matches(expected, expected | {"conv.bias": TensorSpec((5,), "float16")})
    with pytest.raises(WeightsError, match=r"tensor 'conv.bias' has dtype float32, expected float16"):
        check_matches(expected, expected | {"conv.bias": TensorSpec((4,), "float32")})
    with pytest.raises(WeightsError, match=r"tensor 'bn.num_batches_tracked' has shape \[1\], expected \[\]"):
        check_matches(expected, expected | {"bn.num_batches_tracked": TensorSpec((1,), "int64")})


def test_tensor_spec_nbytes() -> None:
    assert TensorSpec((4, 2, 3), "float16").nbytes == 48
    assert TensorSpec((), "int64").nbytes == 8
    assert TensorSpec((0, 3), "float32").nbytes == 0


# --------------------------------------------------------------------------- finite values


@pytest.mark.parametrize(("bad", "word"), [(np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "Inf")])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_check_finite_refuses_nan_and_inf(bad: float, word: str, dtype: type) -> None:
    array: np.ndarray = np.ones(5, dtype)
    array[3] = bad
    with pytest.raises(WeightsError, match=rf"^upload x: tensor 'w' contains {word} values$"):
        check_finite("w", array, where="upload x")


def test_check_finite_prefers_nan_when_both() -> None:
    with pytest.raises(WeightsError, match="contains NaN"):
        check_finite("w", np.array([np.inf, np.nan]))


def test_check_finite_accepts_finite_and_integer_arrays() -> None:
    check_finite("w", np.array([0.0, -1e30, 1e-40], np.float32))
    check_finite("n", np.array([2**62], np.int64))
    check_finite("m", np.array([True]))
    check_finite("e", np.zeros(0, np.float32))


def test_serialization_is_deterministic_with_several_metadata_keys():
    weights = {"b": np.arange(3, dtype=np.float32), "a": np.ones((2, 2), dtype=np.float16)}
    meta = {"laulima.task": "t1", "laulima.n_samples": "4", "laulima.metrics": '{"loss": 1.0}'}
    digests = {sha256_hex(to_safetensors(weights, dict(reversed(list(meta.items()))))) for _ in range(10)}
    digests.add(sha256_hex(to_safetensors(weights, meta)))
    assert len(digests) == 1


def test_streamed_chunks_equal_the_whole_encoding_and_load_with_safetensors():
    from safetensors.numpy import load

    weights = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "n": np.array(7, dtype=np.int64)}
    chunks = list(safetensors_chunks(weights, {"k": "v"}))
    assert b"".join(bytes(c) for c in chunks) == to_safetensors(weights, {"k": "v"})
    loaded = load(b"".join(bytes(c) for c in chunks))
    assert loaded["n"].shape == () and int(loaded["n"]) == 7
    np.testing.assert_array_equal(loaded["w"], weights["w"])


def test_big_endian_arrays_are_written_little_endian():
    weights = {"w": np.arange(4, dtype=">f4")}
    back = from_safetensors(to_safetensors(weights))
    np.testing.assert_array_equal(back["w"], np.arange(4, dtype=np.float32))


# --------------------------------------------------------------------------- hostile headers


def entry(shape: object = (2,), dtype: object = "F32", offsets: object = None) -> dict[str, object]:
    """A header entry; offsets default to what a float32 tensor of ``shape`` needs."""
    if offsets is None:
        offsets = [0, 4 * int(np.prod(shape))] if isinstance(shape, tuple) else [0, 8]
    return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape, "data_offsets": offsets}


def raw_header(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


HOSTILE_HEADERS = {
    "metadata is a list": (header_bytes({"__metadata__": [1, 2], "w": entry()}), "'__metadata__' must be an object"),
    "metadata is a number": (header_bytes({"__metadata__": 5, "w": entry()}), "'__metadata__' must be an object"),
    "metadata value not a string": (
        header_bytes({"__metadata__": {"laulima.n_samples": 5}, "w": entry()}),
        "'__metadata__' must be an object of strings",
    ),
    "nested 3000 deep": (
        raw_header(b'{"x":' + b"[" * 3000 + b"]" * 3000 + b"}"),
        "safetensors header is nested too deeply",
    ),
    "dimension beyond int64": (header_bytes({"w": entry(shape=[2**64], offsets=[0, 8])}), "tensor 'w' has shape"),
    "negative dimension": (header_bytes({"w": entry(shape=[-2], offsets=[0, 8])}), "non-negative 64-bit integers"),
    "too many dimensions": (
        header_bytes({"w": entry(shape=(1,) * (MAX_TENSOR_DIMS + 1))}),
        f"a list of at most {MAX_TENSOR_DIMS}",
    ),
    "boolean dimension": (header_bytes({"w": entry(shape=[True], offsets=[0, 4])}), "tensor 'w' has shape"),
    "float dimension": (header_bytes({"w": entry(shape=[2.0], offsets=[0, 8])}), "tensor 'w' has shape"),
    "byte size beyond int64": (
        header_bytes({"w": entry(shape=[2**62, 2**62], offsets=[0, 8])}),
        "bytes of F32: beyond any file",
    ),
    "dtype not a string": (header_bytes({"w": entry(dtype=["F32"])}), "tensor 'w' has an unsupported dtype ['F32']"),
    "offsets of one int": (header_bytes({"w": entry(offsets=[8])}), "expected two non-negative integers"),
    "offsets of three ints": (header_bytes({"w": entry(offsets=[0, 8, 16])}), "expected two non-negative integers"),
    "offsets as strings": (header_bytes({"w": entry(offsets=["0", "8"])}), "expected two non-negative integers"),
    "offsets as floats": (header_bytes({"w": entry(offsets=[0.0, 8.0])}), "expected two non-negative integers"),
    "negative offsets": (header_bytes({"w": entry(offsets=[-8, 0])}), "expected two non-negative integers"),
    "offsets not the tensor's size": (header_bytes({"w": entry(offsets=[0, 12])}), "do not hold its 8 bytes"),
    "name too long": (header_bytes({"n" * (MAX_TENSOR_NAME + 1): entry()}), f"at most {MAX_TENSOR_NAME} are accepted"),
    "empty name": (header_bytes({"": entry()}), "a tensor has an empty name"),
    "entry with extra fields": (
        header_bytes({"w": {**entry(), "pickle": "..."}}),
        "tensor 'w' has unknown entry field(s) 'pickle'",
    ),
    "not UTF-8": (raw_header(b"\xff\xfe{}"), "safetensors header is not JSON"),
    "huge integer": (raw_header(b'{"w":' + b"9" * 5000 + b"}"), "safetensors header is not JSON"),
}


@pytest.mark.parametrize("case", list(HOSTILE_HEADERS))
def test_hostile_headers_are_weights_errors(case: str) -> None:
    head, message = HOSTILE_HEADERS[case]
    with pytest.raises(WeightsError) as info:
        parse_safetensors_header(head, where="update for task t")
    assert str(info.value).startswith("update for task t: ")
    assert message in str(info.value)


def test_a_valid_header_passes_every_check() -> None:
    head = header_bytes(
        {"__metadata__": {"k": "v"}, "w": entry(shape=(2, 3)), "e": entry(shape=(0,), offsets=[24, 24])}
    )
    header = read_safetensors_header(head)
    assert header.schema == {"w": TensorSpec((2, 3), "float32"), "e": TensorSpec((0,), "float32")}
    assert header.offsets == {"w": (0, 24), "e": (24, 24)}
    assert header.metadata == {"k": "v"}
    assert header.data_start == len(head)


def test_null_metadata_is_no_metadata() -> None:
    assert read_safetensors_header(header_bytes({"__metadata__": None, "w": entry()})).metadata == {}


def test_header_length_is_capped_before_the_header_is_needed() -> None:
    # Only the 8-byte length is given: the limit is applied before any of the header is read.
    with pytest.raises(WeightsError, match=rf"header of {SAFETENSORS_HEADER_MAX + 1} bytes is above the limit"):
        parse_safetensors_header(struct.pack("<Q", SAFETENSORS_HEADER_MAX + 1))
    head = header_bytes({"w": entry()})
    with pytest.raises(WeightsError, match=r"above the limit of 10 bytes \(the global model's is 2\)"):
        read_safetensors_header(head, where="u", limit=10, limit_reason="the global model's is 2")
    assert read_safetensors_header(head, limit=len(head) - 8).schema == {"w": TensorSpec((2,), "float32")}


def test_tensor_spec_nbytes_is_exact_for_huge_shapes() -> None:
    assert TensorSpec((2**40, 2**40), "float64").nbytes == 2**83  # np.prod(..., int64) wrapped to 0


# --------------------------------------------------------------------------- aggregates


def test_check_weights_finite_names_the_tensor() -> None:
    good = {"a": np.ones((3, 3), np.float32), "n": np.array(5, np.int64), "h": np.zeros(2, np.float16)}
    check_weights_finite(good)
    big = np.zeros((3, 1 << 20), np.float32)
    big[2, -1] = np.inf  # in the last piece checked
    with pytest.raises(WeightsError, match=r"^aggregate of round 3: tensor 'big' contains Inf values"):
        check_weights_finite({**good, "big": big}, where="aggregate of round 3")
    with pytest.raises(WeightsError, match=r"tensor 'x' contains NaN"):
        check_weights_finite({"x": np.array(np.nan)})
