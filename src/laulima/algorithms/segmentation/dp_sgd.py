"""Sample-level DP-SGD for the segmentation U-Net (Opacus), and its ε from Laulima's accountant.

Each optimizer step takes a Poisson sample of the site's training cases (rate
q = batch_size / cases, one crop per case at most), clips every case's gradient to
``max_grad_norm`` in L2, adds Gaussian noise of std ``noise_multiplier x max_grad_norm`` to the
sum and divides by the expected batch size (q x cases); Adam, the learning-rate schedule and
FedProx's proximal gradient (which depends only on the weights and the public global model)
act on that noisy gradient, as post-processing. The unit protected is one case of the site.

Why Opacus's :class:`~opacus.GradSampleModule` and :class:`~opacus.optimizers.DPOptimizer`
directly rather than ``PrivacyEngine.make_private``: ``make_private`` wants a torch DataLoader
(which it swaps for its Poisson loader), but batches are drawn here, in the task's process,
from cases in memory with MONAI's transforms (a forked task must not start loader workers), so
:func:`~laulima.algorithms.segmentation.data.poisson_batches` samples with the rate the
accountant is told; and the PrivacyEngine keeps an accountant of its own, while every ε in
Laulima comes from :mod:`laulima.core.privacy.accountant`. The wrapper is taken off after the
task, so the model, its state-dict names and shapes are those of training without DP-SGD:
the global model keeps one schema.

Per-example gradients of the default U-Net: Conv3d by Opacus's hooks; ConvTranspose3d and
PReLU, which have no grad sampler of their own, by Opacus's per-layer functorch fallback
(``torch.func.vmap``); InstanceNorm3d without affine has no parameters and normalises each
example alone. BatchNorm (``norm = "batch"``) mixes the examples of a batch and is refused
(:func:`check_private`). The loss must be a mean of per-example terms (Opacus's
``loss_reduction="mean"``): Dice + CE is, Dice being per case and CE a mean over equal crops.

Randomness: who joins a batch and the noise come from the operating system's entropy, never
from the task's seed, which the hub knows (noise the hub could recompute protects nothing); a
DP-SGD task is therefore not reproducible from the experiment's seed. Opacus's ``secure_mode``
(noise hardened against floating-point attacks, torchcsprng) is not used.
"""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Callable, Iterable

import torch

from laulima.algorithms.base import DpSgd
from laulima.errors import ConfigurationError

__all__ = ["check_private", "dp_sgd_epsilon", "noise_generator", "sampling_rate", "train_steps_private"]

_HOOK_WARNING = "Full backward hook is firing when gradients are computed with respect to module outputs"
"""torch's note that the images need no gradient, raised once per step under Opacus's hooks: harmless."""


def sampling_rate(batch_size: int, n_cases: int) -> float:
    """Poisson sampling rate q that gives ``batch_size`` cases per step on average (1 when the site has fewer)."""
    if n_cases < 1:
        raise ValueError("no training cases")
    return min(1.0, batch_size / n_cases)


def dp_sgd_epsilon(dp: DpSgd, *, steps: int, rounds: int, rate: float) -> float:
    """Sample-level ε at ``dp.delta`` after ``rounds`` tasks of ``steps`` steps each, from Laulima's accountant.

    It assumes the site trained in every round up to this one, with the same steps and
    sampling rate each time: an upper bound if it skipped rounds, not one if its number of
    cases or steps grew."""
    from laulima.core.privacy.accountant import GaussianRelease, epsilon  # dp_accounting: DP-SGD tasks only

    release = GaussianRelease(float(dp.noise_multiplier), count=steps * max(1, rounds), sampling_rate=rate)
    return epsilon([release], float(dp.delta))


def noise_generator(device: torch.device) -> torch.Generator:
    """A torch generator on ``device`` seeded from the OS's entropy: see the module doc."""
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63))
    return generator


def check_private(model: torch.nn.Module, *, where: str) -> None:
    """Refuse a model Opacus cannot train with per-example gradients (BatchNorm, above all)."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        batch_norm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
        hint = (
            "set norm = 'instance' in the experiment's [config]: BatchNorm mixes the cases of a batch, so no "
            "case's gradient can be clipped on its own"
            if batch_norm
            else "use layers Opacus supports"
        )
        raise ConfigurationError(
            f"{where}: the model cannot be trained with DP-SGD: {str(errors[0]).split('.')[0]}"
            f"{f' ({len(errors)} problems)' if len(errors) > 1 else ''}; {hint}",
            field="config.norm" if batch_norm else "privacy.dp_sgd",
        )


def train_steps_private(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    proximal_mu: float = 0.0,
    lr_at: Callable[[int], float] | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """``steps`` DP-SGD steps of ``optimizer`` on ``model`` (see the module doc); same return as
    :func:`~laulima.algorithms.segmentation.engine.train_steps`, ``loss`` over the non-empty batches.

    ``batches`` may be empty ([0, ...]): that step's gradient is noise alone, as Poisson
    sampling requires. ``noise_multiplier`` may be 0 here (tests of the clipping alone).
    ``model`` is wrapped only for the call and is returned to its plain state afterwards.
    """
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    check_private(model, where="DP-SGD")
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    total, last, counted = 0.0, float("nan"), 0
    iterator = iter(batches)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_HOOK_WARNING, category=UserWarning)
        wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
        private = DPOptimizer(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction="mean",
            generator=generator,
        )
        try:
            wrapped.train()
            for step in range(1, steps + 1):
                image, label = next(iterator)
                if lr_at is not None:
                    for group in optimizer.param_groups:
                        group["lr"] = lr_at(step - 1)
                private.zero_grad(set_to_none=True)
                if len(image):
                    image, label = image.to(device, non_blocking=True), label.to(device, non_blocking=True)
                    loss = loss_fn(wrapped(image), label)
                    loss.backward()
                    last = float(loss.detach())
                    total, counted = total + last, counted + 1
                else:  # nobody sampled: the sum of clipped gradients is zero, the noise is still added
                    for p in params:
                        p.grad_sample = p.new_zeros((0, *p.shape))  # type: ignore[attr-defined]  # (Opacus sets it)
                if private.pre_step():  # clip per example, sum, add noise, divide by the expected batch size
                    for p, start in zip(params, anchor, strict=False):  # (no anchor: no FedProx)
                        assert p.grad is not None
                        p.grad.add_(p.detach() - start, alpha=proximal_mu)  # FedProx: no data, no noise needed
                    optimizer.step()
        finally:
            private.zero_grad(set_to_none=True)
            wrapped.to_standard_module()  # hooks and per-sample attributes gone: the plain model again
            for p in params:
                if hasattr(p, "summed_grad"):
                    del p.summed_grad
    return {"loss": total / counted if counted else float("nan"), "last_loss": last, "steps": float(steps)}
