"""The demonstration: federated brain tumour segmentation across three simulated hospitals.

It generates MRI phantoms per site — hospitals that differ in cohort size, scanner and case
mix —, runs the federated experiment through a real hub and real site agents, and lets the
sites themselves produce the comparison a reader came for: after the last round every site
trains a local-only model on the same budget it spent in the federation, and the final
global model and every local model are evaluated at every site (the cross-site matrix). The
centralized reference — all sites' data pooled, possible only in a simulation — is trained
here and sent back through the hub as an evaluation-only experiment, so every number in the
comparison was computed by the sites on their own test subjects. Then the report, the
TensorBoard logs and the model are written.

``--task brain-tissue`` runs the earlier demo (CSF, grey and white matter on T1w phantoms).

``--dp`` adds site-level differential privacy (each site clips and noises its update; target
ε 8 at δ 1e-5 unless ``--epsilon``), ``--secure-aggregation`` masks the updates so the hub
learns only their sum (with both, the noise is distributed among the sites). Either turns the
local-only models off — they would leave their sites without clipping, noise or masking — so
the comparison is federated against centralized, and the report says so and shows the ε each
site spent per round.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from laulima.core.crosssite import GLOBAL, MODEL, local_label, pooled, round_records
from laulima.core.protocol import (
    CrossSiteCell,
    CrossSiteMatrix,
    ExperimentPhase,
    ExperimentPublic,
    ExperimentStatus,
    MetricRecord,
    TaskKind,
)
from laulima.core.spec import ExperimentSpec, parse_spec
from laulima.core.weights import Weights, from_safetensors, to_safetensors
from laulima.errors import ConfigurationError, LaulimaError
from laulima.report import ArmEvaluation, ReportData, report_meta, write_report
from laulima.sim import LocalFederation, site_names
from laulima.terminal import (
    SimProgress,
    budget_line,
    comparison_table,
    comparison_verdict,
    privacy_line,
    privacy_settings,
    privacy_settings_line,
)

__all__ = [
    "DEFAULT_DELTA",
    "DEFAULT_EPSILON",
    "PRESETS",
    "TASKS",
    "UPDATE_CLIP",
    "DemoOutcome",
    "DemoPreset",
    "presets",
    "read_privacy_utility",
    "read_strategy_comparison",
    "run_demo",
]

ALGORITHM = "laulima.algorithms.segmentation:UNetSegmentation"
TASKS = ("brain-tumour", "brain-tissue")

DEFAULT_EPSILON = 8.0
"""``laulima demo --dp``'s target ε over all rounds (``--epsilon`` changes it)."""
DEFAULT_DELTA = 1e-5
UPDATE_CLIP = 1.35
"""L2 bound of a site's update (its model minus the model it was given) under ``--dp`` and
``--secure-aggregation``. Chosen near the median norm of the step, which clips about half the
updates (DP-FedAvg's usual choice, Andrew et al. 2021): the quick tumour preset run once
without noise (``noise_multiplier = 0``, clip 1e6, so nothing was clipped) wrote 60 norms into
the sites' audit logs (``update_norm``; 3 sites x 20 rounds): median 1.354, quartiles 0.80 and
1.89, falling from 3.4 in round 1 to 0.14-0.19 in round 20 as the poly learning rate decays."""


