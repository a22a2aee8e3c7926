"""The agent's privacy step on a real update file: what may leave the site after it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from laulima.core.privacy.accountant import GaussianRelease, epsilon
from laulima.core.privacy.messages import TaskPrivacy, TaskSecureAggregation
from laulima.core.privacy.quantize import dequantize, scale_for
from laulima.core.protocol import MetaKey, TaskKind, TaskPublic
from laulima.site.update_privacy import EPSILON_METRIC, QUANTIZED_TENSOR, privatize_update

SHAPES = {"a.weight": (200, 50), "b.bias": (50,)}


def _task(privacy: TaskPrivacy | None = None, secagg: TaskSecureAggregation | None = None, round_: int = 3):
    return TaskPublic(
        id="0" * 32, experiment_id=1, experiment_name="e", round=round_, kind=TaskKind.TRAIN, algorithm="x:Y",
        dataset="d", config={}, weights_digest="0" * 64, weights_size=1, deadline=time.time() + 60,
        seconds_left=60, time_limit_s=60, upload_nonce="n", rounds=5, privacy=privacy, secure_aggregation=secagg,
    )  # fmt: skip


def _files(tmp_path: Path, scale: float) -> tuple[Path, Path, dict, dict]:
    rng = np.random.default_rng(0)
    given = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    update = {k: (v + scale * rng.standard_normal(v.shape)).astype(np.float32) for k, v in given.items()}
    g, u = tmp_path / "given.safetensors", tmp_path / "update.safetensors"
    save_file(given, str(g))
    save_file(update, str(u), metadata={MetaKey.N_SAMPLES: "40", MetaKey.METRICS: json.dumps({"loss": 0.3})})
    return g, u, given, update


def _step(path: Path, given: dict) -> np.ndarray:
    out = load_file(str(path))
    return np.concatenate([(out[k].astype(np.float64) - given[k]).ravel() for k in sorted(given)])


def test_without_noise_the_step_is_clipped_and_nothing_else_changes(tmp_path):
    g, u, given, _ = _files(tmp_path, scale=1.0)
    privacy = TaskPrivacy(mode="local", clip=2.0, noise_multiplier=0.0, delta=1e-5)
    done = privatize_update(_task(privacy), u, g)
    step = _step(u, given)
    assert done.clipped and done.norm > 50
    assert np.linalg.norm(step) == pytest.approx(2.0, rel=1e-4), "the step on disk is the clipped one"
    with safe_open(str(u), framework="numpy") as f:
        meta = f.metadata()
    assert meta[MetaKey.N_SAMPLES] == "40"
    assert json.loads(meta[MetaKey.METRICS])["loss"] == 0.3


def test_local_noise_has_the_stated_std_and_epsilon_is_the_accountants(tmp_path):
    g, u, given, _ = _files(tmp_path, scale=1.0)
    privacy = TaskPrivacy(mode="local", clip=1.0, noise_multiplier=2.0, delta=1e-5)
    done = privatize_update(_task(privacy, round_=3), u, g)
    step = _step(u, given)
    assert done.noise_std == 2.0
    assert np.std(step) == pytest.approx(2.0, rel=0.02), "noise of std noise_multiplier x clip per coordinate"
    with safe_open(str(u), framework="numpy") as f:
        metrics = json.loads(f.metadata()[MetaKey.METRICS])
    assert metrics[EPSILON_METRIC] == pytest.approx(epsilon([GaussianRelease(2.0, count=3)], 1e-5), abs=1e-9)


def test_under_secure_aggregation_only_the_weighted_quantised_step_remains(tmp_path):
    g, u, given, update = _files(tmp_path, scale=0.001)
    config = TaskSecureAggregation(clip=10.0, sites=3, threshold=2, max_weight=25, bound=250.0, phase_timeout_s=5)
    done = privatize_update(_task(secagg=config), u, g)
    stored = load_file(str(u))
    assert list(stored) == [QUANTIZED_TENSOR] and stored[QUANTIZED_TENSOR].dtype == np.int32
    assert done.weight == 25, "its 40 samples, capped at the round's max_weight"
    got = dequantize(stored[QUANTIZED_TENSOR].view(np.uint32), scale_for(250.0, 3))
    expected = 25 * np.concatenate([(update[k].astype(np.float64) - given[k]).ravel() for k in sorted(given)])
    assert np.abs(got - expected).max() <= 1 / scale_for(250.0, 3)
    with safe_open(str(u), framework="numpy") as f:
        assert f.metadata()[MetaKey.N_SAMPLES] == "25", "the weight the site applied"


def test_the_private_file_is_owner_only(tmp_path):
    g, u, _, _ = _files(tmp_path, scale=0.1)
    u.chmod(0o644)
    privatize_update(_task(TaskPrivacy(mode="local", clip=1.0, noise_multiplier=1.0, delta=1e-5)), u, g)
    assert u.stat().st_mode & 0o077 == 0
