"""Federated nnU-Net end to end with a real hub and three real agents: the federation's
fingerprint, nnU-Net's planner, nnU-Net training at every site, and an exported results
folder that nnU-Net's own predictor loads and that `laulima predict` runs to the same labels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from laulima.core.protocol import ExperimentStatus
from laulima.core.spec import parse_spec
from laulima.export import export_experiment
from laulima.imaging import load_dataset, write_site_dataset
from laulima.nnunet.workflow import DATASET_FILE, FINGERPRINT_FILE, PLANS_FILE, plan_in_federation
from laulima.sim import LocalFederation
from tests.helpers.federation import logs

pytestmark = pytest.mark.slow

SPEC = {
    "name": "nnunet-e2e",
    "algorithm": "laulima.nnunet:NnUNet",
    "dataset": "brain-tumour",
    "rounds": 2,
    "local_steps": 2,
    "min_sites": 3,
    "round_timeout_s": 900,
    "seed": 0,
    "evaluation": {"every": 2},
    "config": {
        "configuration": "3d_fullres",
        "dataset_name": "BrainTumour",
        "threads": 1,
        "regions": {"wt": [1, 2, 3], "tc": [2, 3], "et": [3]},
        "planner": {"base_features": 4, "max_features": 16},
    },
}


def _small_phantoms(dest: Path, index: int, n_sites: int, seed: int) -> None:
    write_site_dataset(dest, task="brain-tumour", site_index=index, n_sites=n_sites, seed=seed, n_train=3, n_test=1)


def test_three_sites_train_nnunet_and_the_export_runs_in_nnunets_predictor(tmp_path: Path) -> None:
    spec = parse_spec(SPEC)
    plan_dir = tmp_path / "plan"
    fed = LocalFederation(tmp_path / "fed", 3, "brain-tumour", dataset_writer=_small_phantoms).__enter__()
    try:
        planned = plan_in_federation(
            spec, fed.submit, lambda i: fed.wait(i, timeout=600), fed.client.fingerprint, plan_dir
        )
        exp = fed.wait(fed.submit(planned).id, timeout=1200)
        assert exp.status == ExperimentStatus.COMPLETED, f"{exp.error}\n{logs(fed)}"
        evaluations = [m for m in fed.client.metrics(exp.id) if m.kind == "evaluate" and m.round == 2]
        assert sorted(m.site for m in evaluations) == ["site-a", "site-b", "site-c"], logs(fed)
        assert all(0.0 <= m.metrics["dice_wt"] <= 1.0 for m in evaluations)
        model = export_experiment(fed.client, exp.id, tmp_path / "results")
    finally:
        fed.close()

    # The plan came from the merged fingerprint of all 9 training cases.
    fingerprint = json.loads((plan_dir / FINGERPRINT_FILE).read_text())
    assert len(fingerprint["spacings"]) == 9 == json.loads((plan_dir / DATASET_FILE).read_text())["numTraining"]
    plans = json.loads((plan_dir / PLANS_FILE).read_text())
    assert plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"][0] == 4
    exported = json.loads((model / "plans.json").read_text())["configurations"]["3d_fullres"]
    wanted = planned.config["plans"]["configurations"]["3d_fullres"]  # the model is the network the plan made
    assert exported["patch_size"] == wanted["patch_size"] and exported["architecture"] == wanted["architecture"]
    assert exported["spacing"] == pytest.approx(wanted["spacing"])

    # One of site-a's test subjects, as nnU-Net's tools take it: one file per channel.
    case = load_dataset(tmp_path / "fed" / "data" / "site-a" / "brain-tumour").test[0]
    image = nib.load(case.images[0])
    volume = np.asarray(image.dataobj, dtype=np.float32)
    raw = tmp_path / "raw"
    raw.mkdir()
    for c in range(volume.shape[-1]):
        nib.save(nib.Nifti1Image(volume[..., c], image.affine), raw / f"case_0000_{c:04d}.nii.gz")

    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(
        str(model), use_folds=("all",), checkpoint_name="checkpoint_final.pth"
    )
    predictor.predict_from_files(
        str(raw), str(tmp_path / "nnunet-out"), save_probabilities=False, overwrite=True,
        num_processes_preprocessing=1, num_processes_segmentation_export=1,
    )  # fmt: skip
    theirs = np.asarray(nib.load(tmp_path / "nnunet-out" / "case_0000.nii.gz").dataobj)

    ours_file = tmp_path / "laulima-out.nii.gz"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "laulima.cli", "predict", "--model", str(model), "--input", str(case.images[0]),
         "--output", str(ours_file)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr + done.stdout
    ours = np.asarray(nib.load(ours_file).dataobj)
    assert ours.shape == theirs.shape == volume.shape[:3]
    np.testing.assert_array_equal(ours, theirs)