@dataclass(frozen=True)
class DemoPreset:
    """Everything that sizes a demo run; ``steps_per_arm`` is each model's budget."""

    name: str
    rounds: int
    local_steps: int
    task: str = "brain-tumour"
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
    lr_schedule: str = "constant"
    """``poly``: nnU-Net's decay over each model's whole training (rounds, or a baseline's steps)."""
    seed: int = 0
    round_timeout_s: float = 900.0
    evaluate_every: int = 1
    strategy: Mapping[str, Any] = field(default_factory=lambda: {"name": "fedavg"})
    """The spec's ``[strategy]`` table (benchmarks/strategies.py swaps it)."""
    target_epsilon: float | None = None
    """Site-level differential privacy (the spec's ``[privacy]``): the ε over all rounds the hub
    calibrates the noise to; None (and no ``noise_multiplier``): no differential privacy."""
    noise_multiplier: float | None = None
    """Given instead of ``target_epsilon``: the noise std over ``clip`` (0: clipping only, ε = ∞)."""
    delta: float = DEFAULT_DELTA
    clip: float = UPDATE_CLIP
    """L2 bound of a site's update, for differential privacy and secure aggregation alike."""
    secure_aggregation: bool = False
    """The spec's ``[secure_aggregation]``: the hub learns only the sum of the sites' updates."""
    dp_mode: str | None = None
    """``local`` or ``distributed``; None: distributed under secure aggregation, else local."""

    @property
    def differential_privacy(self) -> bool:
        return self.target_epsilon is not None or self.noise_multiplier is not None

    @property
    def private(self) -> bool:
        """Differential privacy or secure aggregation: then no site trains a local-only model
        (it would leave its site without clipping, noise or masking; the spec refuses it)."""
        return self.differential_privacy or self.secure_aggregation

    def privacy_table(self) -> dict[str, Any] | None:
        """The spec's ``[privacy]`` table, or None."""
        if not self.differential_privacy:
            return None
        mode = self.dp_mode or ("distributed" if self.secure_aggregation else "local")
        table: dict[str, Any] = {"mode": mode, "clip": self.clip, "delta": self.delta}
        if self.noise_multiplier is not None:
            table["noise_multiplier"] = self.noise_multiplier
        else:
            table["target_epsilon"] = self.target_epsilon
        return table

    def secure_aggregation_table(self) -> dict[str, Any] | None:
        """The spec's ``[secure_aggregation]`` table, or None."""
        return {"clip": self.clip} if self.secure_aggregation else None

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
            "lr_schedule": self.lr_schedule,
            "threads": 1,
            # The phantoms' grid, stated so the model card records it and `laulima predict` resamples to it.
            "preprocessing": {"spacing_mm": self.spacing_mm, "orientation": "RAS"},
        }

    def spec(self, *, cross_site: bool = False) -> ExperimentSpec:
        """The federated experiment; ``cross_site``: the sites also evaluate every model (the
        comparison the demo prints) and, unless the run is private, train local-only models."""
        local_models = cross_site and not self.private
        data: dict[str, Any] = {
            "name": f"{self.task}-{self.strategy['name']}-{self.name}",
            "algorithm": ALGORITHM,
            "dataset": self.task,
            "rounds": self.rounds,
            "local_steps": self.local_steps,
            "min_sites": self.n_sites,
            "round_timeout_s": self.round_timeout_s,
            "seed": self.seed,
            "strategy": dict(self.strategy),
            "evaluation": {
                "every": self.evaluate_every, "final": True, "cross_site": cross_site, "local_models": local_models,
            },
            "config": self.params(),
        }  # fmt: skip
        if (privacy := self.privacy_table()) is not None:
            data["privacy"] = privacy
        if (secagg := self.secure_aggregation_table()) is not None:
            data["secure_aggregation"] = secagg
        return parse_spec(data, source=f"demo preset {self.name!r}")

    def evaluation_spec(self, model: str) -> ExperimentSpec:
        """An evaluation-only experiment: the sites score a model trained elsewhere."""
        return parse_spec(
            {
                "name": f"{self.task}-{model}-{self.name}",
                "mode": "evaluate",
                "algorithm": ALGORITHM,
                "dataset": self.task,
                "min_sites": self.n_sites,
                "round_timeout_s": self.round_timeout_s,
                "seed": self.seed,
                "config": self.params(),
            },
            source=f"demo preset {self.name!r}",
        )


def _tumour(name: str, rounds: int, evaluate_every: int) -> DemoPreset:
    """The tumour demo's sites and model. A U-Net of 8..64 feature maps trains twice as fast
    as 16..128 on 2 cores and, given the rounds that buys, ends closer to the centralized
    model; short local work (10 steps) and many rounds keep the sites' models from drifting
    apart, and the decaying learning rate lets the average settle (benchmarks/brain_federated.py)."""
    return DemoPreset(
        name, rounds=rounds, local_steps=10, evaluate_every=evaluate_every, cohorts=(10, 4, 30), n_test=6,
        unet_channels=(8, 16, 32, 64), num_res_units=1, lr=2e-3, lr_schedule="poly",
    )  # fmt: skip


