"""Preprocessed nnU-Net cases in the site's cache without pickle: blosc2 arrays and JSON properties.

nnU-Net's own ``run_case_save`` and dataset classes keep each case's properties as a pickle
(``write_pickle`` / ``load_pickle``). The cache is shared by every task of an experiment, so a
pickle there would run whatever a poisoned cache holds when a later task loads it. Here a
case is ``<case>.b2nd`` and ``<case>_seg.b2nd`` written exactly as
``nnUNetDatasetBlosc2.save_case`` writes them (same chunks, blocks, codec and filter choice),
and ``properties/<case>.json``: the properties in a tagged JSON form that loses nothing of
what nnU-Net puts there (:func:`encode_properties`). The JSON lies in a subfolder so that the
data folder holds only ``.b2nd`` files: nnU-Net's ``infer_dataset_class`` then still picks
its blosc2 class, which :class:`JsonPropertiesDataset` replaces in the trainer.

This module imports nnunetv2 and blosc2: import it inside the functions that need it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import blosc2
import numpy as np
from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2

from laulima.errors import DataError

__all__ = [
    "PROPERTIES_FOLDER",
    "JsonPropertiesDataset",
    "decode_properties",
    "encode_properties",
    "properties_path",
    "read_properties",
    "save_case",
    "write_properties",
]

PROPERTIES_FOLDER = "properties"
"""``<data folder>/properties/<case>.json``: a subfolder, so the data folder keeps nnU-Net's file endings."""

_DTYPES = frozenset(
    ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32", "float64"]
)
_KINDS = {"b": "b", "i": "biu", "u": "biu", "f": "biuf"}  # a dtype's kind -> kinds its JSON values may parse as
_TAGS = ("__tuple__", "__dict__", "__ndarray__", "__scalar__")


def properties_path(folder: str | os.PathLike[str], case_id: str) -> Path:
    """Where the properties of ``case_id`` in the preprocessed data folder ``folder`` are kept."""
    return Path(folder) / PROPERTIES_FOLDER / f"{case_id}.json"


# -- the JSON form ----------------------------------------------------------------------------


