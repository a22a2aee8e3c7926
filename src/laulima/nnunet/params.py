"""The nnU-Net algorithm's ``[config]``: a shared nnU-Net plan, its dataset.json and training knobs, all checked.

The plan arrives from outside the site, and nnU-Net resolves names in it to Python objects
(``pydoc.locate`` of the network class and its ops, normaliser, resampling and reader
classes found by name) and builds tensors of the sizes it gives. So every name is checked
against the few nnU-Net ships and every size is bounded before nnU-Net sees the plan, and
the checked plan keeps only the configuration the experiment uses, with its inheritance
resolved: nothing unchecked reaches nnU-Net.
"""

from __future__ import annotations

import copy
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from laulima.algorithms.segmentation.model import Regions, _regions
from laulima.errors import ConfigurationError

__all__ = [
    "KNOWN_KEYS",
    "MAX_BATCH",
    "MAX_FEATURES",
    "MAX_PATCH_VOXELS",
    "MAX_STAGES",
    "NnUNetParams",
    "parse_params",
]

MAX_PATCH_VOXELS = 256**3
MAX_FEATURES = 1024
MAX_STAGES = 10
MAX_BATCH = 64
MAX_CHANNELS = 16
MAX_LABELS = 64
KNOWN_KEYS = (
    "plans",
    "dataset_json",
    "configuration",
    "initial_lr",
    "batch_size",
    "threads",
    "device",
    "mirroring",
    "regions",
    "val_fraction",
    "planner",
    "dataset_name",
)
"""The keys of ``[config]``; any other is refused (a typo would otherwise pass unseen). ``planner`` and
``dataset_name`` are read by the planning step (:mod:`laulima.nnunet.workflow`), not by training."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_KWARG = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_NETWORKS = {
    "dynamic_network_architectures.architectures.unet.PlainConvUNet": "n_conv_per_stage",
    "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet": "n_blocks_per_stage",
    "dynamic_network_architectures.architectures.residual_unet.ResidualEncoderUNet": "n_blocks_per_stage",
}
_CONV = {2: "torch.nn.modules.conv.Conv2d", 3: "torch.nn.modules.conv.Conv3d"}
_NORMS = {
    2: ("torch.nn.modules.instancenorm.InstanceNorm2d", "torch.nn.modules.batchnorm.BatchNorm2d"),
    3: ("torch.nn.modules.instancenorm.InstanceNorm3d", "torch.nn.modules.batchnorm.BatchNorm3d"),
}
_DROPOUTS = {2: ("torch.nn.modules.dropout.Dropout2d",), 3: ("torch.nn.modules.dropout.Dropout3d",)}
_NONLINS = (
    "torch.nn.LeakyReLU",
    "torch.nn.ReLU",
    "torch.nn.modules.activation.LeakyReLU",
    "torch.nn.modules.activation.ReLU",
)
_IMPORTED = ("conv_op", "norm_op", "dropout_op", "nonlin")
_READERS = ("SimpleITKIO", "NibabelIO", "NibabelIOWithReorient")
_NORMALIZERS = ("ZScoreNormalization", "CTNormalization", "NoNormalization", "RescaleTo01Normalization")
_RESAMPLERS = ("resample_data_or_seg_to_shape", "resample_torch_fornnunet", "resample_torch_simple")
_INTENSITY_KEYS = ("mean", "median", "std", "min", "max", "percentile_99_5", "percentile_00_5")
_DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class NnUNetParams:
    """Everything the algorithm reads from ``[config]``, checked; ``plans`` holds one resolved configuration."""

    plans: dict[str, Any]
    dataset_json: dict[str, Any]
    configuration: str = "3d_fullres"
    initial_lr: float = 1e-2
    batch_size: int = 2
    """The plan's batch size, or the smaller ``batch_size`` of ``[config]``."""
    threads: int = 1
    device: str = "auto"
    mirroring: bool = False
    """Test-time mirroring in ``evaluate`` (8x the inference cost in 3D)."""
    regions: Regions = ()
    val_fraction: float = 0.2

    @property
    def config(self) -> dict[str, Any]:
        """The (resolved) configuration the experiment trains."""
        configuration: dict[str, Any] = self.plans["configurations"][self.configuration]
        return configuration

    @property
    def n_channels(self) -> int:
        return len(self.dataset_json["channel_names"])

    @property
    def labels(self) -> dict[int, str]:
        """Label value -> name, background included."""
        return {int(value): name for name, value in self.dataset_json["labels"].items()}

    @property
    def mirror_axes(self) -> tuple[int, ...]:
        """What nnUNetTrainer allows for test-time mirroring: every spatial axis of the patch."""
        return tuple(range(len(self.config["patch_size"])))


