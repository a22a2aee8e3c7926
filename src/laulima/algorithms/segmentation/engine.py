"""Training steps and Dice scoring, shared by the federated algorithm, the baselines and the exported model.

One function trains and one scores, so federated, centralised and local-only models are
compared by the same code.

Dice convention: per case and foreground class, on one-hot argmax predictions, with
MONAI's ``DiceMetric(include_background=False, ignore_empty=False)``: a class absent from
the ground truth scores 1 when the prediction leaves it out too and 0 when it predicts
it anywhere. No case is skipped, so means over cases, sites and classes stay comparable
and a model that hallucinates a missing class is penalised. ``dice_mean`` is the mean over
the foreground classes of the per-class means over cases.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot

from laulima.algorithms.segmentation.data import Sample

__all__ = ["Scores", "evaluate", "make_loss", "metric_name", "train_steps"]


def make_loss() -> DiceCELoss:
    """Dice + cross-entropy on softmax outputs; labels come as one channel of class indices."""
    return DiceCELoss(to_onehot_y=True, softmax=True)


def metric_name(label: str) -> str:
    """``"Grey matter"`` -> ``"grey_matter"``: lowercase, runs of anything else than a-z0-9 become ``_``."""
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_") or "class"


def train_steps(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    proximal_mu: float = 0.0,
    global_params: Mapping[str, torch.Tensor] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, float]:
    """``steps`` optimizer steps; FedProx adds mu/2 · ||w - w_global||² (w_global: the weights at the start).

    Returns ``loss`` (mean task loss over the steps, without the proximal term), ``last_loss``
    and ``steps``. ``on_step(i, loss)`` is called after step i (1-based).
    """
    device = next(model.parameters()).device
    params = dict(model.named_parameters())
    anchor: dict[str, torch.Tensor] = {}
    if proximal_mu > 0:
        source = global_params if global_params is not None else params
        anchor = {name: source[name].detach().to(device).clone() for name in params}
    model.train()
    total, last = 0.0, float("nan")
    iterator = iter(batches)
    for step in range(1, steps + 1):
        image, label = next(iterator)
        image, label = image.to(device, non_blocking=True), label.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(image), label)
        objective = loss
        if anchor:
            prox = sum(((p - anchor[n]) ** 2).sum() for n, p in params.items())
            objective = loss + 0.5 * proximal_mu * prox
        objective.backward()
        optimizer.step()
        last = float(loss.detach())
        total += last
        if on_step is not None:
            on_step(step, last)
    return {"loss": total / steps if steps else float("nan"), "last_loss": last, "steps": float(steps)}


@dataclass(frozen=True)
class Scores:
    """Dice per case and foreground class (rows: cases, columns: ``names``) and loss per case."""

    names: tuple[str, ...]
    case_ids: tuple[str, ...]
    dice: np.ndarray
    loss: np.ndarray

    @property
    def n(self) -> int:
        return len(self.case_ids)

    def metrics(self) -> dict[str, float]:
        """``dice_<class>`` (mean over cases), ``dice_mean`` (mean over classes) and ``loss``."""
        if not self.n:
            return {}
        per_class = self.dice.mean(axis=0)
        out = {f"dice_{name}": float(v) for name, v in zip(self.names, per_class, strict=True)}
        out["dice_mean"] = float(per_class.mean())
        out["loss"] = float(self.loss.mean())
        return out

    @staticmethod
    def concat(parts: Sequence[Scores]) -> Scores:
        """All cases of ``parts`` as one set: means over it weigh every subject equally."""
        if not parts:
            raise ValueError("no scores to pool")
        names = parts[0].names
        if any(p.names != names for p in parts):
            raise ValueError(f"cannot pool scores of different classes: {[p.names for p in parts]}")
        return Scores(
            names=names,
            case_ids=tuple(i for p in parts for i in p.case_ids),
            dice=np.concatenate([p.dice for p in parts]),
            loss=np.concatenate([p.loss for p in parts]),
        )


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    cases: Sequence[Sample],
    roi_size: Sequence[int],
    labels: Mapping[int, str],
    *,
    overlap: float = 0.25,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> Scores:
    """Sliding-window inference on each whole case, argmax, Dice per foreground class (see module doc)."""
    device = next(model.parameters()).device
    n_classes = len(labels)
    names = tuple(metric_name(labels[i]) for i in sorted(labels) if i != 0)
    loss_fn = loss_fn or make_loss()
    metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=False)
    # Each call returns that case's row; Scores.metrics() takes the mean over rows, which is
    # what metric.aggregate() ("mean_batch") gives, and pools across sites as well.
    was_training = model.training
    model.eval()
    dice, losses = [], []
    for case in cases:
        image = case.image[None].to(device)
        label = case.label[None].to(device)
        logits = sliding_window_inference(image, roi_size, 1, model, overlap=overlap)
        logits = torch.as_tensor(logits)
        losses.append(float(loss_fn(logits, label.float())))
        prediction = one_hot(logits.argmax(dim=1, keepdim=True), n_classes)
        row = metric(y_pred=prediction, y=one_hot(label.long(), n_classes))
        dice.append(torch.as_tensor(row).cpu().numpy()[0])
    model.train(was_training)
    per_case = np.asarray(dice, dtype=np.float64).reshape(len(cases), len(names))
    return Scores(names=names, case_ids=tuple(c.id for c in cases), dice=per_case, loss=np.asarray(losses))
