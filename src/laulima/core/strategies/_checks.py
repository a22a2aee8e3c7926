"""Every precondition of an aggregation, checked in one place before any arithmetic.

The hub validates each upload before it reaches a strategy; this is the strategy's own
defence, so that a bug upstream fails loudly with the site's name instead of producing a
silently wrong global model.

A lazy ``FitResult.weights`` (the hub's memory-mapped safetensors) may carry a ``schema``
attribute, ``name -> TensorSpec`` (what :func:`laulima.core.weights.parse_safetensors_header`
returns): the checks then read no tensor. Without it they look at each tensor's shape and
dtype, which for a mapping that loads on access means a second read. Whatever a lazy
schema declares, :func:`read_tensor` verifies each tensor again when it is actually read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from numbers import Integral

import numpy as np

from laulima.core.strategies.base import FitResult
from laulima.core.weights import TensorSpec, WeightsSchema, check_matches
from laulima.errors import DataError, WeightsError

__all__ = ["check_aggregation", "declared_schema", "read_tensor"]

#: numpy dtype kinds a strategy can average: float, signed, unsigned, bool.
_KINDS = "fiub"

_NOTHING_DONE = "nothing was aggregated"


def check_aggregation(
    strategy: str, global_weights: Mapping[str, np.ndarray], results: Sequence[FitResult]
) -> WeightsSchema:
    """Refuse an aggregation that cannot be done; return the global model's schema."""
    if not global_weights:
        raise WeightsError(
            f"{strategy}: the global model has no tensors; {_NOTHING_DONE} — "
            "start the experiment from the algorithm's initial weights",
            strategy=strategy,
        )
    expected: WeightsSchema = {}
    for key, array in global_weights.items():
        if not isinstance(array, np.ndarray) or array.dtype.kind not in _KINDS:
            got = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
            raise WeightsError(
                f"{strategy}: global tensor {key!r} is {got}, not a numeric numpy array; {_NOTHING_DONE}",
                strategy=strategy,
            )
        expected[key] = TensorSpec(tuple(int(d) for d in array.shape), array.dtype.name)
    if not results:
        raise DataError(
            f"{strategy}: no results to aggregate; {_NOTHING_DONE} — a round needs at "
            "least one site's update (min_sites) before the strategy is called",
            strategy=strategy,
        )
    seen: set[str] = set()
    for result in results:
        if not isinstance(result, FitResult):
            raise DataError(
                f"{strategy}: expected FitResult, got {type(result).__name__}; {_NOTHING_DONE}",
                strategy=strategy,
            )
        site = result.site
        if site in seen:
            raise DataError(
                f"{strategy}: site {site!r} has more than one result in this round; "
                f"{_NOTHING_DONE} — keep one result per site",
                strategy=strategy,
                site=site,
            )
        seen.add(site)
        n = result.n_samples
        if isinstance(n, bool) or not isinstance(n, Integral) or n <= 0:
            raise DataError(
                f"{strategy}: site {site!r} reported n_samples={n!r}; an update must come "
                f"from a positive whole number of samples. {_NOTHING_DONE} — drop this "
                "result or have the site retrain",
                strategy=strategy,
                site=site,
            )
        if not isinstance(result.weights, Mapping):
            raise WeightsError(
                f"{strategy}: site {site!r} sent weights as {type(result.weights).__name__}, "
                f"not a mapping of named arrays; {_NOTHING_DONE}",
                strategy=strategy,
                site=site,
            )
        where = f"{strategy}: update from site {site!r}"
        try:
            check_matches(expected, declared_schema(result.weights, where=where), where=where)
        except WeightsError as exc:
            raise WeightsError(
                f"{exc.message}; {_NOTHING_DONE} — drop this result or have the site "
                "retrain from the current global model",
                strategy=strategy,
                site=site,
            ) from exc
    return expected


def declared_schema(weights: Mapping[str, np.ndarray], *, where: str) -> WeightsSchema:
    """Names, shapes and dtypes of ``weights``; from its ``schema`` attribute if it has one."""
    declared = getattr(weights, "schema", None)
    if declared is not None:
        if not isinstance(declared, Mapping) or not all(isinstance(s, TensorSpec) for s in declared.values()):
            raise WeightsError(f"{where}: its 'schema' is not a mapping of TensorSpec", where=where)
        return {str(k): s for k, s in declared.items()}
    schema: WeightsSchema = {}
    for key, array in weights.items():
        if not isinstance(array, np.ndarray):
            raise WeightsError(
                f"{where}: tensor {key!r} is {type(array).__name__}, not a numpy array",
                where=where,
            )
        schema[key] = TensorSpec(tuple(int(d) for d in array.shape), array.dtype.name)
    return schema


def read_tensor(strategy: str, result: FitResult, key: str, spec: TensorSpec) -> np.ndarray:
    """Read ``result``'s tensor ``key`` (once), verifying it has ``spec``'s shape and dtype."""
    array = result.weights[key]
    if not isinstance(array, np.ndarray) or array.shape != spec.shape or array.dtype != spec.dtype:
        got = (
            f"shape {list(array.shape)} dtype {array.dtype}" if isinstance(array, np.ndarray) else type(array).__name__
        )
        raise WeightsError(
            f"{strategy}: site {result.site!r}'s tensor {key!r} read as {got}, expected shape "
            f"{list(spec.shape)} dtype {spec.dtype} (its declared schema was wrong); the "
            "aggregation stopped and the global model is unchanged",
            strategy=strategy,
            site=result.site,
        )
    return array
