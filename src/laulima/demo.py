"""The demonstration: federated brain MRI segmentation across three simulated hospitals.

It generates brain MRI phantoms per site (each with its own scanner and cohort size),
runs FedAvg through a real hub and real site agents, trains the centralized and the
local-only baselines on the same optimizer-step budget, evaluates every model on every
site's held-out test phantoms, and writes the report, TensorBoard logs and the model.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from rich.console import Console

from laulima.core.protocol import ExperimentStatus, MetricRecord
from laulima.core.spec import ExperimentSpec, parse_spec
from laulima.core.weights import from_safetensors
from laulima.errors import LaulimaError
from laulima.report import ArmEvaluation, ReportData, write_report
from laulima.sim import LocalFederation, site_names
from laulima.terminal import SimProgress, metrics_table

__all__ = ["PRESETS", "DemoOutcome", "DemoPreset", "run_demo"]

ALGORITHM = "laulima.algorithms.segmentation:UNetSegmentation"


@dataclass(frozen=True)
class DemoPreset:
    """Everything that sizes a demo run; ``steps_per_arm`` is each model's budget."""

    name: str
    rounds: int
    local_steps: int
    task: str = "brain-tissue"
    n_sites: int = 3
    cohorts: tuple[int, ...] | None = None
    """Training subjects per site; None: the phantom generator's imbalanced default (6/12/24)."""
    n_test: int = 4
    shape: tuple[int, int, int] = (48, 48, 48)
    spacing_mm: float = 4.0
    unet_channels: tuple[int, ...] = (16, 32, 64, 128)
    num_res_units: int = 2
    batch_size: int = 2
    lr: float = 1e-3
    seed: int = 0
    round_timeout_s: float = 900.0
    evaluate_every: int = 1

    @property
    def steps_per_arm(self) -> int:
        """Optimizer steps of the federated run, summed over sites: the centralized model gets
        as many, and so do the local-only models together."""
        return self.rounds * self.local_steps * self.n_sites

    @property
    def steps_per_site(self) -> int:
        """What one site computed in the federation: each local-only model's budget."""
        return self.rounds * self.local_steps

    def params(self) -> dict[str, Any]:
        """The algorithm's parameters (the spec's ``config`` table)."""
        return {
            "task": self.task,
            "channels": list(self.unet_channels),
            "strides": [2] * (len(self.unet_channels) - 1),
            "num_res_units": self.num_res_units,
            "roi_size": list(self.shape),
            "batch_size": self.batch_size,
            "lr": self.lr,
            "threads": 1,
            # The phantoms' grid, stated so the model card records it and `laulima predict` resamples to it.
            "preprocessing": {"spacing_mm": self.spacing_mm, "orientation": "RAS"},
        }

    def spec(self) -> ExperimentSpec:
        return parse_spec(
            {
                "name": f"{self.task}-fedavg-{self.name}",
                "algorithm": ALGORITHM,
                "dataset": self.task,
                "rounds": self.rounds,
                "local_steps": self.local_steps,
                "min_sites": self.n_sites,
                "round_timeout_s": self.round_timeout_s,
                "seed": self.seed,
                "strategy": {"name": "fedavg"},
                "evaluation": {"every": self.evaluate_every, "final": True},
                "config": self.params(),
            },
            source=f"demo preset {self.name!r}",
        )


PRESETS: dict[str, DemoPreset] = {
    # Under 5 minutes on 2 cores.
    "quick": DemoPreset("quick", rounds=8, local_steps=10),
    # Under 15 minutes on 2 cores: 1200 optimizer steps for the federated and the centralized
    # model. Short local work (10 steps) and many rounds keep the sites' models from drifting
    # apart between averages; 20 x 20 reached 0.95 x centralized, see benchmarks/.
    "default": DemoPreset("default", rounds=40, local_steps=10, evaluate_every=2),
    # A smoke run for the test suite: one round of a tiny U-Net on 32^3 phantoms.
    "test": DemoPreset(
        "test", rounds=1, local_steps=2, n_sites=2, cohorts=(2, 3), n_test=1, shape=(32, 32, 32),
        unet_channels=(4, 8, 16), num_res_units=1,
    ),
}


