"""Training steps and Dice scoring, shared by the federated algorithm, the baselines and the exported model.

One function trains and one scores, so federated, centralised and local-only models are
compared by the same code.

Dice convention: per case and foreground class, on one-hot argmax predictions, with
MONAI's ``DiceMetric(include_background=False, ignore_empty=False)``: a class absent from
the ground truth scores 1 when the prediction leaves it out too and 0 when it predicts
it anywhere. No case is skipped, so means over cases, sites and classes stay comparable
and a model that hallucinates a missing class is penalised. ``dice_mean`` is the mean over
the foreground classes of the per-class means over cases.

Regions (the BraTS convention): when ``regions`` are given (name -> label values, e.g.
whole tumour {1, 2, 3}, tumour core {2, 3}, enhancing tumour {3}), each region is scored as
one binary foreground (the union of its labels, in truth and in the argmax prediction):
``dice_<region>`` and ``hd95_<region>``, the 95th-percentile symmetric Hausdorff distance in
millimetres on the samples' grid (MONAI, ``percentile=95``). ``dice_mean`` and ``hd95_mean``
are then the means over the regions (BraTS' mean), and the per-label ``dice_<label>`` stay.
Empty regions get finite, bounded values, so every case counts: absent in both truth and
prediction, Dice 1 and HD95 0; absent in exactly one, Dice 0 and HD95 the diagonal of the
volume in millimetres (no surface distance can exceed it; BraTS uses a fixed 373.13 mm).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric, compute_hausdorff_distance
from monai.networks.utils import one_hot

from laulima.algorithms.segmentation.data import Sample

__all__ = ["Scores", "evaluate", "make_loss", "metric_name", "region_dice", "region_scores", "train_steps"]


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
    lr_at: Callable[[int], float] | None = None,
) -> dict[str, float]:
    """``steps`` optimizer steps; FedProx adds mu/2 · ||w - w_global||² (w_global: the weights at the start).

    Returns ``loss`` (mean task loss over the steps, without the proximal term), ``last_loss``
    and ``steps``. ``on_step(i, loss)`` is called after step i (1-based); ``lr_at(i)`` sets the
    learning rate of step i (0-based) before it is taken.
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
        if lr_at is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step - 1)
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
    """Dice per case and foreground class (rows: cases, columns: ``names``) and loss per case;
    with regions, also Dice and HD95 per case and region (columns: ``regions``)."""

    names: tuple[str, ...]
    case_ids: tuple[str, ...]
    dice: np.ndarray
    loss: np.ndarray
    regions: tuple[str, ...] = ()
    region_dice: np.ndarray | None = None
    """[cases, regions]; None when there are no regions."""
    region_hd95: np.ndarray | None = None
    """[cases, regions], millimetres."""

    def __post_init__(self) -> None:
        empty = np.zeros((len(self.case_ids), 0))
        for name in ("region_dice", "region_hd95"):
            value = getattr(self, name)
            object.__setattr__(self, name, empty if value is None else np.asarray(value, dtype=np.float64))
        clash = set(self.names) & set(self.regions)
        if clash:
            raise ValueError(f"region names {sorted(clash)} are also label names; their dice_ metrics would collide")

    @property
    def n(self) -> int:
        return len(self.case_ids)

    def metrics(self) -> dict[str, float]:
        """``dice_<class>`` and ``loss`` (means over cases); with regions ``dice_<region>``, ``hd95_<region>``,
        and ``dice_mean``, ``hd95_mean`` over the regions, else ``dice_mean`` over the classes."""
        if not self.n:
            return {}
        per_class = self.dice.mean(axis=0)
        out = {f"dice_{name}": float(v) for name, v in zip(self.names, per_class, strict=True)}
        out["dice_mean"] = float(per_class.mean())
        if self.regions:
            assert self.region_dice is not None and self.region_hd95 is not None  # (set in __post_init__)
            dice, hd95 = self.region_dice.mean(axis=0), self.region_hd95.mean(axis=0)
            out.update({f"dice_{name}": float(v) for name, v in zip(self.regions, dice, strict=True)})
            out.update({f"hd95_{name}": float(v) for name, v in zip(self.regions, hd95, strict=True)})
            out["dice_mean"], out["hd95_mean"] = float(dice.mean()), float(hd95.mean())
        out["loss"] = float(self.loss.mean())
        return out

    @staticmethod
    def concat(parts: Sequence[Scores]) -> Scores:
        """All cases of ``parts`` as one set: means over it weigh every subject equally."""
        if not parts:
            raise ValueError("no scores to pool")
        names, regions = parts[0].names, parts[0].regions
        if any(p.names != names or p.regions != regions for p in parts):
            raise ValueError(f"cannot pool scores of different classes: {[(p.names, p.regions) for p in parts]}")
        return Scores(
            names=names,
            case_ids=tuple(i for p in parts for i in p.case_ids),
            dice=np.concatenate([p.dice for p in parts]),
            loss=np.concatenate([p.loss for p in parts]),
            regions=regions,
            region_dice=np.concatenate([p.region_dice for p in parts if p.region_dice is not None]),
            region_hd95=np.concatenate([p.region_hd95 for p in parts if p.region_hd95 is not None]),
        )