TUMOUR_PRESETS: dict[str, DemoPreset] = {
    # Under 5 minutes on 2 cores, baselines included.
    "quick": _tumour("quick", rounds=20, evaluate_every=5),
    # Under 20 minutes on 2 cores: see benchmarks/brain_federated.py for what it reaches.
    "default": _tumour("default", rounds=60, evaluate_every=6),
    # A smoke run for the test suite: one round of a tiny U-Net on 32^3 phantoms.
    "test": DemoPreset(
        "test", rounds=1, local_steps=2, n_sites=2, cohorts=(2, 3), n_test=1, shape=(32, 32, 32),
        unet_channels=(4, 8, 16), num_res_units=1,
    ),
}  # fmt: skip

TISSUE_PRESETS: dict[str, DemoPreset] = {
    "quick": DemoPreset("quick", rounds=8, local_steps=10, task="brain-tissue"),
    # 20 x 20 reached 0.95 x centralized; short local work and many rounds keep sites together.
    "default": DemoPreset("default", rounds=40, local_steps=10, task="brain-tissue", evaluate_every=2),
    "test": DemoPreset(
        "test", rounds=1, local_steps=2, task="brain-tissue", n_sites=2, cohorts=(2, 3), n_test=1,
        shape=(32, 32, 32), unet_channels=(4, 8, 16), num_res_units=1,
    ),
}  # fmt: skip

PRESETS = TUMOUR_PRESETS
"""The headline demo's presets (brain tumour)."""


def presets(task: str) -> dict[str, DemoPreset]:
    """The presets of ``task`` (``brain-tumour``, the headline, or ``brain-tissue``)."""
    if task not in TASKS:
        raise ConfigurationError(f"--task {task!r}: choose one of {', '.join(TASKS)}", field="task")
    return TUMOUR_PRESETS if task == "brain-tumour" else TISSUE_PRESETS


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
    privacy: dict[str, Any] | None = None
    """The privacy settings the hub ran (noise multiplier calibrated), or None."""


