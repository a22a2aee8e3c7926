"""Site-side batch prediction: a registered dataset in, label maps and DICOM SEGs out.

A federated model is only useful to a hospital once its results land where radiologists
look: the PACS. So for every case of a dataset the site registered, this writes the NIfTI
label map (``<out>/<case_id>.nii.gz``, for research tools) and, when the case is a DICOM
series, a DICOM SEG (``<out>/<case_id>.seg.dcm``) that references that series, so the
viewer overlays it on the images it came from. The images never leave the site; only the
SEGs are sent, and only when asked (STOW-RS).

One bad case (a deleted file, a series changed since registration) must not cost the rest
of a night's batch: each case is tried on its own and failures are reported at the end.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from laulima.errors import ConfigurationError, DataError, LaulimaError

__all__ = [
    "BatchOutcome",
    "CaseOutcome",
    "default_seg_path",
    "predict_dataset",
    "seg_identity",
    "write_prediction_seg",
]


class _CaseLike(Protocol):
    """What a catalog case record offers here (``laulima.site.catalog.CaseRecord``)."""

    @property
    def case_id(self) -> str: ...

    @property
    def images(self) -> tuple[Path, ...]: ...


@dataclass(frozen=True)
class CaseOutcome:
    """What happened to one case: the files written, voxels per label, or why it failed."""

    case_id: str
    label_map: Path | None = None
    seg: Path | None = None
    shape: tuple[int, ...] = ()
    voxels: Mapping[str, int] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def summary(self) -> str:
        """One line for the operator: where the results went, or why there are none."""
        if self.error is not None:
            return f"{self.case_id}: FAILED: {self.error}"
        found = ", ".join(f"{name} {n}" for name, n in self.voxels.items() if n) or "no labels found"
        written = ", ".join(str(p) for p in (self.label_map, self.seg) if p is not None)
        grid = "x".join(str(n) for n in self.shape)
        return f"{self.case_id}: {grid} voxels, {found} → {written}"


@dataclass(frozen=True)
class BatchOutcome:
    """Every case's outcome, and the SEGs sent by STOW-RS (if asked) or why sending failed."""

    dataset: str
    out_dir: Path
    cases: tuple[CaseOutcome, ...]
    stowed: tuple[Path, ...] = ()
    stow_error: str | None = None

    @property
    def failed(self) -> list[CaseOutcome]:
        return [c for c in self.cases if not c.ok]

    @property
    def segs(self) -> list[Path]:
        return [c.seg for c in self.cases if c.seg is not None]