def parse_params(params: Mapping[str, Any] | NnUNetParams) -> NnUNetParams:
    """Check ``params``; every error names the ``config.`` field, the value and the fix."""
    if isinstance(params, NnUNetParams):
        return params
    if not isinstance(params, Mapping):
        _fail("", params, "must be a table")
    unknown = sorted(set(params) - set(KNOWN_KEYS))
    if unknown:
        _fail(unknown[0], params[unknown[0]], f"is not a parameter of NnUNet (known: {', '.join(KNOWN_KEYS)})")
    configuration = params.get("configuration", "3d_fullres")
    if not isinstance(configuration, str) or not _NAME.fullmatch(configuration):
        _fail("configuration", configuration, "must be a configuration name of the plan, e.g. '3d_fullres'")
    dataset_json = _dataset_json(params.get("dataset_json"))
    n_channels = len(dataset_json["channel_names"])
    plans = _plans(params.get("plans"), configuration, n_channels)
    plan_batch = int(plans["configurations"][configuration]["batch_size"])
    batch = _int(params, "batch_size", plan_batch, low=1, high=plan_batch)
    plans["configurations"][configuration]["batch_size"] = batch
    device = params.get("device", "auto")
    if device not in _DEVICES:
        _fail("device", device, f"must be one of {list(_DEVICES)}")
    mirroring = params.get("mirroring", False)
    if not isinstance(mirroring, bool):
        _fail("mirroring", mirroring, "must be true or false")
    return NnUNetParams(
        plans=plans,
        dataset_json=dataset_json,
        configuration=configuration,
        initial_lr=_float(params, "initial_lr", 1e-2, low=0.0, high=10.0),
        batch_size=batch,
        threads=_int(params, "threads", 1, low=1, high=256),
        device=device,
        mirroring=mirroring,
        regions=_regions(params, (), len(dataset_json["labels"])),
        val_fraction=_float(params, "val_fraction", 0.2, low=0.0, high=1.0),
    )


# -- dataset.json ----------------------------------------------------------------------------------


def _dataset_json(value: Any) -> dict[str, Any]:
    where = "dataset_json"
    if not isinstance(value, Mapping):
        _fail(where, _short(value), "is needed: nnU-Net v2's dataset.json as a table (channel_names, labels, ...)")
    channels = value.get("channel_names")
    if (
        not isinstance(channels, Mapping)
        or not 1 <= len(channels) <= MAX_CHANNELS
        or sorted(channels) != [str(i) for i in range(len(channels))]
        or not all(isinstance(name, str) and 0 < len(name) <= 64 for name in channels.values())
    ):
        _fail(f"{where}.channel_names", channels, f"must map '0', '1', ... (at most {MAX_CHANNELS}) to channel names")
    labels: Any = value.get("labels")
    ok = isinstance(labels, Mapping) and 2 <= len(labels) <= MAX_LABELS
    ok = ok and all(isinstance(n, str) and 0 < len(n) <= 64 and _is_int(v) for n, v in labels.items())
    if not ok or sorted(int(v) for v in labels.values()) != list(range(len(labels))):
        _fail(
            f"{where}.labels",
            labels,
            "must map names to the consecutive integers 0..N-1 with 'background': 0 (region-based and "
            "ignore labels are not supported)",
        )
    if labels.get("background") != 0:
        _fail(f"{where}.labels", labels, "must name label 0 'background'")
    ending = value.get("file_ending", ".nii.gz")
    if ending not in (".nii.gz", ".nii"):
        _fail(f"{where}.file_ending", ending, "must be '.nii.gz' or '.nii' (sites hand nnU-Net NIfTI files)")
    out: dict[str, Any] = {
        "channel_names": {str(k): str(v) for k, v in sorted(channels.items(), key=lambda kv: int(kv[0]))},
        "labels": {str(k): int(v) for k, v in sorted(labels.items(), key=lambda kv: int(kv[1]))},
        "numTraining": _int(value, "numTraining", 0, low=0, high=10**7, prefix=f"{where}."),
        "file_ending": ending,
    }
    for key in ("name", "description", "reference", "licence", "release"):
        if isinstance(value.get(key), str):
            out[key] = value[key][:1000]
    return out


