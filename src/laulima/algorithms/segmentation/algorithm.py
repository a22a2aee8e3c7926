"""UNetSegmentation: the built-in federated 3D segmentation algorithm (MONAI U-Net, Dice + CE, Adam).

Adam is created fresh in every task, so its moments restart each round. A site's moments
describe the loss surface around last round's local weights, not the new global model;
resetting them measured better than carrying each site's Adam state from round to round,
needs no per-site state outside the task's process, and keeps a task a pure function of
(global weights, local data, seed).

With ``TrainConfig.dp_sgd`` a task trains with sample-level DP-SGD instead
(:mod:`laulima.algorithms.segmentation.dp_sgd`: Poisson-sampled cases, per-case clipping,
Gaussian noise; the same network, so the same weights' names and shapes) and reports the ε
spent so far as the metric ``dp_sgd_epsilon``.
"""

from __future__ import annotations

import math
import sys
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from laulima.algorithms.base import Algorithm, DpSgd, Evaluation, SiteContext, TrainConfig, Update
from laulima.algorithms.segmentation import data, dp_sgd, engine
from laulima.algorithms.segmentation.model import (
    SegmentationParams,
    initial_model,
    learning_rate,
    load_numpy_weights,
    parse_params,
    pick_device,
    state_dict_to_numpy,
)
from laulima.core.weights import Weights
from laulima.errors import DataError
from laulima.imaging import SegmentationDataset, load_dataset

__all__ = ["UNetSegmentation", "check_dataset", "task_seed"]


