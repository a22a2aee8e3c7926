"""The sample-weighted running mean behind FedAvg, folded one tensor at a time at memory speed.

The mean ``sum_i n_i x_i / N`` is accumulated in Horner form: after the k-th tensor the
accumulator holds ``sum_{j<=k} (n_j / n_k) x_j``, so each new tensor costs
``acc *= n_{k-1} / n_k; acc += x_k`` and the end one ``acc *= n_last / N``. Unlike
``tmp = c * x; acc += tmp`` this needs no temporary at all, and of its two passes only
``acc += x`` reads memory that is not already in cache. Both passes run chunk by chunk
(``CHUNK`` elements) so the slice of ``acc`` the first pass wrote is still in cache for the
second, whatever the tensor's size. On the development machine (2-core EPYC VM, same
data, one thread, float32 accumulator) this ran at ~17.5 GB/s of updates where
``tmp = c * x; acc += tmp`` ran at ~14 (benchmarks/aggregate.py measures the whole of
FedAvg); the float64 accumulator now used costs about 2x (see :func:`accumulator_dtype`).

Numerically it is the same sum: the coefficients are positive and each ratio is rounded
once, so a weight's relative error is at most (sites + 1) units in the last place.

Overflow: the accumulator is float64 (see :func:`accumulator_dtype`) and callers fold sites
in increasing order of their counts (FedAvg does), so every coefficient ``n_j / n_k`` is at
most 1 and the accumulator never exceeds (sites x the largest magnitude): no finite float32
or float16 input can overflow it, whatever the counts (float32 in float32 did: 1e21 from
1e18 samples then 1 from 1 sample rescaled the accumulator to 1e39).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["CHUNK", "accumulator_dtype", "cast_back", "weighted_mean_into"]

#: Elements per chunk: 512K float32 = 2 MiB, which stays in L2/L3 between the two passes.
#: Tuned with benchmarks/aggregate.py: 256K..1M are within noise, 128K and below pay
#: Python overhead per call and restart the memory stream too often.
CHUNK = 1 << 19


def accumulator_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype in which tensors of ``dtype`` are averaged: float64, whatever ``dtype`` is.

    Range, not precision, decides it: a float32 accumulator overflows on finite float32
    inputs (two sites sending 3e38 sum to inf; Horner rescaling multiplies by count ratios),
    and a model that became inf through an aggregation is lost. In float64 no finite
    float32/float16 input can overflow the fold (see the module docstring). Integers and
    booleans average in float64 too (exact up to 2**53) and are rounded back by
    :func:`cast_back`.

    The cost is real. For a float32 model the accumulator's memory traffic doubles (each
    site's pass reads and writes 8 bytes per weight instead of 4, besides reading the site's
    4), each site's tensor is widened chunk by chunk (:func:`_fold`), and the mean takes one
    more pass to be cast back. Measured on the 2-core development VM, same session, best of
    the script's runs: ``benchmarks/aggregate.py`` (FedAvg, 20 updates of 76 MB) 0.10 s with
    the float32 accumulator, 0.24 s in float64 with numpy's mixed-dtype add, 0.17-0.21 s with
    the chunked widening. A round of 3 x 76 MB (benchmarks/round_overhead.py) did not change
    beyond noise. A fold tensor also holds a float64 accumulator (twice the tensor) while it
    is being folded: hub peak RSS at 3 x 76 MB rose from ~360 to ~395 MB.
    """
    return np.dtype(np.float64)


def cast_back(mean: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``mean`` in the model's ``dtype``; integer and boolean tensors round half to even.

    Rounding keeps an integer buffer an integer (BatchNorm's ``num_batches_tracked``
    becomes the sample-weighted mean count), and a boolean mask its weighted majority.
    """
    mean = np.asarray(mean)  # arithmetic on 0-d arrays yields numpy scalars
    if mean.dtype == dtype:
        return mean
    if dtype.kind in "iub":
        mean = np.rint(mean)
    return mean.astype(dtype)


def weighted_mean_into(
    out: np.ndarray,
    tensors: Iterable[np.ndarray],
    counts: Sequence[int],
    *,
    chunk: int | None = None,
) -> np.ndarray:
    """Write ``sum_i counts[i] * tensors[i] / sum(counts)`` into ``out`` and return it.

    ``tensors`` is consumed lazily, one at a time, so only ``out`` and the current tensor
    need be in memory. ``out`` must be C-contiguous, of the tensors' shape, of a dtype
    each tensor casts to safely (see :func:`accumulator_dtype`). Counts must be positive.
    """
    if not out.flags.c_contiguous:
        raise ValueError("weighted_mean_into needs a C-contiguous output array")
    acc = out.reshape(-1)
    chunk = chunk or CHUNK
    scalar = out.dtype.type
    total = sum(counts)
    prev = 0
    for n, x in zip(counts, tensors, strict=True):
        if n <= 0:
            raise ValueError(f"counts must be positive, got {n}")
        flat = np.ascontiguousarray(x).reshape(-1)
        if prev == 0:
            np.copyto(acc, flat, casting="safe")
        else:
            _fold(acc, flat, scalar(prev / n), chunk)
        prev = n
        del x, flat  # drop this tensor before the next one is read
    if prev == 0:
        raise ValueError("weighted_mean_into needs at least one tensor")
    if prev != total:
        np.multiply(acc, scalar(prev / total), out=acc)
    return out


def _fold(acc: np.ndarray, x: np.ndarray, ratio: np.generic, chunk: int) -> None:
    """``acc = acc * ratio + x`` in place, chunk by chunk.

    A tensor of another dtype than the accumulator (float32 into float64) is first widened
    chunk by chunk into a small scratch buffer: numpy's contiguous cast is a tight loop, while
    a mixed-dtype ``add`` goes through its buffered casting machinery, measured about 1.5-2x
    slower on the development machine."""
    widen = x.dtype != acc.dtype
    scratch = np.empty(min(chunk, acc.size), dtype=acc.dtype) if widen else None
    for start in range(0, acc.size, chunk):
        a = acc[start : start + chunk]
        piece = x[start : start + chunk]
        if scratch is not None:
            wide = scratch[: a.size]
            np.copyto(wide, piece, casting="safe")
            piece = wide
        if ratio != 1:  # equal sample counts: no rescaling
            np.multiply(a, ratio, out=a)
        np.add(a, piece, out=a, casting="safe")