# -- plans -----------------------------------------------------------------------------------------


def _plans(value: Any, configuration: str, n_channels: int) -> dict[str, Any]:
    where = "plans"
    if not isinstance(value, Mapping):
        _fail(where, _short(value), "is needed: the nnUNetPlans.json the experiment was planned with, as a table")
    for key in ("dataset_name", "plans_name"):
        name = value.get(key)
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            _fail(f"{where}.{key}", name, "must be a name of letters, digits, '_', '.' or '-' (a folder name)")
    reader = value.get("image_reader_writer", "SimpleITKIO")
    if reader not in _READERS:
        _fail(f"{where}.image_reader_writer", reader, f"must be one of {list(_READERS)}")
    if value.get("label_manager", "LabelManager") != "LabelManager":
        _fail(f"{where}.label_manager", value.get("label_manager"), "must be 'LabelManager'")
    forward: Any = value.get("transpose_forward")
    backward: Any = value.get("transpose_backward")
    if not _permutation(forward) or not _permutation(backward) or [forward.index(i) for i in range(3)] != backward:
        _fail(f"{where}.transpose_forward", [forward, backward], "and transpose_backward must be inverse permutations")
    resolved = _resolve(value, configuration)
    checked = _configuration(resolved, f"{where}.configurations.{configuration}", n_channels)
    intensity = _intensities(value, n_channels)
    out: dict[str, Any] = {
        "dataset_name": value["dataset_name"],
        "plans_name": value["plans_name"],
        "original_median_spacing_after_transp": _floats_or_none(value, "original_median_spacing_after_transp"),
        "original_median_shape_after_transp": _floats_or_none(value, "original_median_shape_after_transp"),
        "image_reader_writer": reader,
        "transpose_forward": [int(i) for i in forward],
        "transpose_backward": [int(i) for i in backward],
        "configurations": {configuration: checked},
        "experiment_planner_used": str(value.get("experiment_planner_used", "ExperimentPlanner"))[:100],
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": intensity,
    }
    return {k: v for k, v in out.items() if v is not None}


def _resolve(plans: Mapping[str, Any], configuration: str) -> dict[str, Any]:
    """The configuration with nnU-Net's ``inherits_from`` applied (parents first), as nnU-Net resolves it."""
    configurations = plans.get("configurations")
    if not isinstance(configurations, Mapping):
        _fail("plans.configurations", _short(configurations), "must be a table of configurations")
    chain: list[Mapping[str, Any]] = []
    name: Any = configuration
    while name is not None:
        entry = configurations.get(name) if isinstance(name, str) else None
        if not isinstance(entry, Mapping):
            known = sorted(str(k) for k in configurations)
            _fail("configuration", name, f"is not a configuration of the plan (it has {known})")
        if len(chain) >= MAX_STAGES or any(entry is seen for seen in chain):
            _fail(f"plans.configurations.{configuration}.inherits_from", name, "forms a loop or a chain over 10 long")
        chain.append(entry)
        name = entry.get("inherits_from")
    resolved: dict[str, Any] = {}
    for entry in reversed(chain):
        resolved.update(copy.deepcopy(dict(entry)))
    resolved.pop("inherits_from", None)
    return resolved


