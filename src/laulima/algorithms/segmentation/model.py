"""The 3D U-Net, its parameters (checked, from the experiment's free-form ``[config]`` table) and numpy weights."""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from monai.networks.nets import UNet

from laulima.algorithms.segmentation.preprocessing import DEFAULT_PLAN, PreprocessingPlan, parse_plan
from laulima.core.weights import Weights
from laulima.errors import ConfigurationError, WeightsError

__all__ = [
    "BRATS_REGIONS",
    "DEFAULT_CHANNELS",
    "LR_SCHEDULES",
    "TASK_REGIONS",
    "TASKS",
    "SegmentationParams",
    "build_unet",
    "learning_rate",
    "initial_model",
    "load_numpy_weights",
    "parse_params",
    "pick_device",
    "state_dict_to_numpy",
]

TASKS: dict[str, tuple[int, int]] = {"brain-tissue": (1, 4), "brain-tumour": (4, 4)}
"""Known tasks -> (image channels, labels incl. background): the model is built without data."""
Regions = tuple[tuple[str, tuple[int, ...]], ...]
"""Named, possibly overlapping sets of label values, scored as one foreground each."""
BRATS_REGIONS: Regions = (("wt", (1, 2, 3)), ("tc", (2, 3)), ("et", (3,)))
"""The BraTS regions on Decathlon Task01 labels (1 oedema, 2 non-enhancing, 3 enhancing tumour):
whole tumour, tumour core, enhancing tumour."""
TASK_REGIONS: dict[str, Regions] = {"brain-tumour": BRATS_REGIONS}
"""Each task's default ``regions``; a task not listed is scored per label only."""
MAX_REGIONS = 16
"""Each region adds two metrics (Dice, HD95); a site may report at most 64 metrics."""
LR_SCHEDULES = ("constant", "poly")
"""Learning-rate schedules: constant, or nnU-Net's polynomial decay (exponent 0.9)."""
DEFAULT_CHANNELS = (16, 32, 64, 128)
"""Feature maps per level; the thesis used (16, 32, 64, 128, 256)."""
_NORMS = {"instance": "INSTANCE", "batch": "BATCH"}
_DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class SegmentationParams:
    """Everything the segmentation algorithm reads from ``[config]``; defaults in the field list."""

    in_channels: int
    out_channels: int
    task: str | None = None
    channels: tuple[int, ...] = DEFAULT_CHANNELS
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 2
    norm: str = "instance"
    """MONAI's UNet default (InstanceNorm3d without affine: no buffers, nothing site-specific)."""
    roi_size: tuple[int, int, int] = (48, 48, 48)
    """Training crop and sliding-window size; each side a multiple of the product of the strides."""
    lr: float = 1e-3
    lr_schedule: str = "constant"
    """``constant``, or ``poly``: nnU-Net's decay lr x (1 - progress)^0.9 over the model's whole
    training (its rounds, through :attr:`~laulima.TrainConfig.progress`, or a baseline's steps)."""
    batch_size: int = 2
    threads: int = 1
    device: str = "auto"
    sw_overlap: float = 0.25
    val_fraction: float = 0.2
    """Held out from training when a site's test split has no labels."""
    preprocessing: PreprocessingPlan = DEFAULT_PLAN
    """Grid and intensity scale every site trains at and ``laulima predict`` applies (``[config.preprocessing]``)."""
    regions: Regions = ()
    """Evaluation regions (``[config.regions]``: name -> label values), e.g. BraTS' wt/tc/et; empty: per label
    only. Default: the task's (:data:`TASK_REGIONS`)."""

    def architecture(self) -> dict[str, Any]:
        """What it takes to rebuild the network (the model card's ``architecture``)."""
        return {
            "class": "monai.networks.nets.UNet",
            "spatial_dims": 3,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "channels": list(self.channels),
            "strides": list(self.strides),
            "num_res_units": self.num_res_units,
            "norm": self.norm,
            "roi_size": list(self.roi_size),
        }

    def as_config(self) -> dict[str, Any]:
        """A JSON-able ``[config]`` table that :func:`parse_params` turns back into these params."""
        skip = ("preprocessing", "regions")
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if k not in skip}
        out["preprocessing"] = self.preprocessing.as_config()
        if self.regions != TASK_REGIONS.get(self.task or "", ()):  # the task's default needs no mention
            out["regions"] = {name: list(values) for name, values in self.regions}
        return {k: v for k, v in out.items() if v is not None}


