"""A federated nnU-Net model as an nnU-Net results folder, which nnU-Net's own tools load unchanged.

``out_dir/<dataset_name>/nnUNetTrainer__<plans_name>__<configuration>/`` holds ``plans.json``,
``dataset.json`` (``dataset_fingerprint.json`` when given) and ``fold_all/`` with

* ``checkpoint_final.pth``: nnU-Net's own checkpoint format, written only for nnU-Net's tools
  (``nnUNetv2_predict_from_modelfolder``, ``nnUNetPredictor.initialize_from_trained_model_folder``),
  which unpickle it. It holds plain types and tensors only, so ``torch.load(weights_only=True)``
  reads it too;
* ``model.safetensors``: the same weights, which Laulima reads (it never unpickles), with the
  configuration name in its metadata.

The folder is written under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from laulima.nnunet.network import TRAINER_NAME, build_network, load_weights
from laulima.nnunet.params import parse_params
from laulima.private_files import replace_dir

__all__ = ["CHECKPOINT_FILE", "FOLD", "WEIGHTS_FILE", "export_nnunet", "trainer_folder_name"]

CHECKPOINT_FILE = "checkpoint_final.pth"
WEIGHTS_FILE = "model.safetensors"
FOLD = "fold_all"
FORMAT = "laulima-nnunet-1"


def trainer_folder_name(plans_name: str, configuration: str) -> str:
    """nnU-Net's name of a trained model's folder: ``<trainer>__<plans>__<configuration>``."""
    return f"{TRAINER_NAME}__{plans_name}__{configuration}"


def export_nnunet(
    weights: Mapping[str, np.ndarray],
    config: Mapping[str, Any],
    out_dir: Path,
    *,
    fingerprint: dict[str, Any] | None = None,
) -> Path:
    """Write the nnU-Net results folder of ``weights`` trained under ``config`` (the experiment's ``[config]``);
    return the trainer folder. An existing folder of that name is replaced once the new one is complete."""
    import torch
    from safetensors.numpy import save_file

    params = parse_params(config)
    network = build_network(params, deep_supervision=False)
    load_weights(network, weights)  # keys, shapes and finiteness checked against the plan's network
    state = OrderedDict((name, tensor.detach().cpu().clone()) for name, tensor in network.state_dict().items())
    checkpoint = {
        "network_weights": state,
        "init_args": {
            "plans": params.plans,
            "configuration": params.configuration,
            "fold": "all",
            "dataset_json": params.dataset_json,
            "device": "cpu",
        },
        "trainer_name": TRAINER_NAME,
        "inference_allowed_mirroring_axes": params.mirror_axes,
    }
    parent = Path(out_dir) / params.plans["dataset_name"]
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / trainer_folder_name(params.plans["plans_name"], params.configuration)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{final.name}.", suffix=".partial"))
    try:
        documents: dict[str, Any] = {"plans.json": params.plans, "dataset.json": params.dataset_json}
        if fingerprint is not None:
            documents["dataset_fingerprint.json"] = fingerprint
        for name, document in documents.items():
            (tmp / name).write_text(json.dumps(document, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        fold = tmp / FOLD
        fold.mkdir()
        torch.save(checkpoint, fold / CHECKPOINT_FILE)
        metadata = {"format": FORMAT, "configuration": params.configuration, "trainer_name": TRAINER_NAME}
        save_file({name: t.numpy() for name, t in state.items()}, str(fold / WEIGHTS_FILE), metadata=metadata)
        for path in (tmp, fold):
            os.chmod(path, 0o755)  # a model is shared; mkdtemp's 0700 would follow the folder
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
