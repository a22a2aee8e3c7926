"""The delivered model: weights (safetensors), a TorchScript file for other tools, and its card (JSON).

``model.safetensors`` is the source of truth: :mod:`laulima.predict` rebuilds the U-Net
from the card and reads only that file (no pickle, no TorchScript). The TorchScript file
is for clinics' own tools; it is checked against the eager model before anything is
published. The folder appears whole or not at all (written in a temporary folder, then
renamed).

The card records the preprocessing plan (voxel spacing, orientation, intensity
normalisation) the model was trained with, because the weights mean nothing without it:
``laulima predict`` resamples every scan to that grid. Cards of version 1 did not record
it and are refused with what to do. :func:`export_experiment` writes the same folder for
any finished experiment on a hub (``laulima experiment export``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from laulima.algorithms.segmentation.model import build_unet, load_numpy_weights, parse_params
from laulima.core.weights import safetensors_chunks
from laulima.errors import AlgorithmError, ConfigurationError, DataError
from laulima.private_files import replace_dir

if TYPE_CHECKING:
    from laulima.client import Client

__all__ = [
    "CARD_FILE",
    "CARD_FORMAT",
    "CARD_VERSION",
    "TORCHSCRIPT_FILE",
    "WEIGHTS_FILE",
    "export_experiment",
    "export_model",
    "read_card",
    "sha256_file",
]

WEIGHTS_FILE = "model.safetensors"
TORCHSCRIPT_FILE = "model.torchscript.pt"
CARD_FILE = "model.json"
CARD_FORMAT = "laulima-model"
CARD_VERSION = 2
"""2: records the preprocessing plan (``preprocessing`` and ``params.preprocessing``)."""
SEGMENTATION_ALGORITHM = "laulima.algorithms.segmentation:UNetSegmentation"


def export_model(
    weights: Mapping[str, np.ndarray],
    params: Mapping[str, Any],
    out_dir: Path,
    *,
    card: Mapping[str, Any],
    labels: Mapping[int, str] | None = None,
    channels: Sequence[str] | None = None,
) -> Path:
    """Write ``out_dir`` with the three files; return ``out_dir``.

    ``card`` is the training record (rounds, sites, strategy, metrics: anything JSON-able);
    label and channel names come from ``labels``/``channels``, else ``card["labels"]`` /
    ``card["channels"]``, else the phantom task's (``laulima.imaging.TASKS``), else generic names. An existing
    ``out_dir`` is replaced.
    """
    p = parse_params(params)
    try:
        training = json.loads(json.dumps(dict(card)))
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"model card: not JSON-serialisable ({exc})", field="card") from exc
    names, channel_names = _names(p.task, p.out_channels, p.in_channels, labels, channels, training)
    model = build_unet(p)
    load_numpy_weights(model, weights)
    model.eval()

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would follow the folder to its published name
        with open(tmp / WEIGHTS_FILE, "wb") as fh:
            for chunk in safetensors_chunks(dict(weights), {"format": "pt", "laulima.card": CARD_FILE}):
                fh.write(chunk)
        _write_torchscript(model, p.in_channels, p.roi_size, tmp / TORCHSCRIPT_FILE)
        document = {
            "format": CARD_FORMAT,
            "format_version": CARD_VERSION,
            "architecture": p.architecture(),
            "params": p.as_config(),
            "labels": {str(k): v for k, v in sorted(names.items())},
            "channels": list(channel_names),
            "preprocessing": {**p.preprocessing.as_config(), "summary": p.preprocessing.describe()},
            "inference": {"roi_size": list(p.roi_size), "sw_overlap": p.sw_overlap, "output": "argmax label map"},
            "files": {
                "weights": {"name": WEIGHTS_FILE, "format": "safetensors", "sha256": sha256_file(tmp / WEIGHTS_FILE)},
                "torchscript": {
                    "name": TORCHSCRIPT_FILE,
                    "format": "torchscript (torch.jit.trace, eval mode, input [N, C, X, Y, Z])",
                    "sha256": sha256_file(tmp / TORCHSCRIPT_FILE),
                },
            },
            "versions": _versions(),
            "training": training,
        }
        (tmp / CARD_FILE).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def export_experiment(client: Client, experiment_id: int, out_dir: Path) -> Path:
    """Download experiment ``experiment_id``'s global model from the hub and write it to ``out_dir`` as a model folder.

    The network is rebuilt from the experiment's own spec (its ``[config]``: architecture and
    preprocessing plan), so the folder is the one ``laulima demo`` writes and ``laulima
    predict`` runs. Only a finished experiment (completed, or cancelled or failed after at
    least one round) of the built-in segmentation algorithm can be exported.
    """
    from laulima.core.protocol import ExperimentStatus
    from laulima.core.weights import from_safetensors
    from laulima.nnunet.workflow import NNUNET_ALGORITHM

    exp = client.experiment(experiment_id)
    algorithm = str(exp.spec.get("algorithm", ""))
    if algorithm not in (SEGMENTATION_ALGORITHM, NNUNET_ALGORITHM):
        raise ConfigurationError(
            f"experiment {experiment_id} ({exp.name}) runs {algorithm or 'an unnamed algorithm'!r}; only "
            f"{SEGMENTATION_ALGORITHM} and {NNUNET_ALGORITHM} models can be exported for `laulima predict`; use "
            "`laulima experiment model` to download its raw weights",
            field="algorithm",
        )
    if exp.status == ExperimentStatus.RUNNING:
        raise ConfigurationError(
            f"experiment {experiment_id} ({exp.name}) is still running (round {exp.rounds_done}/{exp.rounds}); "
            "export it when it has finished (`laulima experiment status` shows it), or cancel it first",
            field="experiment",
        )
    if exp.rounds_done < 1:
        raise ConfigurationError(
            f"experiment {experiment_id} ({exp.name}) {exp.status} before any round finished; there is no trained "
            "model to export",
            field="experiment",
        )
    config = dict(exp.spec.get("config") or {})
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.download.", dir=out_dir.parent) as tmp:
        file = client.download_model(experiment_id, Path(tmp) / "global.safetensors")
        weights = from_safetensors(file.read_bytes(), where=f"experiment {experiment_id}'s global model")
    if algorithm == NNUNET_ALGORITHM:  # nnU-Net's own results folder, for its predictor and `laulima predict`
        from laulima.nnunet.export import export_nnunet

        return export_nnunet(weights, config, out_dir)
    card = {
        "experiment": exp.name,
        "experiment_id": exp.id,
        "status": str(exp.status),
        "rounds": exp.rounds_done,
        "strategy": (exp.spec.get("strategy") or {}).get("name"),
        "global_digest": exp.global_digest,
        "spec": exp.spec,
    }
    return export_model(weights, config, out_dir, card=card)


def read_card(model_dir: Path) -> dict[str, Any]:
    """The card of an exported model, checked for format and weights digest."""
    path = Path(model_dir) / CARD_FILE
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(
            f"{path}: cannot read the model card ({exc}); is this an exported model?", file=str(path)
        ) from exc
    kind = card.get("format") if isinstance(card, dict) else type(card).__name__
    if kind != CARD_FORMAT:
        raise DataError(f"{path}: not a Laulima model card (format {kind!r})", file=str(path))
    if card.get("format_version") == 1:
        raise DataError(
            f"{path}: model card version 1 does not record the grid and intensity scale the model was trained "
            "at, so its predictions on other scans would be wrong; export it again: `laulima experiment export "
            "N --output DIR` for an experiment on a hub, or rerun `laulima demo`",
            file=str(path),
        )
    if card.get("format_version") != CARD_VERSION:
        raise DataError(
            f"{path}: model card version {card.get('format_version')!r}; this Laulima reads version {CARD_VERSION}",
            file=str(path),
        )
    try:
        expected = str(card["files"]["weights"]["sha256"])
        card["params"]["in_channels"]
    except (KeyError, TypeError) as exc:
        raise DataError(f"{path}: the model card lacks {exc}; export the model again", file=str(path)) from exc
    weights = Path(model_dir) / WEIGHTS_FILE
    if not weights.is_file() or sha256_file(weights) != expected:
        raise DataError(f"{weights}: missing, or its sha256 differs from the card's {expected}", file=str(weights))
    return card


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_torchscript(model: torch.nn.Module, in_channels: int, roi_size: Sequence[int], path: Path) -> None:
    """Trace, save, load back, and compare with the eager model on a random input.

    torch 2.9+ deprecates TorchScript in favour of torch.export; clinics' tools still load
    TorchScript, so we keep it and silence that warning here (only here). The trace is
    checked again on a batch of two: it is not tied to the example's batch size.
    """
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(1, in_channels, *roi_size, generator=generator)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit.*")
        # (shape checks in instance norm become constants of the trace: harmless, the U-Net is shape-generic)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(path))
        loaded = torch.jit.load(str(path), map_location="cpu")  # our own file, written just now
        probe = torch.randn(2, in_channels, *roi_size, generator=generator)
        eager, scripted = model(probe), loaded(probe)
    if not torch.allclose(eager, scripted, rtol=1e-4, atol=1e-5):
        raise AlgorithmError(
            f"TorchScript export: the traced model differs from the eager one by up to "
            f"{float((eager - scripted).abs().max()):.3g}; not publishing {path.parent}"
        )


def _names(
    task: str | None,
    n_labels: int,
    n_channels: int,
    labels: Mapping[int, str] | None,
    channels: Sequence[str] | None,
    card: Mapping[str, Any],
) -> tuple[dict[int, str], tuple[str, ...]]:
    from laulima.imaging import TASKS  # the phantom tasks name their labels and channels

    info = TASKS.get(task or "")
    default_labels, default_channels = (info.labels, info.channels) if info is not None else (None, None)
    chosen = (
        labels
        or card.get("labels")
        or default_labels
        or {0: "background"} | {i: f"label {i}" for i in range(1, n_labels)}
    )
    names = {int(k): str(v) for k, v in dict(chosen).items()}
    if sorted(names) != list(range(n_labels)):
        raise ConfigurationError(f"model card: labels {names} must be 0..{n_labels - 1}", field="labels")
    chans = channels or card.get("channels") or default_channels or tuple(f"channel {i}" for i in range(n_channels))
    if len(chans) != n_channels:
        raise ConfigurationError(f"model card: {len(chans)} channel names for {n_channels} channels", field="channels")
    return names, tuple(str(c) for c in chans)


def _versions() -> dict[str, str]:
    import monai

    import laulima

    return {"laulima": laulima.__version__, "torch": torch.__version__, "monai": monai.__version__}

