"""NnUNet: nnU-Net v2 trained at each site under one shared plan; the hub averages its weights.

Everything that makes a model nnU-Net comes from nnunetv2 unchanged: the preprocessing
(``DefaultPreprocessor``), the network (``get_network_from_plans``), and ``nnUNetTrainer``'s
loss (Dice + CE with deep supervision), optimiser (SGD, Nesterov momentum 0.99, weight decay
3e-5, gradient clipping at 12), patch sampling with foreground oversampling and data
augmentation, driven through its own ``initialize`` / ``get_dataloaders`` / ``train_step``.
Evaluation predicts with ``nnUNetPredictor`` (Gaussian-weighted sliding window, optional
mirroring) in the cases' original space.

Two things are the federation's: the learning rate is nnU-Net's poly rule
``initial_lr * (1 - t)^0.9`` with ``t`` running through :attr:`TrainConfig.progress` over a
task's steps, so a federated model decays over its rounds as a central run does over its
epochs; and SGD's momentum starts at zero in each task (a task is a pure function of global
weights, local data and seed, as the built-in algorithm's Adam is).

A task runs in a forked, sandboxed child: nnU-Net's data augmentation runs in-process
(``nnUNet_n_proc_DA=0``: its ``SingleThreadedAugmenter``), ``torch.compile`` is off, and its
log files and prints go to the task's work folder. Preprocessed cases are read with no pickle
(:mod:`laulima.nnunet.cache_io`); evaluation preprocesses its cases in memory.
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from laulima.algorithms.base import Algorithm, Evaluation, SiteContext, TrainConfig, Update
from laulima.algorithms.segmentation.algorithm import task_seed
from laulima.algorithms.segmentation.data import Split, split_cases
from laulima.algorithms.segmentation.engine import Scores, metric_name, region_dice, region_scores
from laulima.algorithms.segmentation.model import pick_device
from laulima.core.fingerprint import SiteFingerprint
from laulima.core.weights import Weights
from laulima.errors import DataError
from laulima.nnunet.environment import environment
from laulima.nnunet.network import TRAINER_NAME, build_network, initial_network, load_weights, managers, network_weights
from laulima.nnunet.params import NnUNetParams, parse_params
from laulima.nnunet.preprocess import cached_raw_view, preprocess_cases
from laulima.nnunet.rawview import RawCase

if TYPE_CHECKING:
    from laulima.imaging.layouts import SegmentationDataset

__all__ = ["NnUNet", "nnunet_environment", "poly_lr"]

_RAW_NAME = "Dataset500_Site"  # the raw view's folder name; the plan's dataset_name names everything nnU-Net writes


def poly_lr(initial_lr: float, progress: tuple[float, float], step: int, steps: int) -> float:
    """nnU-Net's poly learning rate for step ``step`` (0-based) of ``steps`` in a task covering ``progress``."""
    start, end = progress
    done = start + (end - start) * step / steps if steps > 0 else start
    return initial_lr * max(0.0, 1.0 - done) ** 0.9


