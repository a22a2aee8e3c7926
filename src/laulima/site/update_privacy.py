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
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open

from laulima.core.privacy.clipping import clip_in_place, gaussian_noise, l2_norm, secure_rng
from laulima.core.privacy.messages import EPSILON_METRIC, INFINITE_EPSILON
from laulima.core.privacy.quantize import quantize, scale_for
from laulima.core.privacy.tasks import noise_std
from laulima.core.protocol import MetaKey, TaskPublic
from laulima.errors import WeightsError
from laulima.site.privacy_ledger import experiment_epsilon
from laulima.site.worker import write_safetensors

__all__ = ["EPSILON_METRIC", "QUANTIZED_TENSOR", "PrivateUpdate", "privatize_update"]

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


CHUNK = 1 << 20
"""Elements quantised (and noised) at a time: temporaries stay a few MiB whatever the model."""


def privatize_update(task: TaskPublic, update_path: Path, global_path: Path) -> PrivateUpdate:
    """Replace ``update_path`` by its private form (see the module docstring).

    Memory: one float64 vector of the model's size plus the output (tensors are read one at a
    time and the noise and quantisation go chunk by chunk), so twenty agents on one machine
    can privatise a 76 MB model at once."""
    privacy, secagg = task.privacy, task.secure_aggregation
    with safe_open(str(update_path), framework="numpy") as upd, safe_open(str(global_path), framework="numpy") as gvn:
        metadata = dict(upd.metadata() or {})
        keys = sorted(gvn.keys())
        if sorted(upd.keys()) != keys:
            raise WeightsError("the update's tensors differ from the given model's", where="update")
        shapes = {k: tuple(gvn.get_slice(k).get_shape()) for k in keys}
        step = np.empty(sum(math.prod(shape) for shape in shapes.values()), dtype=np.float64)
        offset = 0
        for k in keys:
            n = math.prod(shapes[k])
            np.subtract(upd.get_tensor(k).ravel(), gvn.get_tensor(k).ravel(), out=step[offset : offset + n])
            offset += n
    bounds = [b for b in (privacy.clip if privacy else None, secagg.clip if secagg else None) if b is not None]
    if bounds:
        norm = clip_in_place(step, min(bounds))
    else:
        norm = l2_norm(step)
        if not math.isfinite(norm):
            raise WeightsError("the update holds NaN or infinite values; the local training diverged", where="update")
    rng = secure_rng()
    n_samples = int(metadata.get(MetaKey.N_SAMPLES, "1"))
    weight = 1 if (privacy is not None or secagg is None) else max(1, min(n_samples, secagg.max_weight))
    if weight != 1:
        step *= weight
    std = noise_std(privacy, secagg.threshold if secagg else None) if privacy is not None else 0.0
    spent = None
    if privacy is not None:
        spent = experiment_epsilon(privacy.noise_multiplier, task.round, privacy.delta)
        metrics = json.loads(metadata.get(MetaKey.METRICS, "{}"))
        metrics[EPSILON_METRIC] = spent if math.isfinite(spent) else INFINITE_EPSILON
        metadata[MetaKey.METRICS] = json.dumps(metrics)
    if secagg is not None:
        scale = scale_for(secagg.bound, secagg.sites)
        quantized = np.empty(step.size, dtype=np.uint32)
        for lo in range(0, step.size, CHUNK):
            part = step[lo : lo + CHUNK]
            if std > 0:
                part += gaussian_noise(part.size, std, rng)
            np.clip(part, -secagg.bound, secagg.bound, out=part)
            quantized[lo : lo + CHUNK] = quantize(part, scale, rng)
        del step
        metadata[MetaKey.N_SAMPLES] = str(weight)
        digest, _ = write_safetensors(update_path, {QUANTIZED_TENSOR: quantized.view(np.int32)}, metadata)
    else:
        for lo in range(0, step.size, CHUNK):
            if std > 0:
                step[lo : lo + CHUNK] += gaussian_noise(min(CHUNK, step.size - lo), std, rng)
        out: dict[str, np.ndarray] = {}
        offset = 0
        with safe_open(str(global_path), framework="numpy") as gvn:
            for k in keys:
                n = math.prod(shapes[k])
                given = gvn.get_tensor(k)
                out[k] = _cast(given.ravel() + step[offset : offset + n], given.dtype).reshape(shapes[k])
                offset += n
        del step
        digest, _ = write_safetensors(update_path, out, metadata)
    return PrivateUpdate(
        sha256=digest,
        norm=norm,
        clipped=bool(bounds) and norm > min(bounds),
        noise_std=std,
        weight=weight,
        epsilon=spent,
    )


def _cast(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype)
