"""Multinomial logistic regression in numpy: the built-in algorithm for tabular data.

Small and fast (a round takes milliseconds), so demos, tests and benchmarks exercise the
whole federation without a deep-learning stack. Trains with mini-batch SGD on
``train.csv`` and validates on ``val.csv`` of the site's dataset folder (see
:mod:`laulima.algorithms.tabular_data`); supports FedProx's proximal term.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from laulima.algorithms.base import Algorithm, Evaluation, SiteContext, TrainConfig, Update
from laulima.algorithms.tabular_data import DEFAULT_CLASSES, DEFAULT_FEATURES, read_tabular
from laulima.core.weights import Weights
from laulima.errors import ConfigurationError, DataError, WeightsError

__all__ = ["BIAS", "WEIGHT", "LogisticRegression"]

WEIGHT = "linear.weight"
"""Shape (n_classes, n_features), float32."""
BIAS = "linear.bias"
"""Shape (n_classes,), float32."""


class LogisticRegression(Algorithm):
    """Softmax regression; ``params``: ``lr`` (0.1), ``batch_size`` (32), ``n_features``, ``n_classes``."""

    def __init__(self) -> None:
        self.ctx: SiteContext | None = None
        self._data: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def initial_weights(self, params: Mapping[str, Any], seed: int) -> Weights:
        n_features, n_classes = _shape(params)
        rng = np.random.default_rng([seed, 0x10C])
        return {
            WEIGHT: rng.normal(0.0, 0.01, size=(n_classes, n_features)).astype(np.float32),
            BIAS: np.zeros(n_classes, dtype=np.float32),
        }

    def setup(self, ctx: SiteContext) -> None:
        self.ctx = ctx
        self.n_features, self.n_classes = _shape(ctx.params)
        self.lr = float(ctx.params.get("lr", 0.1))
        self.batch_size = int(ctx.params.get("batch_size", 32))
        if self.lr <= 0 or self.batch_size < 1:
            raise ConfigurationError(
                f"LogisticRegression: lr = {self.lr} and batch_size = {self.batch_size} must be positive; "
                "fix the experiment's [config] table",
                field="config",
            )

    def train(self, weights: Weights, config: TrainConfig) -> Update:
        x, y = self._split("train.csv")
        w0, b0 = self._unpack(weights)
        w, b = w0.copy(), b0.copy()
        site_salt = zlib.crc32(self._context.site.encode("utf-8"))
        rng = np.random.default_rng([config.seed, config.round, site_salt])
        n = len(y)
        steps = config.local_steps if config.local_steps > 0 else config.local_epochs * -(-n // self.batch_size)
        mu = config.proximal_mu
        order = np.empty(0, dtype=np.int64)
        pos = 0
        onehot = np.eye(self.n_classes)
        for _ in range(steps):
            if pos >= len(order):
                order, pos = rng.permutation(n), 0
            idx = order[pos : pos + self.batch_size]
            pos += self.batch_size
            xb = x[idx]
            grad_logits = (_softmax(xb @ w.T + b) - onehot[y[idx]]) / len(idx)
            gw = grad_logits.T @ xb
            gb = grad_logits.sum(axis=0)
            if mu > 0:
                gw += mu * (w - w0)
                gb += mu * (b - b0)
            w -= self.lr * gw
            b -= self.lr * gb
        loss, acc = _loss_accuracy(x, y, w, b)
        return Update(
            weights={WEIGHT: w.astype(np.float32), BIAS: b.astype(np.float32)},
            n_samples=n,
            metrics={"train_loss": loss, "train_accuracy": acc, "steps": float(steps)},
        )

    def evaluate(self, weights: Weights) -> Evaluation:
        x, y = self._split("val.csv")
        w, b = self._unpack(weights)
        loss, acc = _loss_accuracy(x, y, w, b)
        return Evaluation(n_samples=len(y), metrics={"accuracy": acc, "loss": loss})

    # -- helpers -------------------------------------------------------------------------
    @property
    def _context(self) -> SiteContext:
        if self.ctx is None:
            raise RuntimeError("LogisticRegression.setup() was not called")
        return self.ctx

    def _split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Read ``name`` once, lazily: an evaluation task never parses the training split."""
        if name not in self._data:
            path = self._context.dataset_path / name
            x, y = read_tabular(path)
            if x.shape[1] != self.n_features:
                raise DataError(
                    f"{path}: has {x.shape[1]} feature columns, the experiment expects n_features = "
                    f"{self.n_features}; fix the dataset or the experiment's [config]",
                    file=str(path),
                )
            if y.max() >= self.n_classes:
                raise DataError(
                    f"{path}: label {int(y.max())} is out of range for n_classes = {self.n_classes}",
                    file=str(path),
                )
            self._data[name] = (x.astype(np.float64), y)
        return self._data[name]

    def _unpack(self, weights: Weights) -> tuple[np.ndarray, np.ndarray]:
        try:
            w = np.asarray(weights[WEIGHT], dtype=np.float64)
            b = np.asarray(weights[BIAS], dtype=np.float64)
        except KeyError as exc:
            raise WeightsError(f"LogisticRegression: the model has no tensor {exc.args[0]!r}") from exc
        if w.shape != (self.n_classes, self.n_features) or b.shape != (self.n_classes,):
            raise WeightsError(
                f"LogisticRegression: model shapes {list(w.shape)} / {list(b.shape)} do not match "
                f"n_classes = {self.n_classes}, n_features = {self.n_features}"
            )
        return w, b


def _shape(params: Mapping[str, Any]) -> tuple[int, int]:
    n_features = int(params.get("n_features", DEFAULT_FEATURES))
    n_classes = int(params.get("n_classes", DEFAULT_CLASSES))
    if n_features < 1 or n_classes < 2:
        raise ConfigurationError(
            f"LogisticRegression: n_features = {n_features} must be >= 1 and n_classes = {n_classes} >= 2",
            field="config",
        )
    return n_features, n_classes


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def _loss_accuracy(x: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    logits = x @ w.T + b
    z = logits - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    loss = float(-log_p[np.arange(len(y)), y].mean())
    acc = float((logits.argmax(axis=1) == y).mean())
    return loss, acc