def seg_identity(card: Mapping[str, Any]) -> tuple[str, str, dict[int, str]]:
    """Algorithm name, version and label names of an exported model, as its SEGs record them.

    The version is the weights' sha256 (shortened): it ties every SEG in the PACS to the
    exact model that made it, which a round number or a date would not.
    """
    try:
        labels = {int(k): str(v) for k, v in dict(card["labels"]).items()}
        digest = str(card["files"]["weights"]["sha256"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"the model card lacks {exc}; export the model again") from exc
    architecture = str(dict(card.get("architecture", {})).get("class", "UNet")).rsplit(".", 1)[-1]
    task = dict(card.get("params", {})).get("task")
    name = f"Laulima {architecture}" + (f" {task}" if task else "")
    return name, f"sha256:{digest[:16]}", labels


def default_seg_path(label_map: Path) -> Path:
    """``labels.nii.gz`` → ``labels.seg.dcm`` beside it."""
    label_map = Path(label_map)
    name = label_map.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return label_map.with_name(f"{name}.seg.dcm")


def write_prediction_seg(
    model_dir: Path, input_path: Path, label_map: Path, seg_path: Path | None = None
) -> Path | None:
    """The SEG of a prediction ``laulima predict`` wrote to ``label_map``, if ``input_path`` is DICOM.

    Returns None for a NIfTI input (there is no DICOM series to reference); ``seg_path``
    defaults to :func:`default_seg_path`. The label map's affine is checked against the
    series, so a label map on any other grid is refused rather than misplaced.
    """
    from laulima.export import read_card
    from laulima.imaging.dicom_seg import is_dicom_input, read_source_series, write_segmentation
    from laulima.imaging.nifti import read_label_array

    if not is_dicom_input(Path(input_path)):
        if seg_path is not None:
            raise ConfigurationError(
                f"--seg: {input_path} is not a DICOM series, so there is nothing for a DICOM SEG to reference; "
                "give a DICOM series folder, or drop --seg",
                field="seg",
            )
        return None
    name, version, labels = seg_identity(read_card(Path(model_dir)))
    stored, affine = read_label_array(Path(label_map))
    return write_segmentation(
        stored.astype(np.uint8),
        read_source_series(Path(input_path)),
        labels,
        seg_path or default_seg_path(label_map),
        algorithm_name=name,
        algorithm_version=version,
        affine=affine,
    )


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _file_stem(case_id: str) -> str:
    """The case id as a file name: ids come from dataset.json and must not pick a path."""
    stem = _SAFE.sub("_", case_id).lstrip(".")
    return stem or "case"


def _read_channels(images: Sequence[Path], where: str) -> tuple[np.ndarray, np.ndarray]:
    from laulima.imaging import read_image

    parts = [read_image(Path(p)) for p in images]
    if not parts:
        raise DataError(f"case {where}: lists no images")
    affine = parts[0][1]
    for path, (data, other) in zip(images[1:], parts[1:], strict=True):
        if data.shape[1:] != parts[0][0].shape[1:] or not np.allclose(other, affine, atol=1e-3):
            raise DataError(
                f"case {where}: channel {Path(path).name} is not on the first channel's grid", file=str(path)
            )
    image = parts[0][0] if len(parts) == 1 else np.concatenate([data for data, _ in parts], axis=0)
    return image, affine


def _predict_case(
    model_dir: Path, case: _CaseLike, out_dir: Path, identity: tuple[str, str, dict[int, str]]
) -> CaseOutcome:
    from laulima.imaging import write_label_nifti
    from laulima.imaging.dicom_seg import is_dicom_input, read_source_series, write_segmentation
    from laulima.predict import predict_volume

    name, version, labels_named = identity
    image, affine = _read_channels(case.images, case.case_id)
    labels = predict_volume(model_dir, image, affine, where=f"case {case.case_id}")
    stem = _file_stem(case.case_id)
    label_map = out_dir / f"{stem}.nii.gz"
    write_label_nifti(label_map, labels, affine)
    seg = None
    source = Path(case.images[0])  # a multi-series case is referenced through its first channel's series
    if is_dicom_input(source):
        seg = write_segmentation(
            labels,
            read_source_series(source),
            labels_named,
            out_dir / f"{stem}.seg.dcm",
            algorithm_name=name,
            algorithm_version=version,
            affine=affine,
        )
    counts = np.bincount(labels.reshape(-1), minlength=max(labels_named, default=0) + 1)
    voxels = {labels_named.get(i, f"label {i}"): int(n) for i, n in enumerate(counts) if i != 0}
    return CaseOutcome(case.case_id, label_map, seg, tuple(int(n) for n in labels.shape), voxels)


def predict_dataset(
    model_dir: Path,
    home: Path,
    dataset: str,
    out_dir: Path,
    *,
    stow_url: str | None = None,
    on_case: Callable[[CaseOutcome], None] | None = None,
) -> BatchOutcome:
    """Segment every case of ``dataset`` (registered at site ``home``) with the model in ``model_dir``.

    ``on_case`` sees each outcome as it is done (for progress lines). A case that fails is
    recorded with its error and the batch goes on; ``stow_url`` (a DICOMweb root, https, or
    http on loopback: :func:`laulima.site.pacs.stow`) sends the SEGs written to the PACS at
    the end.
    """
    from laulima.export import read_card
    from laulima.site.catalog import Catalog

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    identity = seg_identity(read_card(model_dir))  # a bad model fails once, before any case
    cases = list(Catalog(home).cases(dataset))
    if not cases:
        raise DataError(f"dataset {dataset!r} has no cases to predict", dataset=dataset)
    out_dir.mkdir(parents=True, exist_ok=True)
    outcomes = []
    for case in cases:
        try:
            outcome = _predict_case(model_dir, case, out_dir, identity)
        except LaulimaError as exc:
            outcome = CaseOutcome(case.case_id, error=str(exc))
        except Exception as exc:  # one case's unforeseen failure must not end the batch
            outcome = CaseOutcome(case.case_id, error=f"{type(exc).__name__}: {exc}")
        outcomes.append(outcome)
        if on_case is not None:
            on_case(outcome)
    result = BatchOutcome(dataset, out_dir, tuple(outcomes))
    if stow_url is None or not result.segs:
        return result
    from laulima.site.pacs import stow

    try:  # the SEGs are on disk either way: a PACS that is down must not hide the batch's results
        stow(stow_url, result.segs)
    except LaulimaError as exc:
        return BatchOutcome(dataset, out_dir, tuple(outcomes), stow_error=str(exc))
    return BatchOutcome(dataset, out_dir, tuple(outcomes), tuple(result.segs))