def run_demo(
    preset: DemoPreset,
    workdir: Path,
    console: Console | None = None,
    *,
    baselines: bool = True,
    strategy_comparison: list[dict[str, Any]] | None = None,
    privacy_utility: dict[str, Any] | None = None,
) -> DemoOutcome:
    """Run the whole demonstration under ``workdir`` (replaced if it exists).

    ``baselines``: also the local-only models (trained and scored by the sites; not under
    differential privacy or secure aggregation) and the centralized model; without them only
    the federated model is scored (at every site). ``strategy_comparison``: rows of
    benchmarks/strategies.py for the report; ``privacy_utility``: the line of
    benchmarks/privacy_utility.py."""
    from laulima.baselines import run_baseline
    from laulima.demo_overlay import prediction_overlay
    from laulima.export import export_model
    from laulima.imaging import write_site_dataset
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
    with console.status(f"generating {preset.task} phantoms (MNI152 template; each site its own scanner and cohort)…"):
        for i, name in enumerate(names):
            n_train = preset.cohorts[i % len(preset.cohorts)] if preset.cohorts else None
            datasets[name] = write_site_dataset(
                workdir / "data" / name / preset.task, task=preset.task, site_index=i, n_sites=preset.n_sites,
                seed=preset.seed, n_train=n_train, n_test=preset.n_test, spacing_mm=preset.spacing_mm,
                shape=preset.shape,
            )  # fmt: skip
    sites_info = {name: _site_info(path) for name, path in datasets.items()}
    times["phantoms"] = time.monotonic() - t
    for name, info in sites_info.items():
        console.print(
            f"  {name}: {info['train_subjects']} training + {info['test_subjects']} test phantoms, {info['profile']}"
        )

    # 2. Federated training through a real hub and real agents; then, at the sites, the
    #    local-only models and the cross-site evaluation of every model.
    spec = preset.spec(cross_site=baselines)
    console.print(
        f"[bold]federated[/]: {spec.rounds} rounds x {spec.local_steps} steps on {preset.n_sites} sites, "
        f"{spec.strategy.name} (hub and agents as separate processes; logs under {workdir})"
    )
    if preset.private and baselines:
        console.print(f"  [yellow]no local-only models[/]: {_NO_LOCAL_MODELS}")
    t = time.monotonic()
    with LocalFederation(workdir, preset.n_sites, preset.task, seed=preset.seed) as fed:
        exp = fed.submit(spec)
        _announce_dashboard(console, fed, exp.id, workdir)
        if preset.private:  # as the hub accepted it: target_epsilon calibrated into noise_multiplier
            console.print(f"  {escape(privacy_settings_line(privacy_settings(exp.spec)))}")
        phase_seen: dict[ExperimentPhase | None, float] = {}
        """When each phase was first seen: the local models' share of the wall time."""
        with SimProgress(console, spec.rounds) as progress:

            def on_progress(e: ExperimentPublic, m: list[MetricRecord]) -> None:
                phase_seen.setdefault(e.phase, time.monotonic())
                progress.update(e, m)

            exp = fed.wait(exp.id, timeout=_timeout(preset, spec.rounds), on_progress=on_progress)
        _check_completed(exp, workdir)
        privacy = privacy_settings(exp.spec)  # as the hub ran it: target_epsilon calibrated into noise_multiplier
        # The per-round records; those of round rounds + 1 (labelled by model) are the cross-site matrix.
        metrics = round_records(fed.client.metrics(exp.id))
        weights = {"federated": _download(fed, exp.id, None, workdir / "global.safetensors")}
        times["federated"] = time.monotonic() - t
        arms: list[ArmEvaluation] = []
        if baselines:
            matrix = fed.client.cross_site(exp.id)
            if ExperimentPhase.LOCAL_MODELS in phase_seen:
                times["local_models_and_cross_site"] = time.monotonic() - phase_seen[ExperimentPhase.LOCAL_MODELS]
            arms.append(_arm("federated", _row(matrix, GLOBAL), preset.steps_per_arm, times["federated"]))
            for site in names:
                label = local_label(site)
                if label in matrix.cells:
                    arms.append(_arm(label, _row(matrix, label), preset.steps_per_site, 0.0))
                    weights[label] = _download(fed, exp.id, label, workdir / f"{label.replace(':', '-')}.safetensors")
            for failure in matrix.failures:
                console.print(f"[yellow]cross-site: {failure.model} at {failure.site}: {failure.reason}[/]")

            # 3. The centralized reference, trained here on the pooled data, scored by the sites.
            steps = preset.steps_per_arm
            t = time.monotonic()
            with console.status(f"centralized baseline: {steps} optimizer steps on all sites' data pooled…"):
                threads = max(1, min(os.cpu_count() or 1, 4))  # the agents are idle now
                central = run_baseline(
                    "central", datasets, {**params, "threads": threads}, steps=steps, seed=preset.seed, score=False
                )
            weights["centralized"] = central.models["central"].weights
            evaluation = fed.client.evaluate(
                preset.evaluation_spec("centralized").model_dump(mode="json"), to_safetensors(weights["centralized"])
            )
            evaluation = fed.wait(evaluation.id, timeout=_timeout(preset, 0))
            _check_completed(evaluation, workdir)
            row = _row(fed.client.cross_site(evaluation.id), MODEL)
            times["centralized"] = time.monotonic() - t
            arms.insert(1, _arm("centralized", row, steps, times["centralized"]))
        else:
            arms.append(
                _arm("federated", _final_evaluation(metrics, exp.rounds_done), preset.steps_per_arm, times["federated"])
            )

    # 4. The model, TensorBoard, a look at one test subject, the report and the verdict.
    spec_json = spec.model_dump(mode="json")
    if "privacy" in spec_json and exp.spec.get("privacy"):
        spec_json["privacy"] = exp.spec["privacy"]  # with the noise multiplier the hub calibrated
    overlay = prediction_overlay(datasets, weights, params)
    model_dir = export_model(
        weights["federated"], params, workdir / "model",
        card={
            "experiment": exp.name, "rounds": exp.rounds_done, "sites": names, "strategy": spec.strategy.name,
            "spec": spec_json, "dice_pooled": arms[0].pooled,
            "data": "synthetic brain MRI phantoms from the MNI152 template (not patients)",
        },
    )  # fmt: skip
    tb_dir = write_tensorboard(workdir / "tensorboard" / exp.name, metrics)
    times["total"] = time.monotonic() - started
    budget = {
        "rounds": spec.rounds, "local_steps": spec.local_steps, "sites": preset.n_sites,
        "optimizer_steps_federated_and_centralized": preset.steps_per_arm,
        "optimizer_steps_per_local_model": preset.steps_per_site, "batch_size": preset.batch_size,
        "unet_channels": list(preset.unet_channels), "volume": f"{preset.shape} at {preset.spacing_mm} mm",
    }  # fmt: skip
    if preset.private:  # no local-only models to budget for
        del budget["optimizer_steps_per_local_model"]
    n_parameters = sum(int(w.size) for w in weights["federated"].values())
    notes = _notes(preset, baselines, privacy, n_parameters=n_parameters)
    data = ReportData(
        title=f"Laulima demo: federated {_TITLES[preset.task]} ({preset.name} preset)",
        description=(
            "All images are synthetic phantoms generated from the MNI152 template shipped with nilearn, "
            "with a different simulated scanner, cohort size and case mix per site. They are not patients."
        ),
        labels=_labels(datasets),
        sites=sites_info,
        budget=budget,
        rounds=metrics,
        arms=arms,
        wall_time_s=times,
        notes=notes,
        meta=report_meta(strategy=spec.strategy.name, seed=preset.seed, spec=spec_json),
        overlay=overlay,
        strategy_comparison=strategy_comparison,
        privacy=privacy,
        privacy_utility=privacy_utility,
        absent={"local-only models": _NO_LOCAL_MODELS} if baselines and preset.private else {},
    )
    html = write_report(data, workdir / "report")
    console.print(comparison_table(arms, budget_line=budget_line(budget), sites=names))
    if baselines:
        console.print(comparison_verdict(arms, sites=names).line())
        if preset.private:
            console.print(f"[yellow]no local-only models[/]: {_NO_LOCAL_MODELS}")
    if privacy is not None:
        console.print(escape(privacy_settings_line(privacy)))
        if (spent := privacy_line(metrics, delta=privacy.get("delta"))) is not None:
            console.print(f"[bold]{escape(spent)}[/]")
        for note in _privacy_notes(preset, privacy, n_parameters)[-1:]:
            if note.startswith("Scale of the noise"):  # why the private model scores what it scores
                console.print(f"[yellow]{escape(note)}[/]")
    console.print(f"report → {html}\nmodel → {model_dir}\nTensorBoard → tensorboard --logdir {tb_dir.parent}")
    return DemoOutcome(
        html, html.with_name("report.json"), model_dir, tb_dir, exp.id, metrics, arms, times, privacy=privacy
    )