@dataclass
class DemoOutcome:
    report_html: Path
    report_json: Path
    model_dir: Path
    tensorboard_dir: Path
    experiment_id: int
    metrics: list[MetricRecord]
    arms: list[ArmEvaluation]
    wall_time_s: dict[str, float] = field(default_factory=dict)


def run_demo(
    preset: DemoPreset, workdir: Path, console: Console | None = None, *, baselines: bool = True
) -> DemoOutcome:
    """Run the whole demonstration under ``workdir`` (replaced if it exists)."""
    from laulima.baselines import evaluate_on_sites, run_baseline
    from laulima.export import export_model
    from laulima.imaging import site_profile, write_site_dataset
    from laulima.tracking import write_tensorboard

    console = console or Console()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    times: dict[str, float] = {}
    started = time.monotonic()
    names = site_names(preset.n_sites)
    params = preset.params()

    # 1. Phantoms, written per site exactly where each site's agent will find them.
    t = time.monotonic()
    datasets: dict[str, Path] = {}
    sites_info: dict[str, dict[str, Any]] = {}
    with console.status("generating brain MRI phantoms (MNI152 template, one scanner profile per site)…"):
        for i, name in enumerate(names):
            n_train = preset.cohorts[i % len(preset.cohorts)] if preset.cohorts else None
            datasets[name] = write_site_dataset(
                workdir / "data" / name / preset.task, task=preset.task, site_index=i, n_sites=preset.n_sites,
                seed=preset.seed, n_train=n_train, n_test=preset.n_test, spacing_mm=preset.spacing_mm,
                shape=preset.shape,
            )
            sites_info[name] = _site_info(datasets[name], site_profile(i, preset.seed))
    times["phantoms"] = time.monotonic() - t
    for name, info in sites_info.items():
        console.print(f"  {name}: {info['train_subjects']} training + {info['test_subjects']} test phantoms")

    # 2. Federated training through a real hub and real agents.
    spec = preset.spec()
    console.print(
        f"[bold]federated[/]: {spec.rounds} rounds x {spec.local_steps} steps on {preset.n_sites} sites "
        f"(hub and agents as separate processes; logs under {workdir})"
    )
    t = time.monotonic()
    with LocalFederation(workdir, preset.n_sites, preset.task, seed=preset.seed) as fed:
        exp = fed.submit(spec)
        with SimProgress(console, spec.rounds) as progress:
            exp = fed.wait(exp.id, timeout=preset.round_timeout_s * (spec.rounds + 1), on_progress=progress.update)
        if exp.status != ExperimentStatus.COMPLETED:
            raise LaulimaError(f"the federated experiment {exp.status}: {exp.error}; logs are under {workdir}")
        metrics = fed.client.metrics(exp.id)
        model_file = fed.client.download_model(exp.id, workdir / "global.safetensors")
    times["federated"] = time.monotonic() - t
    console.print(metrics_table(metrics, last_round_only=True))
    weights = from_safetensors(model_file.read_bytes(), where=str(model_file))

    # 3. Every model is judged by the same evaluation on every site's test phantoms.
    t = time.monotonic()
    fed_eval = evaluate_on_sites(weights, datasets, params)
    arms = [_arm("federated", fed_eval, preset.steps_per_arm, times["federated"])]
    times["evaluation"] = time.monotonic() - t
    if baselines:
        modes: tuple[tuple[Literal["central", "local"], int], ...] = (
            ("central", preset.steps_per_arm),
            ("local", preset.steps_per_site),
        )
        for mode, steps in modes:
            t = time.monotonic()
            with console.status(f"{mode} baseline: {steps} optimizer steps per model…"):
                # The sites shared the cores during the federated run; a baseline has them alone.
                threads = max(1, min(os.cpu_count() or 1, 4))
                result = run_baseline(mode, datasets, {**params, "threads": threads}, steps=steps, seed=preset.seed)
            times[f"{mode}_baseline"] = time.monotonic() - t
            arms.extend(_baseline_arms(result))

    # 4. The model, TensorBoard and the report.
    model_dir = export_model(
        weights, params, workdir / "model",
        card={
            "experiment": exp.name, "rounds": exp.rounds_done, "sites": names, "strategy": spec.strategy.name,
            "spec": spec.model_dump(mode="json"), "dice_pooled": arms[0].pooled,
            "data": "synthetic brain MRI phantoms from the MNI152 template (not patients)",
        },
    )
    tb_dir = write_tensorboard(workdir / "tensorboard" / exp.name, metrics)
    times["total"] = time.monotonic() - started
    data = ReportData(
        title=f"Laulima demo: federated brain MRI segmentation ({preset.name} preset)",
        description=(
            "All images are synthetic phantoms generated from the MNI152 template shipped with nilearn, "
            "with a different simulated scanner per site. They are not patients."
        ),
        labels=_labels(datasets),
        sites=sites_info,
        budget={
            "rounds": spec.rounds, "local_steps": spec.local_steps, "sites": preset.n_sites,
            "optimizer_steps_federated_and_centralized": preset.steps_per_arm,
            "optimizer_steps_per_local_model": preset.steps_per_site, "batch_size": preset.batch_size,
            "unet_channels": list(preset.unet_channels), "volume": f"{preset.shape} at {preset.spacing_mm} mm",
        },
        rounds=metrics,
        arms=arms,
        wall_time_s=times,
        notes=_notes(preset),
    )
    html = write_report(data, workdir / "report")
    console.print(f"report → {html}\nmodel → {model_dir}\nTensorBoard → tensorboard --logdir {tb_dir.parent}")
    return DemoOutcome(html, html.with_name("report.json"), model_dir, tb_dir, exp.id, metrics, arms, times)


