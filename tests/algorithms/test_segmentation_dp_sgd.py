"""Sample-level DP-SGD in UNetSegmentation: per-case clipping, noise, Poisson sampling, ε, and the worker's refusal."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from laulima.algorithms.base import DpSgd, SiteContext, TrainConfig
from laulima.algorithms.identity import Identity
from laulima.algorithms.segmentation import UNetSegmentation, build_unet, initial_model, make_loss
from laulima.algorithms.segmentation.data import Sample, poisson_batches
from laulima.algorithms.segmentation.dp_sgd import sampling_rate, train_steps_private
from laulima.core.privacy.accountant import GaussianRelease, epsilon
from laulima.core.privacy.messages import TaskDpSgd, TaskPrivacy
from laulima.core.protocol import TaskKind, TaskPublic
from laulima.core.weights import sha256_hex, to_safetensors
from laulima.errors import AlgorithmError, ConfigurationError
from laulima.site.runner import TaskRunner
from laulima.site.worker import TASK_FILE, WEIGHTS_FILE, write_safetensors
from tests.algorithms.test_segmentation_data import write_sphere_site

TINY = {"in_channels": 1, "out_channels": 2, "channels": [4, 8], "num_res_units": 1, "roi_size": [16, 16, 16]}
DP = DpSgd(noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-5)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sphere_site(tmp_path_factory.mktemp("spheres"), n_train=5, n_test=1, size=16, seed=2)


def algo(path: Path, **params: object) -> UNetSegmentation:
    a = UNetSegmentation()
    a.setup(SiteContext(site="site-a", dataset="spheres", dataset_path=path, work_dir=path, params={**TINY, **params}))
    return a


def flat(weights: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([weights[k].astype(np.float64).ravel() for k in sorted(weights)])


def test_dp_sgd_keeps_the_schema_reports_the_accountants_epsilon_and_leaves_the_model_plain(site: Path):
    a = algo(site)
    start = a.initial_weights(TINY, seed=0)
    config = TrainConfig(round=3, local_steps=2, seed=7)
    private = a.train(start, TrainConfig(round=3, local_steps=2, seed=7, dp_sgd=DP))
    again = a.train(start, TrainConfig(round=3, local_steps=2, seed=7, dp_sgd=DP))

    assert [(k, v.shape, v.dtype) for k, v in private.weights.items()] == [
        (k, v.shape, v.dtype) for k, v in start.items()
    ]
    assert all(np.isfinite(v).all() for v in private.weights.values())
    assert private.n_samples == 5
    q = 2 / 5  # batch_size 2 of the 5 training cases
    expected = epsilon([GaussianRelease(DP.noise_multiplier, count=2 * 3, sampling_rate=q)], DP.delta)
    assert set(private.metrics) == {"loss", "steps", "dp_sgd_epsilon"}
    assert private.metrics["dp_sgd_epsilon"] == pytest.approx(expected, rel=1e-12)
    assert private.metrics["steps"] == 2.0
    # The noise and the sample come from the OS, not the seed the hub knows: same task, other weights.
    assert not np.array_equal(flat(private.weights), flat(again.weights))

    # Opacus's hooks are gone: plain training after DP-SGD matches a fresh instance's, bit for bit.
    plain = a.train(start, config)
    fresh = algo(site).train(start, config)
    assert set(plain.metrics) == {"loss", "steps"}
    assert all(np.array_equal(plain.weights[k], fresh.weights[k]) for k in start)
    assert not any(hasattr(p, "grad_sample") or hasattr(p, "summed_grad") for p in a.model.parameters())


def test_each_cases_gradient_is_clipped_on_its_own():
    """One SGD step (lr 1, no noise) must move the weights by minus the mean of the per-case
    gradients, each clipped to max_grad_norm: neither the plain mean gradient nor the mean
    gradient clipped as a whole."""
    torch.manual_seed(0)
    model = build_unet(TINY)
    image = torch.randn(3, 1, 16, 16, 16)
    label = torch.zeros(3, 1, 16, 16, 16)
    label[:, :, 4:12, 4:12, 4:12] = 1.0
    image[1], label[1] = image[0], 1.0 - label[0]  # case 1 pulls against case 0
    label[2] = 0.0  # case 2 has no foreground
    loss_fn, clip = make_loss(), 1e-3
    names = [n for n, _ in model.named_parameters()]

    def gradient(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        model.zero_grad()
        loss_fn(model(x), y).backward()
        return torch.cat([p.grad.detach().flatten() for p in model.parameters()])

    per_case = [gradient(image[i : i + 1], label[i : i + 1]) for i in range(3)]
    assert min(float(g.norm()) for g in per_case) > 100 * clip  # every case is clipped
    clipped = torch.stack([g * min(1.0, clip / (float(g.norm()) + 1e-6)) for g in per_case]).mean(0)
    whole = gradient(image, label)
    whole_clipped = whole * clip / float(whole.norm())
    model.zero_grad(set_to_none=True)

    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    train_steps_private(
        model,
        torch.optim.SGD(model.parameters(), lr=1.0),
        itertools.repeat((image, label)),
        1,
        noise_multiplier=0.0,
        max_grad_norm=clip,
        expected_batch_size=3,
        loss_fn=loss_fn,
    )
    step = before - torch.cat([p.detach().flatten() for p in model.parameters()])
    assert [n for n, _ in model.named_parameters()] == names
    assert float(step.norm()) <= clip * (1 + 1e-4)
    assert torch.allclose(step, clipped, atol=1e-3 * clip)
    assert float((step - whole_clipped).norm()) > 0.2 * clip
    assert float((step - whole).norm()) > 0.5 * float(whole.norm())


def test_an_empty_poisson_batch_still_adds_noise_of_std_sigma_c_over_the_expected_batch():
    model = build_unet(TINY)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    empty = (torch.zeros(0, 1, 16, 16, 16), torch.zeros(0, 1, 16, 16, 16))
    stats = train_steps_private(
        model,
        torch.optim.SGD(model.parameters(), lr=1.0),
        itertools.repeat(empty),
        1,
        noise_multiplier=2.0,
        max_grad_norm=0.5,
        expected_batch_size=4,
        loss_fn=make_loss(),
        generator=torch.Generator().manual_seed(0),
    )
    step = before - torch.cat([p.detach().flatten() for p in model.parameters()])
    assert step.numel() > 1000
    assert float(step.std()) == pytest.approx(2.0 * 0.5 / 4, rel=0.1)
    assert abs(float(step.mean())) < 0.02
    assert np.isnan(stats["loss"])  # no case: no loss to report


def test_poisson_batches_take_each_case_at_most_once_with_probability_q():
    label = torch.zeros(1, 16, 16, 16, dtype=torch.uint8)
    label[0, 6:10, 6:10, 6:10] = 1
    samples = [Sample(id=str(i), image=torch.full((1, 16, 16, 16), float(i)), label=label) for i in range(8)]
    rng = np.random.default_rng(3)
    sizes, counts = [], np.zeros(8)
    for image, lab in itertools.islice(poisson_batches(samples, 0.25, (8, 8, 8), seed=1, rng=rng), 200):
        assert image.shape[1:] == (1, 8, 8, 8) and lab.shape == (len(image), 1, 8, 8, 8)
        ids = [int(x[0, 0, 0, 0]) for x in image]
        assert len(ids) == len(set(ids))  # one crop per case and batch
        sizes.append(len(ids))
        counts[ids] += 1
    assert 0 in sizes and len(set(sizes)) >= 4  # the batch size varies, and may be empty
    assert np.mean(sizes) == pytest.approx(2.0, rel=0.15)
    assert np.all(np.abs(counts / 200 - 0.25) < 0.1)
    assert sampling_rate(2, 8) == 0.25 and sampling_rate(16, 8) == 1.0


def test_batch_norm_and_a_noiseless_dp_sgd_are_refused(site: Path):
    a = algo(site, norm="batch")
    with pytest.raises(ConfigurationError, match="norm = 'instance'") as info:
        a.train(a.initial_weights({**TINY, "norm": "batch"}, seed=0), TrainConfig(round=1, local_steps=1, dp_sgd=DP))
    assert info.value.context["field"] == "config.norm"
    assert not a._samples, "refused before any case is read"
    for bad in ({"noise_multiplier": 0.0}, {"max_grad_norm": float("nan")}, {"delta": 1.0}):
        with pytest.raises(ConfigurationError, match="privacy.dp_sgd"):
            DpSgd(**{"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5, **bad})  # type: ignore[arg-type]


def task(algorithm: str, params: dict[str, object], blob: bytes, *, dp_sgd: bool = True) -> TaskPublic:
    privacy = TaskPrivacy(
        mode="local",
        clip=1.0,
        noise_multiplier=0.5,
        delta=1e-6,
        dp_sgd=TaskDpSgd(noise_multiplier=1.3, max_grad_norm=0.7) if dp_sgd else None,
    )
    return TaskPublic(
        id="t-dp",
        experiment_id=1,
        experiment_name="exp",
        round=2,
        kind=TaskKind.TRAIN,
        algorithm=algorithm,
        dataset="spheres",
        config={"local_steps": 2, "seed": 1, "params": params},
        weights_digest=sha256_hex(blob),
        weights_size=len(blob),
        deadline=time.time() + 600,
        seconds_left=600.0,
        time_limit_s=120.0,
        upload_nonce="n",
        privacy=privacy,
    )


def test_the_site_runs_dp_sgd_from_the_tasks_privacy(site: Path, tmp_path: Path):
    weights = UNetSegmentation().initial_weights(TINY, seed=0)
    write_safetensors(tmp_path / WEIGHTS_FILE, weights, {})
    entry = "laulima.algorithms.segmentation:UNetSegmentation"
    result = TaskRunner().run(task(entry, TINY, to_safetensors(weights)), tmp_path, site="site-a", dataset_path=site)
    spec = json.loads((tmp_path / TASK_FILE).read_text())
    assert spec["dp_sgd"] == {"noise_multiplier": 1.3, "max_grad_norm": 0.7, "delta": 1e-6}
    release = GaussianRelease(1.3, count=2 * 2, sampling_rate=2 / 5)
    assert result.metrics["dp_sgd_epsilon"] == pytest.approx(epsilon([release], 1e-6), rel=1e-9)


def test_an_algorithm_without_dp_sgd_refuses_the_task(tmp_path: Path):
    assert not Identity.supports_dp_sgd and UNetSegmentation.supports_dp_sgd
    weights = Identity().initial_weights({"model_mb": 0.001}, seed=0)
    write_safetensors(tmp_path / WEIGHTS_FILE, weights, {})
    entry = "laulima.algorithms.identity:Identity"
    with pytest.raises(AlgorithmError) as info:
        TaskRunner().run(
            task(entry, {"model_mb": 0.001}, to_safetensors(weights)), tmp_path, site="s", dataset_path=tmp_path
        )
    message = str(info.value)
    assert "DP-SGD" in message and "Identity" in message
    assert "laulima.algorithms.segmentation" in message

    # Without [privacy.dp_sgd] the same algorithm trains, and task.json says so.
    (tmp_path / "plain").mkdir()
    write_safetensors(tmp_path / "plain" / WEIGHTS_FILE, weights, {})
    plain = task(entry, {"model_mb": 0.001}, to_safetensors(weights), dp_sgd=False)
    TaskRunner().run(plain, tmp_path / "plain", site="s", dataset_path=tmp_path)
    assert json.loads((tmp_path / "plain" / TASK_FILE).read_text())["dp_sgd"] is None


def test_fedprox_pulls_towards_the_global_model_on_top_of_the_private_gradient():
    """After a data step, an empty batch without noise leaves only the proximal gradient mu (w - w_global):
    with lr 0.5 and mu 1 it halves the distance to the global model."""
    model = initial_model(TINY, 0)
    start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    image, label = torch.randn(2, 1, 16, 16, 16), (torch.rand(2, 1, 16, 16, 16) > 0.5).float()
    empty = (torch.zeros(0, 1, 16, 16, 16), torch.zeros(0, 1, 16, 16, 16))
    distances = []
    for steps in (1, 2):
        model = initial_model(TINY, 0)
        train_steps_private(
            model,
            torch.optim.SGD(model.parameters(), lr=0.5),
            iter([(image, label), empty]),
            steps,
            noise_multiplier=0.0,
            max_grad_norm=1.0,
            expected_batch_size=2,
            loss_fn=make_loss(),
            proximal_mu=1.0,
        )
        distances.append(float((torch.cat([p.detach().flatten() for p in model.parameters()]) - start).norm()))
    assert 0 < distances[0] <= 0.5 * (1 + 1e-4)
    assert distances[1] == pytest.approx(distances[0] / 2, rel=1e-4)