_NO_LOCAL_MODELS = (
    "under differential privacy or secure aggregation no site trains a local-only model — it would leave its "
    "site without clipping, noise or masking (the spec sets evaluation.local_models = false) — so the comparison "
    "is federated against centralized, with the global model evaluated at every site"
)


_TITLES = {"brain-tumour": "brain tumour segmentation", "brain-tissue": "brain tissue segmentation"}


def _timeout(preset: DemoPreset, rounds: int) -> float:
    """Long enough for ``rounds`` rounds, the local models (as long again) and the evaluations."""
    return preset.round_timeout_s * (2 * rounds + 3)


def _check_completed(exp: ExperimentPublic, workdir: Path) -> None:
    if exp.status != ExperimentStatus.COMPLETED:
        raise LaulimaError(f"experiment {exp.name} {exp.status}: {exp.error}; logs are under {workdir}")


def _download(fed: LocalFederation, experiment_id: int, model: str | None, dest: Path) -> Weights:
    path = fed.client.download_model(experiment_id, dest, model=model)
    return from_safetensors(path.read_bytes(), where=str(path))


def _row(matrix: CrossSiteMatrix, model: str) -> tuple[dict[str, CrossSiteCell], CrossSiteCell]:
    """One model's results at each site and pooled over all sites' test subjects."""
    if model not in matrix.cells:
        reasons = "; ".join(f"{f.site}: {f.reason}" for f in matrix.failures if f.model == model) or "no site reported"
        raise LaulimaError(f"experiment {matrix.experiment_id}: no evaluation of the {model} model ({reasons})")
    return matrix.cells[model], matrix.pooled[model]