class NnUNet(Algorithm):
    """Params (``[config]``): ``plans`` and ``dataset_json`` (nnU-Net's, from the planning step),
    ``configuration`` ("3d_fullres"), ``initial_lr`` (1e-2), ``batch_size`` (at most the plan's),
    ``threads`` (1), ``device`` ("auto"), ``mirroring`` (false: test-time mirroring in evaluation),
    ``regions`` (as the built-in segmentation algorithm's), ``val_fraction`` (0.2); see
    :mod:`laulima.nnunet.params`."""

    def __init__(self) -> None:
        self.ctx: SiteContext | None = None
        self.lr_history: list[float] = []
        """The optimizer's learning rate at each step of the last :meth:`train` (for tests and logs)."""
        self._split: tuple[SegmentationDataset, Split] | None = None

    def initial_weights(self, params: Mapping[str, Any], seed: int) -> Weights:
        return network_weights(initial_network(parse_params(params), seed, deep_supervision=True))

    def fingerprint(self, ctx: SiteContext) -> SiteFingerprint:
        """nnU-Net's fingerprint of the site's labelled training cases, as aggregates (no plan needed yet)."""
        from laulima.nnunet.fingerprint import site_fingerprint

        torch.set_num_threads(1)
        return site_fingerprint(Path(ctx.dataset_path), Path(ctx.work_dir))

    def setup(self, ctx: SiteContext) -> None:
        self.ctx = ctx
        self.params = parse_params(ctx.params)
        torch.set_num_threads(self.params.threads)
        self.device = pick_device(self.params.device)
        self.cache = Path(ctx.cache_dir) if ctx.cache_dir is not None else Path(ctx.work_dir)
        self._split = None

    def train(self, weights: Weights, config: TrainConfig) -> Update:
        ctx, p = self._context, self.params
        cases, _ = self._cases("train")
        data = preprocess_cases(p, cases, self.cache)
        epoch = math.ceil(len(cases) / p.batch_size)
        steps = config.local_steps if config.local_steps > 0 else max(1, config.local_epochs) * epoch
        seed = task_seed(config.seed, config.round, ctx.site)
        work = Path(ctx.work_dir)
        losses: list[float] = []
        self.lr_history = []
        with (
            nnunet_environment(data.root, work / "nnUNet_results", log=work / "nnunet-train.log"),
            _seeded(seed),
        ):
            trainer = _trainer(p, self.device)
            trainer.initialize()
            trainer.dataset_class = _dataset_class()  # (initialize picked nnU-Net's, which unpickles properties)
            load_weights(trainer.network, weights)
            if config.proximal_mu > 0:
                trainer.loss = _Proximal(trainer.loss, trainer.network, config.proximal_mu)
            loader, _ = trainer.get_dataloaders()
            _deterministic_blur(loader)
            trainer.set_deep_supervision_enabled(True)
            trainer.network.train()
            for step in range(steps):
                for group in trainer.optimizer.param_groups:
                    group["lr"] = poly_lr(p.initial_lr, config.progress, step, steps)
                out = trainer.train_step(next(loader))
                self.lr_history.append(float(trainer.optimizer.param_groups[0]["lr"]))
                losses.append(float(np.mean(out["loss"])))
            result = network_weights(trainer.network)
        result = {k: v if v.dtype == weights[k].dtype else v.astype(weights[k].dtype) for k, v in result.items()}
        metrics = {"loss": float(np.mean(losses)), "steps": float(steps)}
        return Update(weights=result, n_samples=len(cases), metrics=metrics)

    def evaluate(self, weights: Weights) -> Evaluation:
        ctx, p = self._context, self.params
        cases, source = self._cases("held_out")
        if source == "validation":
            print(
                f"{ctx.site}: the test split has no labels; scoring on {len(cases)} training subjects held out "
                f"for validation ({p.val_fraction:.0%})",
                file=sys.stderr,
            )
        network = build_network(p, deep_supervision=False)
        load_weights(network, weights)
        work = Path(ctx.work_dir)
        with nnunet_environment(None, work / "nnUNet_results", log=work / "nnunet-evaluate.log"):
            scores = _score(p, network.to(self.device), cases, self.device)
        metrics = scores.metrics()
        metrics.pop("loss", None)  # (nnU-Net's predictor gives no loss; the keys stay the built-in's otherwise)
        metrics["held_out_test"] = 1.0 if source == "test" else 0.0
        return Evaluation(n_samples=scores.n, metrics=metrics)

    def finalize(self) -> None:
        self._split = None

    # -- helpers -------------------------------------------------------------------------
    @property
    def _context(self) -> SiteContext:
        if self.ctx is None:
            raise RuntimeError("NnUNet.setup() was not called")
        return self.ctx

    def _cases(self, part: str) -> tuple[tuple[RawCase, ...], str]:
        """The raw-view cases of ``part`` ("train" or "held_out") and the held-out source ("test" | "validation").

        Split as the built-in algorithm splits (``split_cases``): labelled test cases are held
        out when there are any, otherwise the training cases whose ids hash lowest. Only the
        views a task needs are built (an evaluation on test cases never converts the training set).
        """
        if self._split is None:
            self._split = self._check_and_split()
        dataset, split = self._split
        if part == "held_out" and split.source == "test":
            view = cached_raw_view(dataset, self.cache, split="test", dataset_name=_RAW_NAME)
            return view.cases, split.source
        view = cached_raw_view(dataset, self.cache, split="training", dataset_name=_RAW_NAME)
        labelled = [case.id for case in dataset.training if case.label is not None]  # the view's order
        index = {case_id: view.cases[i] for i, case_id in enumerate(labelled)}
        chosen = split.train if part == "train" else split.held_out
        return tuple(index[c.id] for c in chosen if c.id in index), split.source

    def _check_and_split(self) -> tuple[SegmentationDataset, Split]:
        from laulima.imaging import load_dataset

        ctx, p = self._context, self.params
        dataset = load_dataset(Path(ctx.dataset_path))  # a DataError names every problem of the dataset
        where = f"site {ctx.site}, dataset {ctx.dataset!r}"
        if len(dataset.channels) != p.n_channels:
            channels = list(p.dataset_json["channel_names"].values())
            raise DataError(
                f"{where}: {dataset.root} has {len(dataset.channels)} image channel(s) {list(dataset.channels)}, "
                f"the experiment's nnU-Net plan takes {p.n_channels} ({channels}); register the dataset the "
                "experiment was made for",
                file=str(dataset.root),
            )
        if sorted(dataset.labels) != sorted(p.labels):
            raise DataError(
                f"{where}: {dataset.root} has labels {dict(sorted(dataset.labels.items()))}, the experiment's "
                f"dataset.json has {p.labels}; register the dataset the experiment was made for",
                file=str(dataset.root),
            )
        split = split_cases(dataset, p.val_fraction)
        n_train = sum(1 for case in split.train if case.label is not None)
        if not n_train or not split.held_out:
            raise DataError(
                f"{where}: {n_train} labelled training case(s) and {len(split.held_out)} to validate on; nnU-Net "
                "needs at least one of each (add labelled cases, or labels to the test cases)",
                file=str(dataset.root),
            )
        return dataset, split


