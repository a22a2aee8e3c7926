"""UNetSegmentation as a site runs it: preloaded by the zygote, then a forked child per task."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from laulima.algorithms.segmentation import UNetSegmentation
from laulima.site.worker import PARENT_ENV, RESULT_FILE, RESULT_WEIGHTS_FILE, TASK_FILE, WEIGHTS_FILE, write_safetensors
from laulima.site.zygote import Zygote
from tests.algorithms.test_segmentation_data import write_sphere_site

ENTRY = "laulima.algorithms.segmentation:UNetSegmentation"
PARAMS = {"in_channels": 1, "out_channels": 2, "channels": [8, 16], "roi_size": [16, 16, 16], "threads": 2}

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the zygote needs fork()")


def task_dir(root: Path, name: str, kind: str, dataset: Path, weights: dict[str, np.ndarray]) -> Path:
    folder = root / name
    folder.mkdir()
    write_safetensors(folder / WEIGHTS_FILE, weights, {})
    spec = {
        "task_id": name,
        "kind": kind,
        "algorithm": ENTRY,
        "site": "site-a",
        "dataset": "spheres",
        "dataset_path": str(dataset),
        "params": PARAMS,
        "round": 0,
        "local_epochs": 1,
        "local_steps": 2,
        "proximal_mu": 0.0,
        "seed": 0,
        "meta_keys": {"n_samples": "laulima.n_samples", "metrics": "laulima.metrics", "task": "laulima.task"},
    }
    (folder / TASK_FILE).write_text(json.dumps(spec))
    return folder


def test_preloaded_module_then_forked_tasks_train_and_evaluate(tmp_path: Path):
    dataset = write_sphere_site(tmp_path / "data", n_train=3, n_test=1, size=16)
    start = UNetSegmentation().initial_weights(PARAMS, seed=0)
    env = {**os.environ, PARENT_ENV: str(os.getpid())}
    proc = subprocess.Popen(
        [sys.executable, "-m", "laulima.site.worker", "--zygote"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    zygote = Zygote(proc, set())
    try:
        zygote.preload("laulima.algorithms.segmentation")
        for name, kind in (("t1", "train"), ("t2", "evaluate"), ("t3", "train")):
            folder = task_dir(tmp_path, name, kind, dataset, start)
            deadline = time.monotonic() + 120
            pid = zygote.fork(folder, deadline)
            assert pid is not None
            code = zygote.wait(pid, deadline)
            assert code == 0, (folder / "stderr.log").read_text()
            result = json.loads((folder / RESULT_FILE).read_text())
            if kind == "train":
                assert result["n_samples"] == 3 and result["metrics"]["steps"] == 2.0
                assert set(load_file(str(folder / RESULT_WEIGHTS_FILE))) == set(start)
            else:
                assert {"dice_sphere", "dice_mean", "loss"} <= set(result["metrics"])
        assert not zygote.no_preload, "the module must be preloadable (no threads at import)"
        assert zygote.alive
    finally:
        zygote.close()
