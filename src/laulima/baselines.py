"""The reference points of a federated run: centralised and local-only training on the same budget.

``central`` pools every site's training subjects and trains one model; ``local`` trains one
model per site on that site alone. Every model gets the same budget, ``steps`` optimizer
steps: the federated run's total (rounds × local_steps × sites, as the demo passes it), so
a local-only model gets as much compute as the whole federation used, on its own site's
data. Same code as the federated algorithm (build_unet, the same transforms, batch size,
loss and Dice), the same initial weights (``initial_weights(params, seed)``), and Adam
created once per model: with no rounds there is nothing to reset.

Every model is scored on every site's held-out subjects (see
:func:`laulima.algorithms.segmentation.data.split_cases`) with :func:`evaluate_on_sites`,
which the demo also uses for the federated model's final weights, so all arms are
measured by one function.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from laulima.algorithms.segmentation import data, engine
from laulima.algorithms.segmentation.algorithm import check_dataset
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
from laulima.errors import ConfigurationError, DataError
from laulima.imaging import load_dataset

__all__ = ["BaselineModel", "BaselineResult", "Progress", "evaluate_on_sites", "run_baseline"]

Progress = Callable[[str, int, int, float], None]
"""``on_progress(model, step, total_steps, loss)`` after each optimizer step; ``model`` is
``"central"`` or the site's name."""


@dataclass(frozen=True)
class BaselineModel:
    """One trained baseline model, its scores on every site and its weights."""

    name: str
    trained_on: tuple[str, ...]
    n_train: int
    steps: int
    train_loss: float
    """Mean training loss over the steps."""
    seconds: float
    evaluation: dict[str, Any]
    """``{"per_site": {site: {"dice_<class>", "dice_mean", "loss", "n"}}, "pooled": {...}}``."""
    weights: Weights


@dataclass(frozen=True)
class BaselineResult:
    mode: str
    steps: int
    seed: int
    models: dict[str, BaselineModel]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """JSON-able: everything but the weights."""
        return {
            "mode": self.mode,
            "steps": self.steps,
            "seed": self.seed,
            "seconds": self.seconds,
            "models": {
                name: {
                    "trained_on": list(m.trained_on),
                    "n_train": m.n_train,
                    "steps": m.steps,
                    "train_loss": m.train_loss,
                    "seconds": m.seconds,
                    **m.evaluation,
                }
                for name, m in self.models.items()
            },
        }


@dataclass(frozen=True)
class _Site:
    train: list[data.Sample]
    held_out: list[data.Sample]
    labels: dict[int, str]


def run_baseline(
    mode: Literal["central", "local"],
    site_datasets: Mapping[str, Path],
    params: Mapping[str, Any],
    *,
    steps: int,
    seed: int,
    on_progress: Progress | None = None,
    score: bool = True,
) -> BaselineResult:
    """Train the ``central`` model or one ``local`` model per site for ``steps`` steps each, score all.

    ``score=False`` leaves the scoring to someone else (the demo has the sites score the
    centralized model through the hub); the models' ``evaluation`` is then empty."""
    if mode not in ("central", "local"):
        raise ConfigurationError(f"baseline mode {mode!r}: expected 'central' or 'local'", field="mode")
    if steps < 1:
        raise ConfigurationError(f"baseline steps = {steps}: must be at least 1", field="steps")
    p = parse_params(params)
    started = time.perf_counter()
    with _threads(p.threads):
        sites = _load_sites(site_datasets, p, scoring_only=False, training_only=not score)
        plan = {"central": list(sites)} if mode == "central" else {name: [name] for name in sites}
        models = {}
        for name, members in plan.items():
            samples = [s for member in members for s in sites[member].train]
            models[name] = _train_one(name, members, samples, sites if score else {}, p, steps, seed, on_progress)
    return BaselineResult(mode=mode, steps=steps, seed=seed, models=models, seconds=time.perf_counter() - started)