def parse_params(params: Mapping[str, Any] | SegmentationParams) -> SegmentationParams:
    """Check ``params``; every error names the parameter and the value that came."""
    if isinstance(params, SegmentationParams):
        return params
    unknown = sorted(set(params) - set(SegmentationParams.__dataclass_fields__))
    if unknown:
        known = ", ".join(SegmentationParams.__dataclass_fields__)
        _fail(unknown[0], params[unknown[0]], f"is not a parameter of UNetSegmentation (known: {known})")
    task = params.get("task")
    if task is not None and task not in TASKS:
        _fail("task", task, f"must be one of {sorted(TASKS)}")
    in_default, out_default = TASKS[task] if task is not None else (None, None)
    in_channels = _int(params, "in_channels", in_default, minimum=1)
    out_channels = _int(params, "out_channels", out_default, minimum=2)
    channels = _ints(params, "channels", DEFAULT_CHANNELS, minimum=1)
    if len(channels) < 2:
        _fail("channels", channels, "needs at least two levels, e.g. [16, 32, 64, 128]")
    strides = _ints(params, "strides", (2,) * (len(channels) - 1), minimum=1)
    if len(strides) != len(channels) - 1:
        _fail("strides", strides, f"needs len(channels) - 1 = {len(channels) - 1} entries")
    roi = _ints(params, "roi_size", (48, 48, 48), minimum=1)
    factor = math.prod(strides)
    if len(roi) != 3 or any(side % factor for side in roi):
        _fail("roi_size", roi, f"must be three sides, each a multiple of {factor} (the product of the strides)")
    norm = params.get("norm", "instance")
    if norm not in _NORMS:
        _fail("norm", norm, f"must be one of {sorted(_NORMS)}")
    lr_schedule = params.get("lr_schedule", "constant")
    if lr_schedule not in LR_SCHEDULES:
        _fail("lr_schedule", lr_schedule, f"must be one of {list(LR_SCHEDULES)}")
    device = params.get("device", "auto")
    if device not in _DEVICES:
        _fail("device", device, f"must be one of {list(_DEVICES)}")
    return SegmentationParams(
        in_channels=in_channels,
        out_channels=out_channels,
        task=task,
        channels=channels,
        strides=strides,
        num_res_units=_int(params, "num_res_units", 2, minimum=0),
        norm=norm,
        roi_size=(roi[0], roi[1], roi[2]),
        lr=_float(params, "lr", 1e-3, low=0.0, high=math.inf),
        lr_schedule=lr_schedule,
        batch_size=_int(params, "batch_size", 2, minimum=1),
        threads=_int(params, "threads", 1, minimum=1),
        device=device,
        sw_overlap=_float(params, "sw_overlap", 0.25, low=0.0, high=1.0, closed_low=True),
        val_fraction=_float(params, "val_fraction", 0.2, low=0.0, high=1.0),
        preprocessing=parse_plan(params.get("preprocessing")),
        regions=_regions(params, TASK_REGIONS.get(task or "", ()), out_channels),
    )


def build_unet(params: Mapping[str, Any] | SegmentationParams) -> UNet:
    """The MONAI 3D U-Net; its initial values come from torch's global RNG (see :func:`initial_model`)."""
    p = parse_params(params)
    return UNet(
        spatial_dims=3,
        in_channels=p.in_channels,
        out_channels=p.out_channels,
        channels=p.channels,
        strides=p.strides,
        num_res_units=p.num_res_units,
        norm=_NORMS[p.norm],
    )


