"""The federation's dataset fingerprint end to end, with a real hub and three real agents:
`laulima experiment fingerprint` on the very spec used for training, one site refusing by
its policy's min_cohort (its reason shown in the experiment), the other two sites' cohorts
merged into nnU-Net's dataset_fingerprint.json and dataset.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from laulima.imaging import write_site_dataset
from laulima.sim import LocalFederation
from tests.helpers.federation import logs

pytestmark = pytest.mark.slow
pytest.importorskip("nnunetv2")

TRAINING_SPEC = """\
name = "brain-nnunet"
algorithm = "laulima.nnunet:NnUNet"
dataset = "brain-tumour"
rounds = 2
local_steps = 2
min_sites = 3
round_timeout_s = 900
seed = 0

[evaluation]
every = 2

[config]
configuration = "3d_fullres"
dataset_name = "BrainTumour"
threads = 1
"""

TRAIN_CASES = {"site-a": 3, "site-b": 4, "site-c": 5}


def _phantoms(dest: Path, index: int, n_sites: int, seed: int) -> None:
    write_site_dataset(
        dest, task="brain-tumour", site_index=index, n_sites=n_sites, seed=seed, n_train=3 + index, n_test=1
    )


def test_fingerprint_of_the_training_spec_with_one_site_under_its_min_cohort(tmp_path: Path) -> None:
    fed = LocalFederation(tmp_path / "fed", 3, "brain-tumour", dataset_writer=_phantoms).__enter__()
    try:
        policy = fed.workdir / "sites" / "site-c" / "policy.toml"  # site-c: at least 50 cases, or nothing
        policy.write_text("min_cohort = 50\n" + (policy.read_text() if policy.exists() else ""))
        policy.chmod(0o600)
        spec_file = tmp_path / "train.toml"
        spec_file.write_text(TRAINING_SPEC)
        scientist = fed.client._http.headers["Authorization"].removeprefix("Bearer ")
        env = {**os.environ, "COLUMNS": "200", "LAULIMA_HUB_URL": fed.hub.url, "LAULIMA_TOKEN": scientist}
        if fed.hub.ca_file:
            env["LAULIMA_CA_FILE"] = str(fed.hub.ca_file)

        def laulima(*args: str) -> subprocess.CompletedProcess[str]:
            cmd = [sys.executable, "-m", "laulima.cli", *args]
            return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)

        out = tmp_path / "plan"
        run = laulima("experiment", "fingerprint", str(spec_file), "--out", str(out), "--timeout", "800")
        assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\n{logs(fed)}"
        assert "rounds" in run.stdout and "local_steps" in run.stdout  # the training settings left out, said so
        assert "site-a, site-b" in run.stdout and "site-c" in run.stdout and "min_cohort is 50" in run.stdout

        [exp] = [e for e in fed.client.experiments() if e.mode == "fingerprint"]
        assert exp.status == "completed" and exp.name == "brain-nnunet-fingerprint" and exp.rounds == 0
        assert "dataset 'brain-tumour' has" in exp.site_notes["site-c"]
        assert "policy min_cohort is 50" in exp.site_notes["site-c"]
        merged = fed.client.fingerprint(exp.id)
        expected = TRAIN_CASES["site-a"] + TRAIN_CASES["site-b"]
        assert merged.sites == ["site-a", "site-b"] and merged.n_cases == expected
        assert "min_cohort is 50" in merged.failures["site-c"]

        fingerprint = json.loads((out / "dataset_fingerprint.json").read_text())
        dataset = json.loads((out / "dataset.json").read_text())
        assert fingerprint == merged.fingerprint and dataset == merged.dataset_json
        assert len(fingerprint["spacings"]) == len(fingerprint["shapes_after_crop"]) == expected
        assert dataset["numTraining"] == expected and dataset["labels"]["background"] == 0
        channels = fingerprint["foreground_intensity_properties_per_channel"]
        assert set(channels) == set(dataset["channel_names"])
        assert all(
            c["min"] <= c["percentile_00_5"] <= c["median"] <= c["percentile_99_5"] <= c["max"]
            for c in channels.values()
        )

        status = laulima("experiment", "status", str(exp.id))
        assert status.returncode == 0, status.stderr
        assert "dataset fingerprint" in status.stdout and "min_cohort is 50" in status.stdout
        # the sites' logs name no case values: only the count of the cases they summarised
        for name in ("site-a", "site-b"):
            assert f"({TRAIN_CASES[name]} cases)" in fed.sites[name].log_tail(400), fed.sites[name].log_tail()
    finally:
        fed.close()