def _site_info(dataset_dir: Path, profile: Any) -> dict[str, Any]:
    from laulima.imaging import load_dataset

    ds = load_dataset(dataset_dir)
    info: dict[str, Any] = {"train_subjects": len(ds.training), "test_subjects": len(ds.test)}
    info.update({f"scanner_{k}": v for k, v in asdict(profile).items()})
    return info


def _labels(datasets: dict[str, Path]) -> dict[int, str]:
    from laulima.imaging import load_dataset

    return dict(load_dataset(next(iter(datasets.values()))).labels)


def _arm(name: str, evaluation: Any, steps: int, seconds: float) -> ArmEvaluation:
    return ArmEvaluation(name, _per_site(evaluation), dict(evaluation["pooled"]), steps, seconds)


def _per_site(evaluation: Any) -> dict[str, dict[str, float]]:
    return {site: {k: float(v) for k, v in m.items()} for site, m in evaluation["per_site"].items()}


def _baseline_arms(result: Any) -> list[ArmEvaluation]:
    """One arm per baseline model: "centralized", or "local:<site>" for each site alone."""
    arms = []
    for model in result.models.values():
        name = "centralized" if result.mode == "central" else f"local:{model.trained_on[0]}"
        arms.append(_arm(name, model.evaluation, model.steps, model.seconds))
    return arms


def _notes(preset: DemoPreset) -> list[str]:
    return [
        f"The centralized model was trained for {preset.steps_per_arm} optimizer steps: the federated run's "
        f"total ({preset.rounds} rounds x {preset.local_steps} local steps x {preset.n_sites} sites).",
        f"Each local-only model was trained for {preset.steps_per_site} steps on its own site's data: what "
        "that site computed in the federation, so the local-only models together use the same budget.",
        "Dice is computed per test subject and averaged; 'pooled' averages over all sites' test subjects.",
    ]