def _configuration(config: dict[str, Any], where: str, n_channels: int) -> dict[str, Any]:
    if config.get("previous_stage") is not None:
        _fail(f"{where}.previous_stage", config["previous_stage"], "names a cascade; cascades are not supported")
    if config.get("preprocessor_name", "DefaultPreprocessor") != "DefaultPreprocessor":
        _fail(f"{where}.preprocessor_name", config.get("preprocessor_name"), "must be 'DefaultPreprocessor'")
    identifier = config.get("data_identifier")
    if not isinstance(identifier, str) or not _NAME.fullmatch(identifier):
        _fail(f"{where}.data_identifier", identifier, "must be a folder name, e.g. 'nnUNetPlans_3d_fullres'")
    patch = _ints(config, "patch_size", where, low=1, high=1024, lengths=(2, 3))
    dim = len(patch)
    if math.prod(patch) > MAX_PATCH_VOXELS:
        _fail(f"{where}.patch_size", patch, f"has {math.prod(patch)} voxels, more than 256³ = {MAX_PATCH_VOXELS}")
    spacing = _positive_floats(config, "spacing", where, length=dim)
    schemes = config.get("normalization_schemes")
    if not isinstance(schemes, list) or len(schemes) != n_channels or not all(s in _NORMALIZERS for s in schemes):
        _fail(f"{where}.normalization_schemes", schemes, f"must list one of {list(_NORMALIZERS)} per channel")
    mask = config.get("use_mask_for_norm")
    if not isinstance(mask, list) or len(mask) != n_channels or not all(isinstance(m, bool) for m in mask):
        _fail(f"{where}.use_mask_for_norm", mask, "must list one true/false per channel")
    batch: Any = config.get("batch_size")
    if not _is_int(batch) or not 1 <= int(batch) <= MAX_BATCH:
        _fail(f"{where}.batch_size", batch, f"must be an integer in 1..{MAX_BATCH}")
    batch_dice = config.get("batch_dice", False)
    if not isinstance(batch_dice, bool):
        _fail(f"{where}.batch_dice", batch_dice, "must be true or false")
    out: dict[str, Any] = {
        "data_identifier": identifier,
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": int(batch),
        "patch_size": patch,
        "median_image_size_in_voxels": _floats_or_none(config, "median_image_size_in_voxels"),
        "spacing": spacing,
        "normalization_schemes": list(schemes),
        "use_mask_for_norm": list(mask),
        "batch_dice": batch_dice,
        "architecture": _architecture(config.get("architecture"), f"{where}.architecture", patch),
    }
    for kind in ("data", "seg", "probabilities"):
        key = f"resampling_fn_{kind}"
        if config.get(key) not in _RESAMPLERS:
            _fail(f"{where}.{key}", config.get(key), f"must be one of {list(_RESAMPLERS)}")
        out[key] = config[key]
        out[f"{key}_kwargs"] = _kwargs(config.get(f"{key}_kwargs"), f"{where}.{key}_kwargs") or {}
    return {k: v for k, v in out.items() if v is not None}


