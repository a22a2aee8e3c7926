"""The built-in 3D segmentation algorithm (MONAI U-Net): ``laulima.algorithms.segmentation:UNetSegmentation``.

Importing this package imports torch and MONAI (the site's zygote does it once, before
forking tasks) but starts no thread pool, CUDA context or process.
"""

from __future__ import annotations

from laulima.algorithms.segmentation.algorithm import UNetSegmentation, check_dataset, task_seed
from laulima.algorithms.segmentation.data import Sample, Split, batches, load_samples, normalize, split_cases
from laulima.algorithms.segmentation.engine import Scores, evaluate, make_loss, metric_name, train_steps
from laulima.algorithms.segmentation.model import (
    TASKS,
    SegmentationParams,
    build_unet,
    initial_model,
    load_numpy_weights,
    parse_params,
    pick_device,
    state_dict_to_numpy,
)
from laulima.algorithms.segmentation.preprocessing import DEFAULT_PLAN, PreprocessingPlan, parse_plan

__all__ = [
    "DEFAULT_PLAN",
    "TASKS",
    "PreprocessingPlan",
    "Sample",
    "Scores",
    "SegmentationParams",
    "Split",
    "UNetSegmentation",
    "batches",
    "build_unet",
    "check_dataset",
    "evaluate",
    "initial_model",
    "load_numpy_weights",
    "load_samples",
    "make_loss",
    "metric_name",
    "normalize",
    "parse_params",
    "parse_plan",
    "pick_device",
    "split_cases",
    "state_dict_to_numpy",
    "task_seed",
    "train_steps",
]