# -- nnU-Net's pieces ------------------------------------------------------------------------------


@contextlib.contextmanager
def nnunet_environment(preprocessed: Path | None, results: Path, *, log: Path) -> Iterator[None]:
    """nnU-Net's folders and switches set for the block (and restored after), its prints appended to ``log``.

    No data-augmentation workers, no ``torch.compile`` (it starts compiler processes), no W&B.
    """
    values = {
        "nnUNet_preprocessed": str(preprocessed) if preprocessed is not None else None,
        "nnUNet_results": str(results),
        "nnUNet_n_proc_DA": "0",
        "nnUNet_compile": "false",
        "nnUNet_wandb_enabled": None,
    }
    Path(results).mkdir(parents=True, exist_ok=True)
    with environment(values), open(log, "a", encoding="utf-8") as out, contextlib.redirect_stdout(out):
        yield


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed the global RNGs nnU-Net's data loader and augmentation draw from; restore them after."""
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def _trainer(p: NnUNetParams, device: torch.device) -> Any:
    """nnU-Net's own ``nnUNetTrainer`` for the checked plan, fold "all" (every preprocessed case trains)."""
    import copy

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    plans = copy.deepcopy(p.plans)
    plans["continue_training"] = False  # (nnunetv2 2.8 pops this from the plans it is given)
    trainer = nnUNetTrainer(plans, p.configuration, "all", copy.deepcopy(p.dataset_json), device=device)
    trainer.initial_lr = p.initial_lr
    return trainer