def _architecture(value: Any, where: str, patch: list[int]) -> dict[str, Any]:
    dim = len(patch)
    if not isinstance(value, Mapping):
        _fail(where, _short(value), "must be a table (network_class_name, arch_kwargs, _kw_requires_import)")
    network = value.get("network_class_name")
    if network not in _NETWORKS:
        _fail(f"{where}.network_class_name", network, f"must be one of {sorted(_NETWORKS)}")
    imported = value.get("_kw_requires_import")
    if not isinstance(imported, list) or not set(imported) <= set(_IMPORTED):
        _fail(f"{where}._kw_requires_import", imported, f"must list some of {list(_IMPORTED)}")
    kwargs = value.get("arch_kwargs")
    at = f"{where}.arch_kwargs"
    if not isinstance(kwargs, Mapping):
        _fail(at, _short(kwargs), "must be a table")
    n_stages: Any = kwargs.get("n_stages")
    if not _is_int(n_stages) or not 1 <= int(n_stages) <= MAX_STAGES:
        _fail(f"{at}.n_stages", n_stages, f"must be an integer in 1..{MAX_STAGES}")
    n = int(n_stages)
    blocks_key = _NETWORKS[network]
    features = _ints(kwargs, "features_per_stage", at, low=1, high=MAX_FEATURES, lengths=(n,))
    kernels = [
        _int_list(k, f"{at}.kernel_sizes", low=1, high=7, lengths=(dim,)) for k in _list(kwargs, at, "kernel_sizes", n)
    ]
    strides = [_int_list(s, f"{at}.strides", low=1, high=4, lengths=(dim,)) for s in _list(kwargs, at, "strides", n)]
    for axis in range(dim):
        factor = math.prod(s[axis] for s in strides)
        if patch[axis] % factor:
            _fail(
                f"{at}.strides", strides, f"downsample axis {axis} by {factor}, which does not divide the patch {patch}"
            )
    out: dict[str, Any] = {
        "n_stages": n,
        "features_per_stage": features,
        "conv_op": _one_of(kwargs, "conv_op", at, (_CONV[dim],)),
        "kernel_sizes": kernels,
        "strides": strides,
        blocks_key: _ints(kwargs, blocks_key, at, low=1, high=16, lengths=(n,)),
        "n_conv_per_stage_decoder": _ints(kwargs, "n_conv_per_stage_decoder", at, low=1, high=16, lengths=(n - 1,)),
        "conv_bias": _bool(kwargs, "conv_bias", at),
        "norm_op": _one_of(kwargs, "norm_op", at, (*_NORMS[dim], None)),
        "norm_op_kwargs": _kwargs(kwargs.get("norm_op_kwargs"), f"{at}.norm_op_kwargs"),
        "dropout_op": _one_of(kwargs, "dropout_op", at, (*_DROPOUTS[dim], None)),
        "dropout_op_kwargs": _kwargs(kwargs.get("dropout_op_kwargs"), f"{at}.dropout_op_kwargs"),
        "nonlin": _one_of(kwargs, "nonlin", at, (*_NONLINS, None)),
        "nonlin_kwargs": _kwargs(kwargs.get("nonlin_kwargs"), f"{at}.nonlin_kwargs"),
    }
    if blocks_key == "n_blocks_per_stage" and "stem_channels" in kwargs:
        stem = kwargs["stem_channels"]
        if stem is not None and (not _is_int(stem) or not 1 <= int(stem) <= MAX_FEATURES):
            _fail(f"{at}.stem_channels", stem, f"must be null or an integer in 1..{MAX_FEATURES}")
        out["stem_channels"] = stem
    extra = sorted(set(kwargs) - set(out) - {"stem_channels"})
    if extra:
        _fail(f"{at}.{extra[0]}", kwargs[extra[0]], f"is not an argument of {network.rsplit('.', 1)[-1]} this accepts")
    return {"network_class_name": network, "arch_kwargs": out, "_kw_requires_import": list(imported)}


def _intensities(plans: Mapping[str, Any], n_channels: int) -> dict[str, dict[str, float]]:
    where = "plans.foreground_intensity_properties_per_channel"
    value = plans.get("foreground_intensity_properties_per_channel")
    if not isinstance(value, Mapping) or sorted(value) != sorted(str(i) for i in range(n_channels)):
        _fail(where, _short(value), f"must give the statistics of channels '0'..'{n_channels - 1}'")
    out = {}
    for channel, stats in value.items():
        if not isinstance(stats, Mapping) or not all(_finite(stats.get(k)) for k in _INTENSITY_KEYS):
            _fail(f"{where}.{channel}", stats, f"must give finite numbers {list(_INTENSITY_KEYS)}")
        out[str(channel)] = {k: float(stats[k]) for k in _INTENSITY_KEYS}
    return out


# -- small checks ----------------------------------------------------------------------------------


def _fail(name: str, value: object, why: str) -> NoReturn:
    field = f"config.{name}" if name else "config"
    raise ConfigurationError(
        f"nnU-Net config: {field} = {_short(value)!r} {why}; fix the experiment's [config] table", field=field
    )