def encode_properties(value: Any, where: str = "properties") -> Any:
    """``value`` as plain JSON types, losslessly; a TypeError or ValueError (naming ``where``) for anything else.

    Handled, and what :func:`decode_properties` gives back:

    * ``None``, ``bool``, ``int``, finite ``float``, ``str``: themselves;
    * ``list``: a JSON array of its encoded items;
    * ``tuple``: ``{"__tuple__": [items]}``;
    * ``dict`` (any hashable keys of the types here, e.g. the int or tuple keys of ``class_locations``):
      ``{"__dict__": [[key, value], ...]}`` in insertion order;
    * numpy arrays of bool, (u)int8-64 or float16-64: ``{"__ndarray__": {"dtype", "shape", "data"}}``
      (``data`` the flat values in C order), same dtype (native byte order), shape and values back;
    * numpy scalars of those dtypes: ``{"__scalar__": {"dtype", "value"}}``, the same numpy type back.

    NaN and infinities are refused (JSON has none), as are other types (sets, objects, strings in arrays).
    """
    if isinstance(value, np.ndarray):
        dtype = _dtype_name(value.dtype, where)
        flat = value.ravel().tolist()
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise ValueError(f"{where}: a non-finite value in a {dtype} array cannot be stored as JSON")
        return {"__ndarray__": {"dtype": dtype, "shape": list(value.shape), "data": flat}}
    if isinstance(value, np.generic):  # (before the Python types: np.float64 is a float, np.bool_ is not a bool)
        dtype = _dtype_name(value.dtype, where)
        item = value.item()
        _check_finite(item, where)
        return {"__scalar__": {"dtype": dtype, "value": item}}
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        _check_finite(value, where)
        return value
    if isinstance(value, list):
        return [encode_properties(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, tuple):
        return {"__tuple__": [encode_properties(item, f"{where}[{i}]") for i, item in enumerate(value)]}
    if isinstance(value, dict):
        pairs = [
            [encode_properties(k, f"{where} key {k!r}"), encode_properties(v, f"{where}[{k!r}]")]
            for k, v in value.items()
        ]
        return {"__dict__": pairs}
    raise TypeError(
        f"{where}: a {type(value).__module__}.{type(value).__qualname__} cannot be stored in JSON properties "
        "(handled: None, bool, int, float, str, list, tuple, dict, numpy arrays and scalars of bool/int/float)"
    )


def decode_properties(document: Any, where: str = "properties") -> Any:
    """What :func:`encode_properties` made ``document`` from; a ValueError naming ``where`` for anything else."""
    if document is None or isinstance(document, bool | int | float | str):
        return document
    if isinstance(document, list):
        return [decode_properties(item, f"{where}[{i}]") for i, item in enumerate(document)]
    if not isinstance(document, dict) or len(document) != 1 or next(iter(document)) not in _TAGS:
        raise ValueError(f"{where}: expected a JSON value or one of {list(_TAGS)}, found {_brief(document)}")
    tag, body = next(iter(document.items()))
    if tag == "__tuple__":
        return tuple(decode_properties(_typed(body, list, where), where))
    if tag == "__dict__":
        out = {}
        for i, pair in enumerate(_typed(body, list, where)):
            if not isinstance(pair, list) or len(pair) != 2:
                raise ValueError(f"{where}: item {i} of a __dict__ is not a [key, value] pair")
            key = decode_properties(pair[0], f"{where} key {i}")
            try:
                hash(key)
            except TypeError as exc:
                raise ValueError(f"{where}: key {i} cannot be a dict key ({exc})") from exc
            out[key] = decode_properties(pair[1], f"{where}[{key!r}]")
        return out
    body = _typed(body, dict, where)
    dtype = np.dtype(_dtype_name(body.get("dtype"), where))  # (a known name: no other np.dtype is made)
    if tag == "__scalar__":
        value = body.get("value")
        if not isinstance(value, bool | int | float) or _kind(value) not in _KINDS[dtype.kind]:
            raise ValueError(f"{where}: a {dtype.name} scalar cannot be {_brief(value)}")
        return dtype.type(value)
    shape, data = body.get("shape"), body.get("data")
    if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise ValueError(f"{where}: an array's shape must be a list of sizes, found {_brief(shape)}")
    if not isinstance(data, list) or len(data) != math.prod(shape):
        raise ValueError(f"{where}: an array of shape {shape} needs {math.prod(shape)} flat values")
    raw = np.asarray(data)
    if raw.size and raw.dtype.kind not in _KINDS[dtype.kind]:
        raise ValueError(f"{where}: the values of a {dtype.name} array parse as {raw.dtype}")
    return raw.astype(dtype).reshape(shape)


def write_properties(path: Path, properties: dict[str, Any]) -> None:
    """``properties`` as JSON at ``path`` (encoded by :func:`encode_properties`)."""
    document = encode_properties(properties)
    Path(path).write_text(json.dumps(document, allow_nan=False, separators=(",", ":")), "utf-8")


def read_properties(path: Path) -> dict[str, Any]:
    """The properties written by :func:`write_properties`; a DataError when the file is missing or not theirs."""
    path = Path(path)
    try:
        value = decode_properties(json.loads(path.read_text("utf-8"), parse_constant=_no_constant))
        if not isinstance(value, dict):
            raise ValueError(f"properties: expected a dict, found {_brief(value)}")
    except (OSError, ValueError, OverflowError, RecursionError) as exc:
        raise DataError(
            f"{path}: cannot read a preprocessed case's properties ({exc}); delete the cache folder "
            f"{path.parent.parent.parent.parent} to rebuild it",
            file=str(path),
        ) from exc
    return value


# -- cases --------------------------------------------------------------------------------------


def save_case(
    data: np.ndarray,
    seg: np.ndarray,
    properties: dict[str, Any],
    output_filename_truncated: str,
    patch_size: Sequence[int],
) -> None:
    """One case as ``run_case_save`` saves it (float32 data, int16 seg, blosc2 chunks from the patch size),
    with the properties as JSON."""
    data = data.astype(np.float32, copy=False)
    seg = seg.astype(np.int16, copy=False)
    blocks, chunks = comp_blosc2_params(data.shape, tuple(patch_size), data.itemsize)
    blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, tuple(patch_size), seg.itemsize)
    JsonPropertiesDataset.save_case(
        data, seg, properties, output_filename_truncated,
        chunks=chunks, blocks=blocks, chunks_seg=chunks_seg, blocks_seg=blocks_seg,
    )  # fmt: skip