def initial_model(params: Mapping[str, Any] | SegmentationParams, seed: int) -> UNet:
    """The U-Net initialised from ``seed`` alone; torch's global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_unet(params)


def state_dict_to_numpy(model: torch.nn.Module) -> Weights:
    """The state dict as numpy arrays; CPU tensors are shared, not copied (integer buffers keep their dtype)."""
    return {name: t.detach().cpu().numpy() for name, t in model.state_dict().items()}


def load_numpy_weights(model: torch.nn.Module, weights: Mapping[str, np.ndarray]) -> None:
    """Put ``weights`` into ``model`` as fresh tensors (one copy, cast to the model's dtype and device).

    The arrays are left untouched, and arrays handed out earlier by :func:`state_dict_to_numpy`
    (which share the model's old storage) keep their values when the model trains on.
    """
    state = model.state_dict()
    missing = sorted(set(state) - set(weights))
    unexpected = sorted(set(weights) - set(state))
    if missing or unexpected:
        raise WeightsError(
            f"the weights do not fit this U-Net: missing {missing[:3]}, unexpected {unexpected[:3]} "
            f"({len(missing)} / {len(unexpected)} in all); were they made with other channels or strides?"
        )
    fresh = {}
    for name, target in state.items():
        array = weights[name]
        if tuple(array.shape) != tuple(target.shape):
            raise WeightsError(
                f"tensor {name!r} has shape {list(array.shape)}, this U-Net expects {list(target.shape)}; "
                "were the weights made with other in_channels, out_channels or channels?"
            )
        fresh[name] = torch.tensor(array, dtype=target.dtype, device=target.device)
    model.load_state_dict(fresh, assign=True)  # (parameters keep requires_grad)


def pick_device(choice: str) -> torch.device:
    """``auto``: CUDA when torch sees it, else CPU (checked when a task runs, never at import)."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError(
            "segmentation config: device = 'cuda' but torch sees no CUDA device here; use 'auto' or 'cpu'",
            field="config.device",
        )
    if choice in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _fail(name: str, value: object, why: str) -> None:
    raise ConfigurationError(
        f"segmentation config: {name} = {value!r} {why}; fix the experiment's [config] table",
        field=f"config.{name}",
    )


def _regions(params: Mapping[str, Any], default: Regions, out_channels: int) -> Regions:
    """``regions``: a table of metric-safe names -> non-empty lists of foreground labels (1..out_channels - 1)."""
    if "regions" not in params:
        return default
    value = params["regions"]
    if not isinstance(value, Mapping) or len(value) > MAX_REGIONS:
        _fail("regions", value, f"must be a table of at most {MAX_REGIONS} names -> label lists, e.g. {{wt = [1, 2]}}")
    out = []
    for name, labels in value.items():
        if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9_]{1,32}", name):
            _fail("regions", value, f"has the name {name!r}; names are 1-32 characters of a-z, 0-9 and _")
        ok = not isinstance(labels, str) and isinstance(labels, Sequence) and len(labels) > 0
        if not ok or not all(_is_int(v) and 1 <= int(v) < out_channels for v in labels):
            _fail("regions", value, f"region {name!r} needs a non-empty list of labels in 1..{out_channels - 1}")
        out.append((name, tuple(sorted({int(v) for v in labels}))))
    return tuple(out)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _int(params: Mapping[str, Any], name: str, default: int | None, *, minimum: int) -> int:
    if name not in params:
        if default is None:
            _fail(name, None, f"is needed: set {name}, or task = one of {sorted(TASKS)}")
        return int(default)  # type: ignore[arg-type]
    value = params[name]
    if not _is_int(value) or int(value) < minimum:
        _fail(name, value, f"must be an integer of at least {minimum}")
    return int(value)


def _ints(params: Mapping[str, Any], name: str, default: tuple[int, ...], *, minimum: int) -> tuple[int, ...]:
    value = params.get(name, default)
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(_is_int(v) for v in value):
        _fail(name, value, "must be a list of integers")
    if any(int(v) < minimum for v in value):
        _fail(name, value, f"must hold integers of at least {minimum}")
    return tuple(int(v) for v in value)


def _float(
    params: Mapping[str, Any], name: str, default: float, *, low: float, high: float, closed_low: bool = False
) -> float:
    value = params.get(name, default)
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if ok:
        ok = (float(value) >= low if closed_low else float(value) > low) and float(value) < high
    if not ok:
        bounds = f"{'[' if closed_low else '('}{low}, {high})"
        _fail(name, value, f"must be a number in {bounds}")
    return float(value)


def learning_rate(p: SegmentationParams, progress: tuple[float, float], step: int, steps: int) -> float:
    """The learning rate for optimizer step ``step`` (0-based) of ``steps`` in a task that covers
    ``progress`` of the model's training: one schedule for federated rounds and baselines alike."""
    if p.lr_schedule == "constant" or steps <= 0:
        return p.lr
    start, end = progress
    done = start + (end - start) * step / steps
    return p.lr * max(0.0, 1.0 - done) ** 0.9