def _dataset_class() -> type:
    """nnU-Net's blosc2 dataset reading the JSON properties :func:`preprocess_cases` writes: nothing is unpickled."""
    from laulima.nnunet.cache_io import JsonPropertiesDataset

    return JsonPropertiesDataset


def _deterministic_blur(loader: Any) -> None:
    """nnU-Net's Gaussian blur picks its FFT or direct path by timing both (``benchmark=True``); the two
    differ in rounding, so a timed choice would make a task's result depend on machine load. Both compute
    the same blur: fix the direct path."""
    transforms = getattr(getattr(getattr(loader, "data_loader", None), "transforms", None), "transforms", [])
    for transform in transforms:
        inner = getattr(transform, "transform", transform)
        if hasattr(inner, "benchmark"):
            inner.benchmark = False


class _Proximal(torch.nn.Module):
    """FedProx: nnU-Net's loss plus mu/2 * ||w - w_global||² (w_global: the weights the task started from)."""

    def __init__(self, loss: torch.nn.Module, network: torch.nn.Module, mu: float) -> None:
        super().__init__()
        self.loss, self.mu = loss, mu
        self.params = [p for p in network.parameters() if p.requires_grad]
        self.anchor = [p.detach().clone() for p in self.params]

    def forward(self, output: Any, target: Any) -> torch.Tensor:
        prox = sum(((p - a) ** 2).sum() for p, a in zip(self.params, self.anchor, strict=True))
        return self.loss(output, target) + 0.5 * self.mu * prox  # type: ignore[no-any-return]


def _score(p: NnUNetParams, network: torch.nn.Module, cases: tuple[RawCase, ...], device: torch.device) -> Scores:
    """Predict each case with nnU-Net's predictor in its original space and score it (the built-in's metrics)."""
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    plans_manager, configuration = managers(p)
    label_manager = plans_manager.get_label_manager(p.dataset_json)
    predictor = nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=p.mirroring,
        perform_everything_on_device=device.type == "cuda",
        device=device,
        verbose=False,
        verbose_preprocessing=False,
        allow_tqdm=False,
    )
    predictor.manual_initialization(
        network, plans_manager, configuration, [network.state_dict()], p.dataset_json, TRAINER_NAME, p.mirror_axes
    )
    preprocessor = DefaultPreprocessor(verbose=False)
    reader = plans_manager.image_reader_writer_class()
    foreground = [value for value in sorted(p.labels) if value != 0]
    dice, per_region = [], []
    for case in cases:
        data, _, properties = preprocessor.run_case(
            [str(f) for f in case.images], None, plans_manager, configuration, p.dataset_json
        )
        logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).cpu()
        predicted = np.asarray(
            convert_predicted_logits_to_segmentation_with_correct_shape(
                logits, plans_manager, configuration, label_manager, properties, num_threads_torch=p.threads
            )
        )
        truth = np.asarray(reader.read_seg(str(case.label))[0][0]).astype(np.int64)
        if predicted.shape != truth.shape:
            raise DataError(
                f"case {case.id}: prediction shape {predicted.shape} differs from its label's {truth.shape}",
                file=str(case.label),
            )
        spacing = [float(s) for s in properties["spacing"]]
        pred_t, truth_t = torch.from_numpy(predicted.astype(np.int64)), torch.from_numpy(truth)
        dice.append([region_dice(pred_t, truth_t, [value]) for value in foreground])
        per_region.append([region_scores(pred_t, truth_t, values, spacing) for _, values in p.regions])
    region_values = np.asarray(per_region, dtype=np.float64).reshape(len(cases), len(p.regions), 2)
    return Scores(
        names=tuple(metric_name(p.labels[value]) for value in foreground),
        case_ids=tuple(case.id for case in cases),
        dice=np.asarray(dice, dtype=np.float64).reshape(len(cases), len(foreground)),
        loss=np.zeros(len(cases)),
        regions=tuple(name for name, _ in p.regions),
        region_dice=region_values[..., 0],
        region_hd95=region_values[..., 1],
    )
