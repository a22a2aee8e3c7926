"""Federated nnU-Net: sites fingerprint and train on their own cohort, nnU-Net plans from merged aggregates.

Names are exported lazily: importing ``laulima.nnunet`` loads neither nnunetv2 nor torch,
so the hub and the CLI can name this package at no cost.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "NnUNet",
    "RawCase",
    "RawView",
    "build_raw_view",
    "export_nnunet",
    "nnunet_dataset_name",
    "plan_experiment",
    "predict_nnunet",
    "site_fingerprint",
]

__preload__ = (
    "laulima.nnunet.algorithm",
    "laulima.nnunet.cache_io",
    "laulima.nnunet.fingerprint",
    "blosc2",
    "nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor",
    "nnunetv2.inference.predict_from_raw_data",
    "nnunetv2.preprocessing.preprocessors.default_preprocessor",
    "nnunetv2.training.nnUNetTrainer.nnUNetTrainer",
)
"""What a site's zygote imports before forking this package's tasks: once per agent, not per
task, and outside the sandbox — blosc2 looks for its library with ``ctypes.util``, which a
confined task may not do."""

_WHERE = {
    "NnUNet": "algorithm",
    "export_nnunet": "export",
    "predict_nnunet": "predict",
    "RawCase": "rawview",
    "RawView": "rawview",
    "build_raw_view": "rawview",
    "site_fingerprint": "fingerprint",
    "nnunet_dataset_name": "planning",
    "plan_experiment": "planning",
}

if TYPE_CHECKING:
    from laulima.nnunet.algorithm import NnUNet
    from laulima.nnunet.export import export_nnunet
    from laulima.nnunet.fingerprint import site_fingerprint
    from laulima.nnunet.planning import nnunet_dataset_name, plan_experiment
    from laulima.nnunet.predict import predict_nnunet
    from laulima.nnunet.rawview import RawCase, RawView, build_raw_view


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'laulima.nnunet' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"laulima.nnunet.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