class UNetSegmentation(Algorithm):
    """Params (``[config]``): ``task`` or ``in_channels``/``out_channels``, ``channels``, ``strides``,
    ``num_res_units``, ``norm``, ``roi_size``, ``lr``, ``batch_size``, ``threads``, ``device``,
    ``sw_overlap``, ``val_fraction``, and the ``preprocessing`` plan (a table: ``spacing_mm``,
    ``orientation``, ``normalization``, ``foreground_fraction``, ``foreground_percentile``; see
    :class:`SegmentationParams` and
    :class:`~laulima.algorithms.segmentation.preprocessing.PreprocessingPlan`). Every site resamples and
    normalises its cases with that plan, so all of them train on one grid."""

    def __init__(self) -> None:
        self.ctx: SiteContext | None = None
        self._samples: dict[str, list[data.Sample]] = {}

    supports_dp_sgd = True

    def initial_weights(self, params: Mapping[str, Any], seed: int) -> Weights:
        return state_dict_to_numpy(initial_model(params, seed))

    def setup(self, ctx: SiteContext) -> None:
        self.ctx = ctx
        self.params = parse_params(ctx.params)
        self.dataset = load_dataset(ctx.dataset_path)  # a DataError fails the task with its own message
        check_dataset(self.dataset, self.params, where=f"site {ctx.site}, dataset {ctx.dataset!r}")
        torch.set_num_threads(self.params.threads)
        self.device = pick_device(self.params.device)
        self.split = data.split_cases(self.dataset, self.params.val_fraction)
        self.model = initial_model(self.params, 0).to(self.device)  # (values replaced by each task's weights)
        self.loss_fn = engine.make_loss()

    def train(self, weights: Weights, config: TrainConfig) -> Update:
        if config.dp_sgd is not None:  # before any case is read
            dp_sgd.check_private(self.model, where=f"site {self._context.site}: segmentation config")
        samples = self._load("train")
        p = self.params
        epoch = math.ceil(len(samples) / p.batch_size)
        steps = config.local_steps if config.local_steps > 0 else config.local_epochs * epoch
        seed = task_seed(config.seed, config.round, self._context.site)
        load_numpy_weights(self.model, weights)
        optimizer = torch.optim.Adam(self.model.parameters(), lr=p.lr)  # fresh each round: see the module doc
        metrics: dict[str, float] = {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if config.dp_sgd is None:
                stats = engine.train_steps(
                    self.model,
                    optimizer,
                    data.batches(samples, p.batch_size, p.roi_size, seed),
                    steps,
                    loss_fn=self.loss_fn,
                    proximal_mu=config.proximal_mu,
                    lr_at=lambda i: learning_rate(p, config.progress, i, steps),
                )
            else:
                stats, metrics = self._train_private(samples, optimizer, steps, seed, config, config.dp_sgd)
        out = state_dict_to_numpy(self.model)
        out = {k: v if v.dtype == weights[k].dtype else v.astype(weights[k].dtype) for k, v in out.items()}
        metrics = {"loss": stats["loss"], "steps": float(steps), **metrics}
        return Update(weights=out, n_samples=len(samples), metrics=metrics)

    def evaluate(self, weights: Weights) -> Evaluation:
        samples = self._load("held_out")
        load_numpy_weights(self.model, weights)
        p = self.params
        scores = engine.evaluate(
            self.model, samples, p.roi_size, self.dataset.labels, overlap=p.sw_overlap,
            regions=p.regions, spacing_mm=p.preprocessing.spacing_mm,
        )  # fmt: skip
        metrics = scores.metrics()
        metrics["held_out_test"] = 1.0 if self.split.source == "test" else 0.0
        return Evaluation(n_samples=scores.n, metrics=metrics)

    def finalize(self) -> None:
        self._samples.clear()

    # -- helpers -------------------------------------------------------------------------
    def _train_private(
        self,
        samples: list[data.Sample],
        optimizer: torch.optim.Optimizer,
        steps: int,
        seed: int,
        config: TrainConfig,
        dp: DpSgd,
    ) -> tuple[dict[str, float], dict[str, float]]:
        """``steps`` DP-SGD steps (see :mod:`~laulima.algorithms.segmentation.dp_sgd`); (stats, DP metrics).

        ``dp_sgd_epsilon`` is ε at ``dp.delta`` over this round and every earlier one, as if the
        site had trained in each with this task's steps and sampling rate (see
        :func:`~laulima.algorithms.segmentation.dp_sgd.dp_sgd_epsilon`)."""
        p = self.params
        rate = dp_sgd.sampling_rate(p.batch_size, len(samples))
        secret = np.random.default_rng()  # OS entropy: the hub must not be able to recompute who was sampled
        stats = dp_sgd.train_steps_private(
            self.model,
            optimizer,
            data.poisson_batches(samples, rate, p.roi_size, seed, secret),
            steps,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            expected_batch_size=min(p.batch_size, len(samples)),
            loss_fn=self.loss_fn,
            proximal_mu=config.proximal_mu,
            lr_at=lambda i: learning_rate(p, config.progress, i, steps),
            generator=dp_sgd.noise_generator(self.device),
        )
        epsilon = dp_sgd.dp_sgd_epsilon(dp, steps=steps, rounds=config.round, rate=rate)
        return stats, {"dp_sgd_epsilon": epsilon}

    @property
    def _context(self) -> SiteContext:
        if self.ctx is None:
            raise RuntimeError("UNetSegmentation.setup() was not called")
        return self.ctx

    def _load(self, part: str) -> list[data.Sample]:
        """Read one split once, lazily: an evaluation task never reads the training images."""
        if part not in self._samples:
            cases = self.split.train if part == "train" else self.split.held_out
            if part == "held_out" and self.split.source == "validation":
                print(
                    f"{self._context.site}: the test split has no labels; scoring on {len(cases)} training "
                    f"subjects held out for validation ({self.params.val_fraction:.0%})",
                    file=sys.stderr,
                )
            self._samples[part] = data.load_samples(cases, self.params.in_channels, self.params.preprocessing)
        return self._samples[part]


def check_dataset(dataset: SegmentationDataset, params: SegmentationParams, *, where: str) -> None:
    """The dataset must have the model's channels and labels, and something to train and score on."""
    root = dataset.root
    if len(dataset.channels) != params.in_channels:
        raise DataError(
            f"{where}: {root} has {len(dataset.channels)} image channel(s) {list(dataset.channels)}, "
            f"the experiment's model takes in_channels = {params.in_channels}; register the dataset the "
            "experiment was made for, or fix task / in_channels in its [config]",
            file=str(root),
        )
    if sorted(dataset.labels) != list(range(params.out_channels)):
        raise DataError(
            f"{where}: {root} has labels {dict(sorted(dataset.labels.items()))}, the experiment's model "
            f"predicts out_channels = {params.out_channels} classes 0..{params.out_channels - 1}; register "
            "the dataset the experiment was made for, or fix task / out_channels in its [config]",
            file=str(root),
        )
    if not dataset.training:
        raise DataError(f"{where}: {root} has no training subjects", file=str(root))
    if len(dataset.training) < 2 and not any(c.label is not None for c in dataset.test):
        raise DataError(
            f"{where}: {root} has one training subject and no labelled test subject; nothing to validate on",
            file=str(root),
        )


def task_seed(seed: int, round: int, site: str) -> int:
    """One 32-bit seed per (experiment seed, round, site): sites draw different batches each round."""
    salt = zlib.crc32(site.encode("utf-8"))
    return int(np.random.SeedSequence([seed, round, salt]).generate_state(1)[0])
