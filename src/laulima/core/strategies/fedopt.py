"""FedAdam and FedYogi: an adaptive optimizer on the hub, fed FedAvg's pseudo-gradient.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, "Adaptive Federated
Optimization", ICLR 2021 (arXiv:2003.00295), Algorithm 2, without bias correction:

    delta = FedAvg(results) - x
    m     = beta_1 * m + (1 - beta_1) * delta
    v     = beta_2 * v + (1 - beta_2) * delta^2                        (Adam)
    v     = v - (1 - beta_2) * delta^2 * sign(v - delta^2)             (Yogi)
    x     = x + eta * m / (sqrt(v) + tau)

Algorithm 2 takes ``v_{-1} >= tau^2`` as input; we start from ``v = tau^2`` and ``m = 0``
(Flower starts ``v`` at 0, which makes the first step ``eta * (1 - beta_1) / sqrt(1 -
beta_2) * sign(delta)`` regardless of delta's size). Moments are kept per tensor in the
accumulator dtype, float64 (``delta**2`` of float32 weights overflows float32 beyond about
1.8e19, and ``m`` can exceed float32's range); integer buffers are not optimized
but take FedAvg's rounded mean. :meth:`FedOpt.state_dict` holds ``m/<name>`` and
``v/<name>``, so a hub that checkpoints it every round continues bit-identically.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np

from laulima.core.strategies._checks import check_aggregation
from laulima.core.strategies._fold import accumulator_dtype, cast_back
from laulima.core.strategies.base import FitResult, Strategy
from laulima.core.strategies.fedavg import weighted_means
from laulima.core.weights import Weights
from laulima.errors import ConfigurationError, WeightsError

__all__ = ["FedAdam", "FedOpt", "FedYogi"]


class FedOpt(Strategy):
    """Server-side adaptive optimizer over FedAvg's pseudo-gradient (Algorithm 2)."""

    def __init__(
        self,
        server_lr: float = 0.1,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        for field, value, ok in (
            ("server_lr", server_lr, server_lr > 0),
            ("beta_1", beta_1, 0 <= beta_1 < 1),
            ("beta_2", beta_2, 0 <= beta_2 < 1),
            ("tau", tau, tau > 0),
        ):
            if not ok:
                raise ConfigurationError(
                    f"{self.name}: {field} = {value} is out of range (server_lr > 0, 0 <= beta_1, beta_2 < 1, tau > 0)",
                    field=field,
                )
        self.server_lr = float(server_lr)
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)
        self.tau = float(tau)
        self._m: dict[str, np.ndarray] = {}
        self._v: dict[str, np.ndarray] = {}

    @abstractmethod
    def _second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        """The optimizer's update of ``v`` (Adam and Yogi differ only here)."""

    def aggregate(self, global_weights: Mapping[str, np.ndarray], results: Sequence[FitResult]) -> Weights:
        schema = check_aggregation(self.name, global_weights, results)
        self._check_state(global_weights)
        out: Weights = {}
        new_m: dict[str, np.ndarray] = {}
        new_v: dict[str, np.ndarray] = {}
        for key, mean in weighted_means(self.name, schema, results):
            like = global_weights[key]
            if like.dtype.kind != "f":
                out[key] = cast_back(mean, like.dtype)
                continue
            x = np.asarray(like, dtype=mean.dtype)
            delta = np.subtract(mean, x, out=mean)
            m = self._m.get(key)
            v = self._v.get(key)
            if m is None or v is None:
                m = np.zeros_like(delta)
                v = np.full_like(delta, self.tau**2)
            m = np.asarray(self.beta_1 * m + (1 - self.beta_1) * delta)  # 0-d stays an array
            v = np.asarray(self._second_moment(v, np.square(delta, out=delta)))
            new_m[key], new_v[key] = m, v
            out[key] = cast_back(x + self.server_lr * m / (np.sqrt(v) + self.tau), like.dtype)
        # Commit only once every tensor succeeded: a failed round leaves the state as it was.
        self._m, self._v = new_m, new_v
        return out

    def state_dict(self) -> Weights:
        state = {f"m/{k}": a.copy() for k, a in self._m.items()}
        state.update({f"v/{k}": a.copy() for k, a in self._v.items()})
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        m: dict[str, np.ndarray] = {}
        v: dict[str, np.ndarray] = {}
        for name, array in state.items():
            prefix, _, key = name.partition("/")
            if prefix not in ("m", "v") or not key:
                raise WeightsError(
                    f"{self.name}: optimizer state entry {name!r} is neither 'm/<tensor>' "
                    "nor 'v/<tensor>'; restore a checkpoint written by this strategy",
                    strategy=self.name,
                )
            if not isinstance(array, np.ndarray) or array.dtype.kind != "f":
                raise WeightsError(
                    f"{self.name}: optimizer state entry {name!r} is not a float array",
                    strategy=self.name,
                )
            (m if prefix == "m" else v)[key] = np.array(array, copy=True)
        for key in sorted(set(m) ^ set(v)):
            raise WeightsError(
                f"{self.name}: optimizer state has only one of 'm/{key}' and 'v/{key}'; "
                "the checkpoint is incomplete — restore an earlier round",
                strategy=self.name,
            )
        for key in m:
            if m[key].shape != v[key].shape or m[key].dtype != v[key].dtype:
                raise WeightsError(
                    f"{self.name}: optimizer state 'm/{key}' and 'v/{key}' differ in shape "
                    "or dtype; the checkpoint is corrupt — restore an earlier round",
                    strategy=self.name,
                )
        self._m, self._v = m, v

    def _check_state(self, global_weights: Mapping[str, np.ndarray]) -> None:
        """Refuse optimizer state that belongs to another model, before any arithmetic;
        widen moments saved in a narrower float dtype (checkpoints from float32 days)."""
        if not self._m:
            return
        floats = {k: a for k, a in global_weights.items() if a.dtype.kind == "f"}
        if set(self._m) != set(floats):
            diff = sorted(set(self._m) ^ set(floats))
            raise WeightsError(
                f"{self.name}: optimizer state and global model differ in tensors "
                f"({', '.join(map(repr, diff[:5]))}); the state belongs to another model — "
                "restore the matching checkpoint or start the experiment afresh",
                strategy=self.name,
            )
        for key, like in floats.items():
            dtype = accumulator_dtype(like.dtype)
            if self._m[key].dtype != dtype and np.can_cast(self._m[key].dtype, dtype, "safe"):
                # A checkpoint from before moments were kept in float64 (float32): widen it.
                self._m[key] = self._m[key].astype(dtype)
                self._v[key] = self._v[key].astype(dtype)
            if self._m[key].shape != like.shape or self._m[key].dtype != dtype:
                raise WeightsError(
                    f"{self.name}: optimizer state for {key!r} is {self._m[key].dtype}"
                    f"{list(self._m[key].shape)}, expected {dtype}{list(like.shape)}; restore "
                    "the matching checkpoint or start the experiment afresh",
                    strategy=self.name,
                )


class FedAdam(FedOpt):
    """Adam on the server: ``v`` is an exponential mean of delta squared."""

    name: ClassVar[str] = "fedadam"

    def _second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        return self.beta_2 * v + (1 - self.beta_2) * delta_sq


class FedYogi(FedOpt):
    """Yogi on the server: ``v`` moves additively toward delta squared, so it grows slowly."""

    name: ClassVar[str] = "fedyogi"

    def _second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        return v - (1 - self.beta_2) * delta_sq * np.sign(v - delta_sq)