class JsonPropertiesDataset(nnUNetDatasetBlosc2):
    """nnU-Net's blosc2 dataset, with each case's properties in ``properties/<case>.json`` instead of a pickle.

    The case identifiers come from the ``.b2nd`` data files, as nnU-Net's class finds them.
    """

    def load_case(self, identifier: str) -> tuple[Any, Any, Any, dict[str, Any]]:
        dparams = {"nthreads": 1}
        folder = Path(self.source_folder)
        data = blosc2.open(urlpath=str(folder / f"{identifier}.b2nd"), mode="r", dparams=dparams, **self.mmap_kwargs)
        seg = blosc2.open(urlpath=str(folder / f"{identifier}_seg.b2nd"), mode="r", dparams=dparams, **self.mmap_kwargs)
        seg_prev = None
        if self.folder_with_segs_from_previous_stage is not None:
            previous = Path(self.folder_with_segs_from_previous_stage) / f"{identifier}.b2nd"
            seg_prev = blosc2.open(urlpath=str(previous), mode="r", dparams=dparams, **self.mmap_kwargs)
        return data, seg, seg_prev, read_properties(properties_path(folder, identifier))

    @staticmethod
    def save_case(
        data: np.ndarray,
        seg: np.ndarray,
        properties: dict[str, Any],
        output_filename_truncated: str,
        chunks: Sequence[int] | None = None,
        blocks: Sequence[int] | None = None,
        chunks_seg: Sequence[int] | None = None,
        blocks_seg: Sequence[int] | None = None,
        clevel: int = 5,
        codec: Any = blosc2.Codec.LZ4HC,
    ) -> None:
        """The arrays as ``nnUNetDatasetBlosc2.save_case`` writes them (its filter choice included), then the JSON."""
        if chunks is None or blocks is None:
            raise ValueError("save_case needs the blosc2 chunks and blocks (comp_blosc2_params of the patch size)")
        chunks_seg = chunks if chunks_seg is None else chunks_seg
        blocks_seg = blocks if blocks_seg is None else blocks_seg
        blosc2.set_nthreads(1)
        select = getattr(nnUNetDatasetBlosc2, "_select_filter", None)  # (a private helper; blosc2's default without)
        for array, suffix, array_chunks, array_blocks in (
            (data, ".b2nd", chunks, blocks),
            (seg, "_seg.b2nd", chunks_seg, blocks_seg),
        ):
            cparams: dict[str, Any] = {"codec": codec, "nthreads": 1, "clevel": clevel}
            if select is not None:
                cparams["filters"] = [select(array, array_blocks, array_chunks, codec, clevel)]
            blosc2.asarray(
                np.ascontiguousarray(array),
                urlpath=output_filename_truncated + suffix,
                chunks=tuple(array_chunks),
                blocks=tuple(array_blocks),
                cparams=cparams,
            )
        out = Path(output_filename_truncated)
        target = properties_path(out.parent, out.name)
        target.parent.mkdir(exist_ok=True)
        write_properties(target, properties)


# -- helpers ------------------------------------------------------------------------------------


def _dtype_name(dtype: Any, where: str) -> str:
    """The name of a dtype JSON properties hold; a TypeError for an array's other dtype, a ValueError for a
    JSON ``dtype`` field naming none (only names, never ``np.dtype`` of arbitrary JSON, are looked at)."""
    if isinstance(dtype, np.dtype):
        if dtype.name not in _DTYPES or dtype.fields is not None:
            raise TypeError(f"{where}: dtype {dtype} is not stored in JSON properties (handled: {sorted(_DTYPES)})")
        return dtype.name
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise ValueError(f"{where}: dtype {_brief(dtype)} is not one of {sorted(_DTYPES)}")
    return str(dtype)


def _check_finite(value: Any, where: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: {value!r} cannot be stored as JSON")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a value JSON properties hold")


def _kind(value: bool | int | float) -> str:
    return "b" if isinstance(value, bool) else "i" if isinstance(value, int) else "f"


def _typed(body: Any, kind: type, where: str) -> Any:
    if not isinstance(body, kind):
        raise ValueError(f"{where}: expected a JSON {kind.__name__} here, found {_brief(body)}")
    return body


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
