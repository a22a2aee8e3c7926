"""A site trains on DICOM studies it registered in place: through the agent, the gate and the
sandbox, with the built-in U-Net reading the series where they lie (and nothing else)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import load as st_load

from laulima.algorithms.segmentation import UNetSegmentation
from laulima.core.cohort import CohortFilter
from laulima.core.weights import sha256_hex, to_safetensors
from laulima.site.catalog import Catalog
from tests.helpers.dicom_study import write_study
from tests.site.test_site_agent import FakeHub, make_agent

ENTRY = "laulima.algorithms.segmentation:UNetSegmentation"
PARAMS = {
    "in_channels": 1,
    "out_channels": 2,
    "channels": [8, 16],
    "roi_size": [16, 16, 16],
    "threads": 1,
    "preprocessing": {"spacing_mm": 2.0},
}


def _studies(root: Path, n: int) -> None:
    """``n`` studies of a bright ball (labelled by a SEG) on a 2 mm grid, as a PACS export holds them."""
    grid = np.stack(np.meshgrid(*[np.arange(20)] * 3, indexing="ij"))
    for i in range(n):
        centre = np.array([10 + i % 3 - 1, 10, 10 - i % 2])
        ball = (np.linalg.norm(grid - centre[:, None, None, None], axis=0) < 5).astype(np.uint8)
        noise = np.random.default_rng(i).normal(0, 20, ball.shape)
        volume = (100.0 + 300.0 * ball + noise).clip(0, None).astype(np.int16)
        write_study(root / f"study-{i}", volume, np.diag([2.0, 2.0, 2.0, 1.0]), label=ball, names={1: "brain"})


def test_a_registered_dicom_dataset_trains_in_place_under_the_sandbox(make_task, tmp_path: Path):
    export = tmp_path / "pacs-export"
    _studies(export, 3)
    home = tmp_path / "site-a"
    Catalog(home, site="site-a").add("dicom-brains", export, tags=["t1"])
    start = UNetSegmentation().initial_weights(PARAMS, seed=0)
    blob = to_safetensors(start)
    hub = FakeHub(blob)
    config = {"local_steps": 2, "seed": 0, "params": PARAMS}
    common = {"algorithm": ENTRY, "weights_digest": sha256_hex(blob), "weights_size": len(blob), "config": config}
    hub.tasks += [
        make_task(id="whole", dataset="dicom-brains", **common),
        make_task(id="cohort", dataset="tag:t1", cohort=CohortFilter(modality="MR", has_label=True), **common),
    ]
    agent = make_agent(home, hub)
    agent.step()
    agent.step()
    assert hub.failures == {}, hub.failures
    for task_id in ("whole", "cohort"):
        body, _ = hub.uploads[task_id]
        trained = st_load(body)
        assert set(trained) == set(start)
        assert any(not np.array_equal(trained[k], start[k]) for k in start), "nothing was trained"
    # The filtered cohort was read from a view in the task's folder naming the registered series,
    # whose files stay where the export put them.
    view = (agent.task_dir("cohort") / "cohort" / "dataset.json").read_text()
    assert view.count(".series.json") == 3 and str(export) not in view
