"""Federated vs centralized nnU-Net on the brain tumour phantoms, one budget, Dice per region.

The federated model comes from ``laulima sim examples/nnunet.toml --sites 3``: a real hub and
three agents fingerprint, plan with nnU-Net's planner, and train with nnU-Net's trainer.
The centralized model trains with the same plan, code and seed on all sites' training
cases pooled, for the federation's total number of optimizer steps (rounds × local steps ×
sites). Both are scored the same way, by the NnUNet algorithm's own evaluation at every
site on its test subjects. Prints one JSON line: Dice per BraTS region (whole tumour,
tumour core, enhancing tumour) and their mean, pooled over all test subjects and per site,
the ratio federated / centralized, and the wall times.

    python benchmarks/nnunet_federated.py [--rounds R] [--local-steps S] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from safetensors.numpy import load_file

from laulima.algorithms.base import SiteContext, TrainConfig
from laulima.core.spec import load_spec, parse_spec
from laulima.imaging import load_dataset
from laulima.nnunet.algorithm import NnUNet
from laulima.sim import run_simulation

SPEC = Path(__file__).resolve().parents[1] / "src" / "laulima" / "examples" / "nnunet.toml"
REGIONS = ("dice_wt", "dice_tc", "dice_et", "dice_mean")


def pooled_dataset(site_dirs: list[Path], dest: Path) -> Path:
    """Every site's training cases in one Decathlon folder: what only a simulation can build."""
    (dest / "imagesTr").mkdir(parents=True)
    (dest / "labelsTr").mkdir()
    entries = []
    for site_dir in site_dirs:
        for case in load_dataset(site_dir).training:
            assert case.label is not None
            name = f"{site_dir.parent.name}_{case.images[0].name}"
            shutil.copyfile(case.images[0], dest / "imagesTr" / name)
            shutil.copyfile(case.label, dest / "labelsTr" / name)
            entries.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = json.loads((site_dirs[0] / "dataset.json").read_text())
    meta.update(name="pooled", numTraining=len(entries), training=entries, numTest=0, test=[])
    meta.pop("laulima", None)
    (dest / "dataset.json").write_text(json.dumps(meta, indent=2))
    return dest


def scores(weights: dict[str, Any], params: dict[str, Any], sites: dict[str, Path], work: Path) -> dict[str, Any]:
    """The algorithm's own evaluation at every site; pooled = weighted by each site's test subjects."""
    per_site, counts = {}, {}
    for name, path in sites.items():
        algorithm = NnUNet()
        algorithm.setup(SiteContext(name, "brain-tumour", path, work / f"eval-{name}", params, seed=0))
        try:
            evaluation = algorithm.evaluate(weights)
        finally:
            algorithm.finalize()
        per_site[name] = {k: round(evaluation.metrics[k], 4) for k in REGIONS}
        counts[name] = evaluation.n_samples
    total = sum(counts.values())
    pooled = {k: round(sum(per_site[s][k] * counts[s] for s in sites) / total, 4) for k in REGIONS}
    return {"pooled": pooled, "per_site": per_site}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--local-steps", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    spec = load_spec(SPEC)
    data = spec.model_dump(mode="json")
    data["rounds"] = args.rounds or spec.rounds
    data["local_steps"] = args.local_steps or spec.local_steps
    data["evaluation"] = {"every": 0, "final": False}  # both models are scored below, the same way
    spec = parse_spec(data)
    n_sites = 3
    with tempfile.TemporaryDirectory(prefix="laulima-nnunet-") as tmp:
        workdir = args.workdir or Path(tmp) / "sim"
        started = time.monotonic()
        result = run_simulation(spec, n_sites, workdir)
        federated_s = time.monotonic() - started
        assert result.model_dir is not None, result.experiment.error
        plan_dir = workdir / "nnunet"
        params = {
            **spec.config,
            "plans": json.loads((plan_dir / "nnUNetPlans.json").read_text()),
            "dataset_json": json.loads((plan_dir / "dataset.json").read_text()),
        }
        sites = {p.name: p / spec.dataset for p in sorted((workdir / "data").iterdir())}
        federated = load_file(str(result.model_dir / "fold_all" / "model.safetensors"))

        budget = spec.rounds * spec.local_steps * n_sites
        started = time.monotonic()
        pooled = pooled_dataset(list(sites.values()), Path(tmp) / "pooled")
        central_algo = NnUNet()
        central_algo.setup(SiteContext("central", spec.dataset, pooled, Path(tmp) / "central", params, seed=spec.seed))
        try:
            update = central_algo.train(
                NnUNet().initial_weights(params, spec.seed),
                TrainConfig(round=1, local_steps=budget, seed=spec.seed, progress=(0.0, 1.0)),
            )
        finally:
            central_algo.finalize()
        central_s = time.monotonic() - started

        fed_scores = scores(federated, params, sites, Path(tmp))
        central_scores = scores(update.weights, params, sites, Path(tmp))
    result_line = {
        "benchmark": "nnunet_federated",
        "budget": {"rounds": spec.rounds, "local_steps": spec.local_steps, "sites": n_sites, "optimizer_steps": budget},
        "plan": {
            "configuration": spec.config.get("configuration", "3d_fullres"),
            "patch_size": params["plans"]["configurations"]["3d_fullres"]["patch_size"],
            "features_per_stage": params["plans"]["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"][
                "features_per_stage"
            ],
        },
        "federated": fed_scores,
        "centralized": central_scores,
        "federated_over_centralized": round(
            fed_scores["pooled"]["dice_mean"] / max(central_scores["pooled"]["dice_mean"], 1e-9), 4
        ),
        "wall_time_s": {"federated_sim": round(federated_s, 1), "centralized": round(central_s, 1)},
    }
    print(json.dumps(result_line))


if __name__ == "__main__":
    main()
