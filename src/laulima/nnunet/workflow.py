"""Federated nnU-Net from where the experiment is submitted: fingerprint, plan, train, export.

nnU-Net configures itself from its data. In a federation that takes three steps, and the
two between the sites' work happen here, on the submitting machine — never at the hub,
which imports no training code:

1. a fingerprint-mode experiment: every site summarises its cohort, the hub merges
   (:mod:`laulima.core.fingerprint`) into ``dataset_fingerprint.json`` and ``dataset.json``;
2. :func:`plan`: nnU-Net's own ``ExperimentPlanner`` turns them into ``nnUNetPlans.json``,
   shaped by the spec's ``[config.planner]`` table;
3. the training experiment carries the plan in its ``[config]`` (``plans``, ``dataset_json``),
   so every site preprocesses, builds the network and trains under the same plan.

``laulima sim`` runs all three (:func:`plan_in_federation`); against a real hub they are
``laulima experiment fingerprint``, ``laulima nnunet plan`` and ``laulima experiment submit``
with ``plans`` / ``dataset_json`` naming the written files (read in at submission).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from laulima.core.protocol import ExperimentPublic, ExperimentStatus
from laulima.core.spec import ExperimentSpec, parse_spec
from laulima.errors import ConfigurationError, LaulimaError
from laulima.private_files import write_atomic

__all__ = [
    "DATASET_FILE",
    "FINGERPRINT_FILE",
    "NNUNET_ALGORITHM",
    "PLANS_FILE",
    "PlannerSettings",
    "is_nnunet",
    "needs_plan",
    "plan",
    "plan_in_federation",
    "planner_settings",
    "read_json_document",
    "read_plan_files",
    "with_plan",
    "write_plan_files",
]

NNUNET_ALGORITHM = "laulima.nnunet:NnUNet"
FINGERPRINT_FILE = "dataset_fingerprint.json"
DATASET_FILE = "dataset.json"
PLANS_FILE = "nnUNetPlans.json"


@dataclass(frozen=True)
class PlannerSettings:
    """The knobs of nnU-Net's planner a federation sets (``[config.planner]``); nnU-Net's defaults.

    Smaller ``base_features`` / ``max_features`` give a narrower network of the same
    topology — what makes nnU-Net train in minutes on a CPU.
    """

    base_features: int = 32
    max_features: int = 320
    gpu_memory_target_gb: float = 8.0
    dataset_id: int = 500
    """nnU-Net names datasets ``Dataset<id>_<Name>``; the results folder carries the name."""


_LIMITS: dict[str, tuple[float, float]] = {
    "base_features": (1, 512),
    "max_features": (1, 2048),
    "gpu_memory_target_gb": (0.1, 1024.0),
    "dataset_id": (1, 999),
}


def planner_settings(config: Mapping[str, Any]) -> PlannerSettings:
    """``[config.planner]`` checked: known keys, numbers in range; errors name the entry."""
    raw = config.get("planner", {})
    if not isinstance(raw, Mapping):
        raise ConfigurationError("config.planner must be a table of planner settings", field="config.planner")
    unknown = sorted(set(raw) - set(_LIMITS))
    if unknown:
        raise ConfigurationError(
            f"config.planner: unknown setting(s) {unknown}; known: {sorted(_LIMITS)}", field="config.planner"
        )
    values: dict[str, Any] = {}
    for name, (lo, hi) in _LIMITS.items():
        if name not in raw:
            continue
        value = raw[name]
        integral = name != "gpu_memory_target_gb"
        ok_type = isinstance(value, int) if integral else isinstance(value, int | float)
        if isinstance(value, bool) or not ok_type or not math.isfinite(value) or not lo <= value <= hi:
            kind = "an integer" if integral else "a number"
            raise ConfigurationError(
                f"config.planner.{name} is {value!r}; it must be {kind} from {lo:g} to {hi:g}",
                field=f"config.planner.{name}",
            )
        values[name] = value
    settings = PlannerSettings(**values)
    if settings.max_features < settings.base_features:
        raise ConfigurationError(
            "config.planner.max_features must be at least base_features", field="config.planner.max_features"
        )
    return settings


def is_nnunet(spec: ExperimentSpec) -> bool:
    return spec.algorithm == NNUNET_ALGORITHM


def needs_plan(spec: ExperimentSpec) -> bool:
    """A training spec of nnU-Net without a plan: the federation fingerprints and plans first."""
    return is_nnunet(spec) and spec.mode == "train" and "plans" not in spec.config


def plan(fingerprint: Mapping[str, Any], dataset_json: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """nnU-Net's plans for the merged fingerprint, under the spec's ``[config.planner]``."""
    from laulima.nnunet.planning import nnunet_dataset_name, plan_experiment

    settings = planner_settings(config)
    name = nnunet_dataset_name(str(config.get("dataset_name") or "Laulima"), settings.dataset_id)
    return plan_experiment(
        dict(fingerprint),
        dict(dataset_json),
        dataset_name=name,
        base_features=settings.base_features,
        max_features=settings.max_features,
        gpu_memory_target_gb=settings.gpu_memory_target_gb,
    )


def with_plan(spec: ExperimentSpec, plans: Mapping[str, Any], dataset_json: Mapping[str, Any]) -> ExperimentSpec:
    """The training spec carrying the plan (validated again: the plan must fit in ``config``)."""
    config = {**spec.config, "plans": dict(plans), "dataset_json": dict(dataset_json)}
    return _with_config(spec, config, f"spec {spec.name} with its nnU-Net plan")


def read_plan_files(spec: ExperimentSpec, base_dir: Path) -> ExperimentSpec:
    """An nnU-Net training spec with ``plans`` / ``dataset_json`` given as JSON file names
    (relative to ``base_dir``, the spec's folder) read in; any other spec as it is.

    The hub and the sites receive the documents, never a path of the submitting machine.
    """
    if not is_nnunet(spec) or spec.mode == "fingerprint":
        return spec
    config = dict(spec.config)
    for key in ("plans", "dataset_json"):
        value = config.get(key)
        if isinstance(value, str):
            path = Path(value) if Path(value).is_absolute() else base_dir / value
            missing = (
                f"config.{key} names {value!r}, which does not exist; run `laulima nnunet plan` first or fix the path"
            )
            config[key] = read_json_document(path, missing=missing, field=f"config.{key}")
    return spec if config == dict(spec.config) else _with_config(spec, config, f"spec {spec.name}")


def _with_config(spec: ExperimentSpec, config: dict[str, Any], source: str) -> ExperimentSpec:
    data = spec.model_dump(mode="json")
    data["config"] = config
    return parse_spec(data, source=source)


def read_json_document(path: Path, *, missing: str, field: str | None = None) -> dict[str, Any]:
    """The JSON object in ``path`` (a plan, a fingerprint, a dataset.json); ``missing`` is the
    message when there is no such file. Errors name the file (and ``field``, the spec entry)."""
    where = {"field": field} if field else {"file": str(path)}
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigurationError(missing, **where) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigurationError(f"{field or path}: cannot read {str(path)!r} as JSON ({exc})", **where) from exc
    if not isinstance(document, dict):
        raise ConfigurationError(f"{field or path}: {str(path)!r} must hold a JSON object", **where)
    return document


def write_plan_files(
    folder: Path,
    fingerprint: Mapping[str, Any],
    dataset_json: Mapping[str, Any],
    plans: Mapping[str, Any] | None = None,
) -> None:
    """The nnU-Net documents, as nnU-Net's own tools write and read them (each file atomically)."""
    folder.mkdir(parents=True, exist_ok=True)
    documents = {FINGERPRINT_FILE: fingerprint, DATASET_FILE: dataset_json}
    if plans is not None:
        documents[PLANS_FILE] = plans
    for name, document in documents.items():
        write_atomic(folder / name, json.dumps(document, indent=2) + "\n", mode=0o644)


Submit = Callable[[ExperimentSpec], ExperimentPublic]
Wait = Callable[[int], ExperimentPublic]


def plan_in_federation(
    spec: ExperimentSpec, submit: Submit, wait: Wait, fetch_fingerprint: Callable[[int], Any], folder: Path
) -> ExperimentSpec:
    """Steps 1 and 2 of the module doc: fingerprint the federation, plan; the planned spec.

    ``submit`` / ``wait`` / ``fetch_fingerprint`` are the federation's (a client's) calls, so
    the same steps run against a simulation or a real hub. The documents land in ``folder``.
    """
    from laulima.core.spec import as_fingerprint_spec

    exp = wait(submit(as_fingerprint_spec(spec)).id)
    if exp.status != ExperimentStatus.COMPLETED:
        raise LaulimaError(
            f"the fingerprint experiment {exp.id} {exp.status}: {exp.error or 'no site sent a fingerprint'}; "
            "nnU-Net cannot be planned without it"
        )
    merged = fetch_fingerprint(exp.id)
    plans = plan(merged.fingerprint, merged.dataset_json, spec.config)
    write_plan_files(folder, merged.fingerprint, merged.dataset_json, plans)
    return with_plan(spec, plans, merged.dataset_json)
