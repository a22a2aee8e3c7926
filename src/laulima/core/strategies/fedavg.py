"""FedAvg: the sample-weighted mean of the sites' models.

McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-Efficient Learning of
Deep Networks from Decentralized Data", AISTATS 2017 (arXiv:1602.05629), Algorithm 1:
``w <- sum_k (n_k / n) w_k``.

Results are folded key by key: for one key, each site's tensor is read once (a lazy
mapping loads it then), added to that key's float64 accumulator and dropped before the next
site's is read, so the accumulator stays in cache while every site passes through it.
Sites are folded in increasing order of ``n_samples`` (ties in the given order), which keeps
the running sum from overflowing (see ``_fold``); that order depends on the results alone,
so the result is still reproducible. Keys are
spread over ``WORKERS`` threads (numpy releases the GIL; one thread cannot keep memory
busy while it also rescales the accumulator: two threads fold ~1.5x faster on a 2-core
machine, more gave nothing measurable). Reads from the mappings are serialized, so a
lazy mapping need not be thread-safe. Memory: the new model plus, per worker, one site
tensor and one float64 accumulator. Each key is folded by one thread in the same order,
so the result is bit-identical whatever the number of workers.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar

import numpy as np

from laulima.core.strategies._checks import check_aggregation, read_tensor
from laulima.core.strategies._fold import accumulator_dtype, cast_back, weighted_mean_into
from laulima.core.strategies.base import FitResult, Strategy
from laulima.core.weights import TensorSpec, Weights, WeightsSchema

__all__ = ["WORKERS", "FedAvg", "weighted_means"]


#: Threads that fold keys in parallel. Two overlap one thread's in-cache rescaling with the
#: other's memory reads; three or four measured no faster on a 2-core machine, and each
#: adds a site tensor to the memory high-water mark. On one core two threads just alternate.
WORKERS = 2


class FedAvg(Strategy):
    """Sample-weighted averaging in float64, cast back to each tensor's dtype; integer buffers round."""

    name: ClassVar[str] = "fedavg"

    def aggregate(self, global_weights: Mapping[str, np.ndarray], results: Sequence[FitResult]) -> Weights:
        schema = check_aggregation(self.name, global_weights, results)
        return dict(weighted_means(self.name, schema, results, cast=True))


def weighted_means(
    strategy: str,
    schema: WeightsSchema,
    results: Sequence[FitResult],
    *,
    workers: int | None = None,
    cast: bool = False,
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(key, sample-weighted mean)`` for each key of ``schema``, in its order.

    Means are in the accumulator dtype (float64), or with ``cast`` in the tensor's own dtype
    (cast by the worker, so finished keys waiting to be yielded hold no float64 copy).
    ``schema`` is what :func:`check_aggregation` returned; each site's tensor is read once.
    """
    workers = WORKERS if workers is None else workers
    # Smallest counts first: every Horner coefficient n_j / n_k is then <= 1 (no overflow).
    ordered = sorted(results, key=lambda r: int(r.n_samples))
    counts = [int(r.n_samples) for r in ordered]
    read_lock = threading.Lock()

    def mean_of(key: str, spec: TensorSpec) -> np.ndarray:
        def tensors() -> Iterator[np.ndarray]:
            for result in ordered:
                with read_lock:
                    tensor = read_tensor(strategy, result, key, spec)
                yield tensor
                del tensor  # let it go before the next site's is read

        out = np.empty(spec.shape, dtype=accumulator_dtype(np.dtype(spec.dtype)))
        mean = weighted_mean_into(out, tensors(), counts)
        return cast_back(mean, np.dtype(spec.dtype)) if cast else mean

    if workers <= 1 or len(schema) <= 1:
        for key, spec in schema.items():
            yield key, mean_of(key, spec)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="laulima-fedavg")
    try:
        # Largest keys first, so no worker is left with a big one at the end; yield in key order.
        by_size = sorted(schema, key=lambda k: schema[k].nbytes, reverse=True)
        futures = {key: pool.submit(mean_of, key, schema[key]) for key in by_size}
        for key in schema:
            yield key, futures[key].result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