def _final_evaluation(metrics: list[MetricRecord], round_index: int) -> tuple[dict[str, CrossSiteCell], CrossSiteCell]:
    """The global model's last per-round evaluation at each site (when there is no cross-site matrix)."""
    cells = {
        m.site: CrossSiteCell(n_samples=m.n_samples, metrics=dict(m.metrics))
        for m in round_records(metrics)
        if m.kind == TaskKind.EVALUATE and m.round == round_index
    }
    if not cells:
        raise LaulimaError(f"no site evaluated the final model of round {round_index}")
    return cells, pooled(cells.values())


def _arm(name: str, row: tuple[dict[str, CrossSiteCell], CrossSiteCell], steps: int, seconds: float) -> ArmEvaluation:
    per_site, total = row
    return ArmEvaluation(
        name,
        {site: {**cell.metrics, "n": float(cell.n_samples)} for site, cell in per_site.items()},
        {**total.metrics, "n": float(total.n_samples)},
        steps,
        seconds,
    )


def _site_info(dataset_dir: Path) -> dict[str, Any]:
    """Cohort sizes and what makes the site differ: its scanner and (tumour) case mix."""
    from laulima.imaging import load_dataset

    ds = load_dataset(dataset_dir)
    described = json.loads((dataset_dir / "dataset.json").read_text(encoding="utf-8")).get("laulima", {})
    scanner, lesions = described.get("scanner", {}), described.get("tumour_profile")
    info: dict[str, Any] = {"train_subjects": len(ds.training), "test_subjects": len(ds.test)}
    info.update({f"scanner_{k}": v for k, v in scanner.items()})
    if lesions:
        info.update({f"case_mix_{k}": v for k, v in lesions.items()})
    parts = [f"scanner {scanner.get('name', '?')}"] + ([f"case mix {lesions.get('name', '?')}"] if lesions else [])
    info["profile"] = ", ".join(parts)
    return info


def _labels(datasets: dict[str, Path]) -> dict[int, str]:
    from laulima.imaging import load_dataset

    return dict(load_dataset(next(iter(datasets.values()))).labels)


def _notes(
    preset: DemoPreset, baselines: bool, privacy: Mapping[str, Any] | None = None, *, n_parameters: int = 0
) -> list[str]:
    local_models = baselines and not preset.private
    scored = "global model's and each local-only model's" if local_models else "global model's"
    notes = [
        f"Every score was computed by the sites on their own test subjects and reported through the hub: the "
        f"{scored} in the federated experiment's cross-site evaluation, the "
        "centralized model's in an evaluation-only experiment. 'Pooled' weighs each site by its test subjects.",
    ]
    if baselines:
        notes.append(
            f"The centralized model was trained for {preset.steps_per_arm} optimizer steps on all sites' training "
            f"data pooled — possible only in a simulation: the federated run's total ({preset.rounds} rounds x "
            f"{preset.local_steps} local steps x {preset.n_sites} sites)."
            + (" It has no differential privacy, so the gap to it includes what privacy costs." if privacy else "")
        )
        if local_models:
            notes.append(
                f"Each local-only model was trained by its site, on its own data only, for {preset.steps_per_site} "
                "steps: what that site computed in the federation, so the local-only models together use the same "
                "budget. Those models left their sites to be evaluated at the others."
            )
        else:
            notes.append(f"No local-only models: {_NO_LOCAL_MODELS}.")
    if privacy is not None:
        notes += _privacy_notes(preset, privacy, n_parameters)
    notes.append(
        "The segmentation overlay is drawn by the demo from one site's test phantom, which only a simulation can read."
    )
    if preset.task == "brain-tumour":
        notes.append(
            "Tumour scores follow the BraTS convention: whole tumour (all lesion labels), tumour core (non-enhancing "
            "and enhancing) and enhancing tumour; mean Dice is their mean, HD95 the 95th-percentile Hausdorff distance."
        )
    return notes