def evaluate_on_sites(
    weights: Mapping[str, np.ndarray], site_datasets: Mapping[str, Path], params: Mapping[str, Any]
) -> dict[str, Any]:
    """Score ``weights`` on every site's held-out subjects: per site, and pooled over all subjects."""
    p = parse_params(params)
    with _threads(p.threads):
        sites = _load_sites(site_datasets, p, scoring_only=True)
        model = initial_model(p, 0).to(pick_device(p.device))  # (leaves the global RNG alone)
        load_numpy_weights(model, weights)
        return _score(model, sites, p)


def _train_one(
    name: str,
    members: list[str],
    samples: list[data.Sample],
    sites: dict[str, _Site],
    p: SegmentationParams,
    steps: int,
    seed: int,
    on_progress: Progress | None,
) -> BaselineModel:
    started = time.perf_counter()
    model = initial_model(p, seed).to(pick_device(p.device))
    optimizer = torch.optim.Adam(model.parameters(), lr=p.lr)  # once per model: no rounds to reset at
    batch_seed = int(np.random.SeedSequence([seed, zlib.crc32(name.encode("utf-8"))]).generate_state(1)[0])
    on_step = None if on_progress is None else (lambda step, loss: on_progress(name, step, steps, loss))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(batch_seed)
        stats = engine.train_steps(
            model,
            optimizer,
            data.batches(samples, p.batch_size, p.roi_size, batch_seed),
            steps,
            loss_fn=engine.make_loss(),
            on_step=on_step,
            lr_at=lambda i: learning_rate(p, (0.0, 1.0), i, steps),
        )
    seconds = time.perf_counter() - started
    return BaselineModel(
        name=name,
        trained_on=tuple(members),
        n_train=len(samples),
        steps=steps,
        train_loss=stats["loss"],
        seconds=seconds,
        evaluation=_score(model, sites, p) if sites else {},
        weights=state_dict_to_numpy(model),  # the model is dropped: its storage is the weights'
    )


def _score(model: torch.nn.Module, sites: dict[str, _Site], p: SegmentationParams) -> dict[str, Any]:
    labels = next(iter(sites.values())).labels
    per_site: dict[str, engine.Scores] = {
        name: engine.evaluate(
            model,
            site.held_out,
            p.roi_size,
            labels,
            overlap=p.sw_overlap,
            regions=p.regions,
            spacing_mm=p.preprocessing.spacing_mm,
        )
        for name, site in sites.items()
    }
    pooled = engine.Scores.concat(list(per_site.values()))
    return {
        "per_site": {name: {**scores.metrics(), "n": scores.n} for name, scores in per_site.items()},
        "pooled": {**pooled.metrics(), "n": pooled.n},
    }


def _load_sites(
    site_datasets: Mapping[str, Path], p: SegmentationParams, *, scoring_only: bool, training_only: bool = False
) -> dict[str, _Site]:
    if not site_datasets:
        raise ConfigurationError("no site datasets given", field="site_datasets")
    sites: dict[str, _Site] = {}
    first: tuple[str, dict[int, str]] | None = None
    for name in sorted(site_datasets):
        dataset = load_dataset(Path(site_datasets[name]))
        check_dataset(dataset, p, where=f"site {name}")
        labels = dict(dataset.labels)
        if first is not None and labels != first[1]:
            raise DataError(
                f"site {name}: labels {labels} differ from site {first[0]}'s {first[1]}; "
                "the sites must share one label map to be compared",
                site=name,
            )
        first = first or (name, labels)
        split = data.split_cases(dataset, p.val_fraction)
        sites[name] = _Site(
            train=[] if scoring_only else data.load_samples(split.train, p.in_channels, p.preprocessing),
            held_out=[] if training_only else data.load_samples(split.held_out, p.in_channels, p.preprocessing),
            labels=labels,
        )
    return sites


@contextmanager
def _threads(n: int) -> Iterator[None]:
    """Use ``n`` torch threads inside the block, then what the caller had (this runs in the caller's process)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
