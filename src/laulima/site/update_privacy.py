"""What the site agent does to a trained update before it may leave: clip, noise, quantise.

This runs in the agent (Laulima's own code), after the algorithm's child process has written
its update and before anything is sent, so no algorithm can skip it. The update is taken as
the step away from the model the task was given (keys in sorted order, one vector):

- clipped to the task's L2 bound;
- with differential privacy, Gaussian noise added: all of it (``local``), or this site's
  share of the sum's noise (``distributed``, under secure aggregation);
- without secure aggregation, written back as a model (given weights + private step), with
  the sample count it had (the hub's FedAvg weighting is post-processing);
- under secure aggregation, weighted (its sample count capped at ``max_weight``, or 1 under
  DP), clamped to the round's per-coordinate bound and quantised to integers modulo 2^32 with
  unbiased stochastic rounding, ready to be masked (site/secure_aggregation.py).

The unclipped update is overwritten in place: after this step only the private form exists.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open

from laulima.core.privacy.accountant import GaussianRelease, epsilon
from laulima.core.privacy.clipping import clip, flatten, gaussian_noise, secure_rng, unflatten
from laulima.core.privacy.quantize import quantize, scale_for
from laulima.core.privacy.tasks import noise_std
from laulima.core.protocol import MetaKey, TaskPublic
from laulima.errors import WeightsError
from laulima.site.worker import write_safetensors

__all__ = ["EPSILON_METRIC", "QUANTIZED_TENSOR", "PrivateUpdate", "privatize_update"]

EPSILON_METRIC = "privacy_epsilon"
"""The site-level ε this experiment has cost the site after this round (its own accounting)."""

QUANTIZED_TENSOR = "secagg.quantized"
"""The site-local file's one tensor between privatising and masking (never sent)."""


@dataclass(frozen=True)
class PrivateUpdate:
    """What was done, for the site's own audit trail (never sent to the hub)."""

    sha256: str
    norm: float
    """L2 norm of the step before clipping."""
    clipped: bool
    noise_std: float
    weight: int
    epsilon: float | None


def privatize_update(task: TaskPublic, update_path: Path, global_path: Path) -> PrivateUpdate:
    """Replace ``update_path`` by its private form (see the module docstring)."""
    privacy, secagg = task.privacy, task.secure_aggregation
    update, metadata = _read(update_path)
    given, _ = _read(global_path)
    if sorted(update) != sorted(given):
        raise WeightsError("the update's tensors differ from the given model's", where="update")
    keys = sorted(given)
    shapes = {k: given[k].shape for k in keys}
    step = flatten(update, keys) - flatten(given, keys)
    del update
    bounds = [b for b in (privacy.clip if privacy else None, secagg.clip if secagg else None) if b is not None]
    clipped, norm = clip(step, min(bounds)) if bounds else (step, float(np.linalg.norm(step)))
    rng = secure_rng()
    n_samples = int(metadata.get(MetaKey.N_SAMPLES, "1"))
    weight = 1 if (privacy is not None or secagg is None) else max(1, min(n_samples, secagg.max_weight))
    contribution = clipped * weight if weight != 1 else clipped
    std = noise_std(privacy, secagg.threshold if secagg else None) if privacy is not None else 0.0
    if std > 0:
        contribution = contribution + gaussian_noise(contribution.size, std, rng)
    spent = None
    if privacy is not None:
        spent = epsilon([GaussianRelease(privacy.noise_multiplier, count=task.round)], privacy.delta)
        metrics = json.loads(metadata.get(MetaKey.METRICS, "{}"))
        metrics[EPSILON_METRIC] = spent if np.isfinite(spent) else 1e15
        metadata[MetaKey.METRICS] = json.dumps(metrics)
    if secagg is not None:
        bounded = np.clip(contribution, -secagg.bound, secagg.bound)
        quantized = quantize(bounded, scale_for(secagg.bound, secagg.sites), rng)
        metadata[MetaKey.N_SAMPLES] = str(weight)
        digest, _ = write_safetensors(update_path, {QUANTIZED_TENSOR: quantized.view(np.int32)}, metadata)
    else:
        new = unflatten(flatten(given, keys) + contribution, shapes)
        out = {k: _cast(new[k], given[k].dtype) for k in keys}
        digest, _ = write_safetensors(update_path, out, metadata)
    return PrivateUpdate(
        sha256=digest,
        norm=norm,
        clipped=bool(bounds) and norm > min(bounds),
        noise_std=std,
        weight=weight,
        epsilon=spent,
    )


def _read(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    with safe_open(str(path), framework="numpy") as f:
        metadata = dict(f.metadata() or {})
        return {k: f.get_tensor(k) for k in f.keys()}, metadata  # noqa: SIM118 - safe_open has no __iter__


def _cast(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype)