def _privacy_notes(preset: DemoPreset, privacy: Mapping[str, Any], n_parameters: int) -> list[str]:
    """What the privacy settings mean for this run, with the size of the noise against the signal."""
    from laulima.core.privacy.tasks import secure_threshold

    clip = privacy.get("clip")
    notes = ["The sites clipped their updates."]
    if isinstance(clip, int | float):
        why = (
            ", near the median norm of a site's step measured in the quick preset without differential privacy "
            "(UPDATE_CLIP in laulima/demo.py)"
            if clip == UPDATE_CLIP
            else ""
        )
        notes = [
            f"Each site clipped the step of its update (its model minus the model it was given) to L2 norm {clip:g} "
            f"before it left the site{why}."
        ]
    if privacy.get("secure_aggregation"):
        notes.append(
            "Secure aggregation: the sites masked their quantised updates, so the hub learned only their sum, never "
            "one site's update."
        )
    sigma = privacy.get("noise_multiplier")
    if privacy.get("differential_privacy") and isinstance(sigma, int | float) and isinstance(clip, int | float):
        n = preset.n_sites
        distributed = privacy.get("mode") == "distributed"
        # Noise std per coordinate of the averaged update: local, n sites each add sigma*C; distributed, each adds
        # sigma*C/sqrt(t) (t: the secure-aggregation threshold), so the sum carries sigma*C*sqrt(n/t).
        threshold = secure_threshold(n, None) if distributed else 1
        per_coordinate = sigma * clip * math.sqrt(n / threshold) / n
        target = privacy.get("target_epsilon")
        calibrated = f", calibrated by the hub for ε = {target:g} over {preset.rounds} rounds" if target else ""
        notes.append(
            f"Site-level differential privacy ({privacy.get('mode')}): Gaussian noise of std {sigma:.3g} x {clip:g}"
            + (" in all, shared among the sites under secure aggregation" if distributed else " added by every site")
            + f" (noise multiplier {sigma:.3g}{calibrated}, δ = {privacy.get('delta'):g}). Each site accounted its "
            "own ε after every round (the privacy_epsilon train metric, tabled in this report)."
        )
        if n_parameters:
            noise_norm = per_coordinate * math.sqrt(n_parameters)
            notes.append(
                f"Scale of the noise: the averaged update carries noise of std {per_coordinate:.3g} on each of the "
                f"model's {n_parameters:,} parameters, an L2 norm of about {noise_norm:.3g}, against at most "
                f"{clip:g} for the average of the clipped steps. With {n} sites site-level differential privacy "
                "costs much accuracy; DP-FedAvg is designed for federations of many more sites."
            )
    return notes


def read_privacy_utility(path: Path) -> dict[str, Any]:
    """The JSON line benchmarks/privacy_utility.py printed (the file's last non-empty line), for the report."""
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"{path}: cannot read the privacy-utility line ({exc})", file=str(path)) from exc
    if not lines:
        raise ConfigurationError(
            f"{path}: empty; expected the line benchmarks/privacy_utility.py prints", file=str(path)
        )
    try:
        line = json.loads(lines[-1])
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"{path}, line {len(lines)}: not JSON ({exc.msg})", file=str(path)) from exc
    runs = line.get("runs") if isinstance(line, dict) else None
    if not isinstance(runs, list) or not all(isinstance(r, dict) and "dice_mean" in r for r in runs):
        raise ConfigurationError(
            f"{path}: expected an object with 'runs', each with a 'dice_mean' (the line of "
            "benchmarks/privacy_utility.py)",
            file=str(path),
        )
    return line


def read_strategy_comparison(path: Path) -> list[dict[str, Any]]:
    """The JSON lines benchmarks/strategies.py printed, for the report; a bad line is named."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"{path}: cannot read the strategy comparison ({exc})", file=str(path)) from exc
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigurationError(f"{path}, line {number}: not JSON ({exc.msg})", file=str(path)) from exc
        if not isinstance(row, dict) or "strategy" not in row:
            raise ConfigurationError(
                f"{path}, line {number}: expected an object with a 'strategy' (a line of benchmarks/strategies.py)",
                file=str(path),
            )
        rows.append(row)
    return rows


def _announce_dashboard(console: Console, fed: LocalFederation, experiment_id: int, workdir: Path) -> None:
    """Where to watch the run live: the hub's dashboard, signed in with the demo scientist's
    token (written owner-only beside the logs, never printed)."""
    from laulima.private_files import write_atomic

    token_file = workdir / "dashboard.token"
    write_atomic(token_file, fed.client.token + "\n")
    console.print(
        f"  watch it live: {fed.hub.url}/ui/experiments/{experiment_id} - sign in with the token in {token_file} "
        "(the demo's hub has a throwaway certificate authority, so the browser asks you to accept its certificate)"
    )