def _short(value: object) -> object:
    """Values in messages stay readable: a whole plan is shown by its type and size."""
    text = repr(value)
    return value if len(text) <= 200 else f"<{type(value).__name__} of {len(text)} characters>"


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _finite(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def _permutation(value: object) -> bool:
    return isinstance(value, list) and all(_is_int(v) for v in value) and sorted(value) == [0, 1, 2]


def _int(params: Mapping[str, Any], name: str, default: int, *, low: int, high: int, prefix: str = "") -> int:
    value = params.get(name, default)
    if not _is_int(value) or not low <= int(value) <= high:
        _fail(f"{prefix}{name}", value, f"must be an integer in {low}..{high}")
    return int(value)


def _float(params: Mapping[str, Any], name: str, default: float, *, low: float, high: float) -> float:
    value = params.get(name, default)
    if not _finite(value) or not low < float(value) < high:
        _fail(name, value, f"must be a number in ({low}, {high})")
    return float(value)


def _bool(params: Mapping[str, Any], name: str, where: str) -> bool:
    value = params.get(name)
    if not isinstance(value, bool):
        _fail(f"{where}.{name}", value, "must be true or false")
    return value


def _list(params: Mapping[str, Any], where: str, name: str, length: int) -> list[Any]:
    value = params.get(name)
    if not isinstance(value, list) or len(value) != length:
        _fail(f"{where}.{name}", value, f"must be a list of {length} entries (one per stage)")
    return value


def _ints(
    params: Mapping[str, Any], name: str, where: str, *, low: int, high: int, lengths: tuple[int, ...]
) -> list[int]:
    return _int_list(params.get(name), f"{where}.{name}", low=low, high=high, lengths=lengths)


def _int_list(value: Any, where: str, *, low: int, high: int, lengths: tuple[int, ...]) -> list[int]:
    ok = isinstance(value, Sequence) and not isinstance(value, str) and len(value) in lengths
    if not ok or not all(_is_int(v) and low <= int(v) <= high for v in value):
        sizes = " or ".join(str(n) for n in lengths)
        _fail(where, value, f"must be a list of {sizes} integers in {low}..{high}")
    return [int(v) for v in value]


def _positive_floats(params: Mapping[str, Any], name: str, where: str, *, length: int) -> list[float]:
    value: Any = params.get(name)
    ok = isinstance(value, Sequence) and not isinstance(value, str) and len(value) == length
    if not ok or not all(_finite(v) and 0 < float(v) <= 1e4 for v in value):
        _fail(f"{where}.{name}", value, f"must be {length} finite positive numbers")
    return [float(v) for v in value]


def _floats_or_none(params: Mapping[str, Any], name: str) -> list[float] | None:
    """Informative entries nnU-Net's own tools print: kept when well-formed, dropped otherwise."""
    value = params.get(name)
    if isinstance(value, Sequence) and not isinstance(value, str) and 1 <= len(value) <= 3:
        if all(_finite(v) and 0 <= float(v) <= 1e6 for v in value):
            return [float(v) for v in value]
    return None


def _one_of(params: Mapping[str, Any], name: str, where: str, allowed: tuple[str | None, ...]) -> str | None:
    value = params.get(name)
    if value not in allowed:
        _fail(f"{where}.{name}", value, f"must be one of {list(allowed)}")
    return value  # type: ignore[no-any-return]


def _kwargs(value: Any, where: str) -> dict[str, Any] | None:
    """Keyword arguments nnU-Net passes to torch ops or resampling: a few plain scalars, or null."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or len(value) > 16:
        _fail(where, value, "must be null or a table of at most 16 plain values")
    for key, item in value.items():
        scalar = item is None or isinstance(item, bool | str) or _finite(item)
        if not isinstance(key, str) or not _KWARG.fullmatch(key) or not scalar or len(str(item)) > 100:
            _fail(f"{where}.{key}", item, "must be a plain value (number, true/false, short text or null)")
    return dict(value)