def region_scores(
    prediction: torch.Tensor, truth: torch.Tensor, labels: Sequence[int], spacing_mm: Sequence[float]
) -> tuple[float, float]:
    """Dice and HD95 (mm) of one region — the voxels whose label is in ``labels`` — of label maps [X, Y, Z].

    Empty regions follow the module doc's convention, so both values are always finite.
    """
    pred, true = _region_masks(prediction, truth, labels)
    dice, has_pred, has_true = _mask_dice(pred, true), bool(pred.any()), bool(true.any())
    if not (has_pred or has_true):
        return dice, 0.0
    diagonal = float(np.linalg.norm(np.asarray(truth.shape, dtype=np.float64) * np.asarray(spacing_mm)))
    if not (has_pred and has_true):
        return dice, diagonal
    with warnings.catch_warnings():  # MONAI 1.5+ warns about an argument its own helper passes
        warnings.filterwarnings("ignore", "monai.metrics.utils get_mask_edges", FutureWarning)
        hd95 = compute_hausdorff_distance(
            pred[None, None], true[None, None], include_background=True, percentile=95, spacing=list(spacing_mm)
        )
    return dice, min(float(hd95.reshape(-1)[0]), diagonal)


def region_dice(prediction: torch.Tensor, truth: torch.Tensor, labels: Sequence[int]) -> float:
    """Dice of one region of label maps, with :func:`region_scores`' convention for empty regions."""
    return _mask_dice(*_region_masks(prediction, truth, labels))


def _region_masks(
    prediction: torch.Tensor, truth: torch.Tensor, labels: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.as_tensor(list(labels), device=truth.device)
    return torch.isin(prediction, values), torch.isin(truth, values)


def _mask_dice(pred: torch.Tensor, true: torch.Tensor) -> float:
    """1 when both masks are empty, 0 when one is, else 2|P∩T| / (|P| + |T|)."""
    n_pred, n_true = int(pred.sum()), int(true.sum())
    if n_pred == 0 and n_true == 0:
        return 1.0
    if n_pred == 0 or n_true == 0:
        return 0.0
    return 2.0 * int((pred & true).sum()) / (n_pred + n_true)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    cases: Sequence[Sample],
    roi_size: Sequence[int],
    labels: Mapping[int, str],
    *,
    overlap: float = 0.25,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    regions: Sequence[tuple[str, Sequence[int]]] = (),
    spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
) -> Scores:
    """Sliding-window inference on each whole case, argmax, Dice per foreground class and, for ``regions``
    (name, label values), Dice and HD95 per region; ``spacing_mm``: the cases' voxel size (see module doc)."""
    device = next(model.parameters()).device
    n_classes = len(labels)
    names = tuple(metric_name(labels[i]) for i in sorted(labels) if i != 0)
    loss_fn = loss_fn or make_loss()
    metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=False)
    # Each call returns that case's row; Scores.metrics() takes the mean over rows, which is
    # what metric.aggregate() ("mean_batch") gives, and pools across sites as well.
    was_training = model.training
    model.eval()
    dice, losses, per_region = [], [], []
    for case in cases:
        image = case.image[None].to(device)
        label = case.label[None].to(device)
        logits = sliding_window_inference(image, roi_size, 1, model, overlap=overlap)
        logits = torch.as_tensor(logits)
        losses.append(float(loss_fn(logits, label.float())))
        prediction = one_hot(logits.argmax(dim=1, keepdim=True), n_classes)
        row = metric(y_pred=prediction, y=one_hot(label.long(), n_classes))
        dice.append(torch.as_tensor(row).cpu().numpy()[0])
        predicted, truth = logits.argmax(dim=1)[0], label[0, 0].long()
        per_region.append([region_scores(predicted, truth, values, spacing_mm) for _, values in regions])
    model.train(was_training)
    per_case = np.asarray(dice, dtype=np.float64).reshape(len(cases), len(names))
    region_values = np.asarray(per_region, dtype=np.float64).reshape(len(cases), len(regions), 2)
    return Scores(
        names=names,
        case_ids=tuple(c.id for c in cases),
        dice=per_case,
        loss=np.asarray(losses),
        regions=tuple(name for name, _ in regions),
        region_dice=region_values[..., 0],
        region_hd95=region_values[..., 1],
    )
