"""What a dataset folder lists: dataset.json of the Decathlon, nnU-Net v2 or laulima-v1 layout, parsed into cases.

This module reads only dataset.json and the folder listing; ``validation`` then opens every
file. Paths in dataset.json must stay inside the dataset folder. Hidden files (such as the
``._BRATS_001.nii.gz`` AppleDouble files in the Decathlon archives) are ignored everywhere;
any other file in an nnU-Net image or label folder must be a case file of the layout, so a
misnamed case is reported rather than silently skipped.

The laulima-v1 layout is what the site catalog writes for a registered DICOM source
(``site/catalog.py``), and of the cohort views a site builds over registered cases:
``{"layout": "laulima-v1", "name", "channels": ["MR"], "labels": {"0": "background", ...},
"numTraining", "training": [{"id", "image": [files], "label": path or null}], "test": [...]}``.
Its images are series references (``*.series.json``, pointing at DICOM files left in
place) or NIfTI files, its labels NIfTI files. A relative path must stay inside the folder;
an absolute path may point anywhere (a ``--labels`` folder, another registered dataset):
only the site itself writes this layout, never whoever sent a task, and the task's sandbox
grants only what the catalog lists as readable.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from laulima.errors import DataError
from laulima.imaging.nifti import NIFTI_SUFFIXES, is_nifti_name

__all__ = [
    "DECATHLON",
    "LAULIMA_V1",
    "NNUNET_V2",
    "Case",
    "Listing",
    "Problems",
    "SegmentationDataset",
    "parse_listing",
]

DECATHLON, NNUNET_V2, LAULIMA_V1 = "decathlon", "nnunet-v2", "laulima-v1"
_LAULIMA_KEYS = ("layout", "name", "channels", "labels", "numTraining", "training")
_DECATHLON_KEYS = ("name", "modality", "labels", "numTraining", "training")
_NNUNET_KEYS = ("channel_names", "labels", "numTraining", "file_ending")
_NNUNET_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class Case:
    id: str
    images: tuple[Path, ...]  # one 3D/4D file (Decathlon) or one file per channel (nnU-Net, laulima-v1)
    label: Path | None


@dataclass(frozen=True)
class SegmentationDataset:
    root: Path
    layout: str  # "decathlon" | "nnunet-v2" | "laulima-v1"
    name: str
    channels: tuple[str, ...]
    labels: dict[int, str]
    training: tuple[Case, ...]
    test: tuple[Case, ...]


@dataclass
class Problems:
    """Everything wrong with a dataset, collected so one run reports all of it."""

    root: Path
    lines: list[str] = field(default_factory=list)

    def add(self, path: Path | str, what: str, fix: str) -> None:
        self.lines.append(f"{self.rel(path)}: {what}; {fix}")

    def add_error(self, error: DataError) -> None:
        self.lines.append(error.message)

    def rel(self, path: Path | str) -> str:
        path = Path(path)
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def raise_if_any(self) -> None:
        if not self.lines:
            return
        shown = self.lines[:20] + ([f"... and {len(self.lines) - 20} more"] if len(self.lines) > 20 else [])
        raise DataError(
            f"dataset {self.root} is not usable, {len(self.lines)} problem(s):\n  " + "\n  ".join(shown),
            file=str(self.root),
            problems=list(self.lines),
        )


@dataclass(frozen=True)
class Listing:
    root: Path
    layout: str
    name: str
    channels: tuple[str, ...]
    labels: dict[int, str]
    allowed_values: frozenset[int]
    training: tuple[Case, ...]
    test: tuple[Case, ...]
    declared_training: int  # numTraining
    listed_training: int  # entries in "training" (Decathlon) or cases in imagesTr (nnU-Net)


def _fail(root: Path, what: str, fix: str) -> DataError:
    return DataError(f"{root / 'dataset.json'}: {what}; {fix}", file=str(root / "dataset.json"))


def _read_json(root: Path) -> dict[str, Any]:
    path = root / "dataset.json"
    if not root.is_dir():
        raise DataError(f"{root}: no such dataset folder", file=str(root))
    if not path.is_file():
        raise DataError(
            f"{root}: no dataset.json; a dataset folder needs one (Decathlon: {', '.join(_DECATHLON_KEYS)}; "
            f"nnU-Net v2: {', '.join(_NNUNET_KEYS)})",
            file=str(path),
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise _fail(root, f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})", "fix the file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(root, f"unreadable ({exc})", "check the file and its permissions") from exc
    if not isinstance(data, dict):
        raise _fail(root, f"top level is {type(data).__name__}, not an object", "write a JSON object")
    return data


def _require(root: Path, data: dict[str, Any], keys: tuple[str, ...], layout: str) -> None:
    missing = [k for k in keys if k not in data]
    if missing:
        raise _fail(
            root, f"missing key(s) {', '.join(missing)} for the {layout} layout", f"add them ({', '.join(keys)})"
        )


def _channels(root: Path, value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, dict) or not value:
        raise _fail(root, f'{key} must be a non-empty object like {{"0": "T1"}}', "fix it")
    if sorted(value) != [str(i) for i in range(len(value))] or not all(isinstance(v, str) for v in value.values()):
        raise _fail(root, f'{key} keys must be "0".."{len(value) - 1}" with names as values, got {value}', "fix it")
    return tuple(value[str(i)] for i in range(len(value)))


def _count(root: Path, data: dict[str, Any], key: str) -> int:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(root, f"{key} must be a non-negative integer, got {value!r}", "fix it")
    return value


def _listed(root: Path, value: Any, where: str, problems: Problems) -> Path | None:
    """A file named in dataset.json, or None (with a problem recorded) when it is unusable."""
    if not isinstance(value, str) or not value.strip():
        problems.add(
            root / "dataset.json", f"{where} is {value!r}, not a file path", "give a path relative to the folder"
        )
        return None
    path = Path(os.path.normpath(root / value.strip()))  # lexical: symlinked folders inside the dataset are fine
    if not path.is_relative_to(root):
        problems.add(
            root / "dataset.json", f"{where} {value!r} points outside the dataset folder", "list files inside it"
        )
        return None
    if not is_nifti_name(path):
        problems.add(path, "not a NIfTI file (listed in dataset.json)", "convert it to .nii.gz")
        return None
    if not path.is_file():
        problems.add(path, "listed in dataset.json but missing", "add the file or remove its entry")
        return None
    return path


def _case_id(path: Path) -> str:
    return next(path.name[: -len(s)] for s in NIFTI_SUFFIXES if path.name.endswith(s))


def _decathlon(root: Path, data: dict[str, Any], problems: Problems) -> Listing:
    _require(root, data, _DECATHLON_KEYS, "Decathlon")
    channels = _channels(root, data["modality"], "modality")
    labels = _decathlon_labels(root, data["labels"])
    declared = _count(root, data, "numTraining")
    training: list[Case] = []
    for i, entry in enumerate(_entries(root, data, "training")):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            problems.add(root / "dataset.json", f"training[{i}] is {entry!r}", 'write {"image": ..., "label": ...}')
            continue
        image = _listed(root, entry["image"], f"training[{i}].image", problems)
        label = _listed(root, entry["label"], f"training[{i}].label", problems)
        if image is not None and label is not None:
            training.append(Case(_case_id(image), (image,), label))
    test: list[Case] = []
    for i, entry in enumerate(_entries(root, data, "test")):
        if isinstance(entry, str):  # the Decathlon's own form: a bare image path, labels withheld
            image = _listed(root, entry, f"test[{i}]", problems)
            held_out = root / "labelsTs" / image.name if image is not None else None
            label = held_out if held_out is not None and held_out.is_file() else None
        elif isinstance(entry, dict) and "image" in entry:
            image = _listed(root, entry["image"], f"test[{i}].image", problems)
            label = _listed(root, entry["label"], f"test[{i}].label", problems) if entry.get("label") else None
        else:
            problems.add(
                root / "dataset.json", f"test[{i}] is {entry!r}", 'write a path or {"image": ..., "label": ...}'
            )
            continue
        if image is not None:
            test.append(Case(_case_id(image), (image,), label))
    if "numTest" in data and _count(root, data, "numTest") != len(data.get("test", [])):
        problems.add(
            root / "dataset.json",
            f"numTest is {data['numTest']} but {len(data.get('test', []))} test case(s) are listed",
            "correct numTest",
        )
    name = str(data["name"])
    listed = len(data["training"]) if isinstance(data["training"], list) else 0
    return Listing(
        root, DECATHLON, name, channels, labels, frozenset(labels), tuple(training), tuple(test), declared, listed
    )


def _entries(root: Path, data: dict[str, Any], key: str) -> list[Any]:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise _fail(root, f"{key} must be a list, got {type(value).__name__}", "fix it")
    return value


def _decathlon_labels(root: Path, value: Any) -> dict[int, str]:
    if not isinstance(value, dict) or not value:
        raise _fail(root, 'labels must be a non-empty object like {"0": "background"}', "fix it")
    try:
        labels = {int(k): str(v) for k, v in value.items()}
    except ValueError as exc:
        raise _fail(root, f"labels keys must be integers, got {sorted(value)}", "fix them") from exc
    if any(not 0 <= k <= 255 for k in labels):
        raise _fail(root, f"label values must be 0..255, got {sorted(labels)}", "renumber the labels")
    return dict(sorted(labels.items()))


def _nnunet_labels(root: Path, value: Any) -> tuple[dict[int, str], frozenset[int]]:
    if not isinstance(value, dict) or not value:
        raise _fail(root, 'labels must be a non-empty object like {"background": 0}', "fix it")
    labels: dict[int, str] = {}
    allowed: set[int] = set()
    for name, number in value.items():
        members = number if isinstance(number, list) else [number]  # a list is a region (region-based training)
        if not members or not all(isinstance(m, int) and not isinstance(m, bool) and 0 <= m <= 255 for m in members):
            raise _fail(root, f"label {name!r} is {number!r}, not an integer 0..255 (or a list of them)", "fix it")
        allowed.update(members)
        if not isinstance(number, list):
            labels[number] = str(name)
    if 0 not in labels:
        raise _fail(root, "labels have no background (value 0)", 'add "background": 0')
    return dict(sorted(labels.items())), frozenset(allowed)


def _nnunet(root: Path, data: dict[str, Any], problems: Problems) -> Listing:
    _require(root, data, _NNUNET_KEYS, "nnU-Net v2")
    channels = _channels(root, data["channel_names"], "channel_names")
    labels, allowed = _nnunet_labels(root, data["labels"])
    declared = _count(root, data, "numTraining")
    ending = data["file_ending"]
    if ending not in NIFTI_SUFFIXES:
        raise _fail(root, f"file_ending {ending!r} is not NIfTI", 'convert the images and set "file_ending": ".nii.gz"')
    if "dataset" in data:
        raise _fail(
            root, 'an explicit "dataset" file mapping is not supported', "lay the files out as imagesTr/CASE_0000"
        )
    training, listed = _nnunet_cases(
        root, "imagesTr", "labelsTr", ending, len(channels), problems, labels_required=True
    )
    test, _ = _nnunet_cases(root, "imagesTs", "labelsTs", ending, len(channels), problems, labels_required=False)
    name = str(data.get("name", root.name))
    return Listing(root, NNUNET_V2, name, channels, labels, allowed, training, test, declared, listed)


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


def _nnunet_cases(
    root: Path, images: str, labels: str, ending: str, n_channels: int, problems: Problems, *, labels_required: bool
) -> tuple[tuple[Case, ...], int]:
    found: dict[str, dict[int, Path]] = {}
    for path in _visible(root / images):
        match = _NNUNET_CHANNEL.match(path.name[: -len(ending)]) if path.name.endswith(ending) else None
        if match is None:
            problems.add(
                path, f"not a case file (expected CASE_XXXX{ending})", f"rename it, or move it out of {images}"
            )
            continue
        found.setdefault(match["case"], {})[int(match["channel"])] = path
    label_files = {p.name[: -len(ending)]: p for p in _visible(root / labels) if p.name.endswith(ending)}
    for path in _visible(root / labels):
        if not path.name.endswith(ending):
            problems.add(path, f"not a label file (expected CASE{ending})", f"rename it, or move it out of {labels}")
        elif path.name[: -len(ending)] not in found:
            problems.add(
                path, f"label without images (no {images}/{path.name[: -len(ending)]}_0000{ending})", "add them"
            )
    cases = []
    for case_id, files in sorted(found.items()):
        missing = [f"{images}/{case_id}_{c:04d}{ending}" for c in range(n_channels) if c not in files]
        extra = [files[c].name for c in sorted(files) if c >= n_channels]
        if missing:
            problems.add(root / images, f"case {case_id} lacks channel file(s) {', '.join(missing)}", "add them")
        if extra:
            problems.add(
                files[max(files)],
                f"case {case_id} has {len(files)} channels, dataset.json names {n_channels}",
                "fix channel_names or remove the extra files",
            )
        label = label_files.get(case_id)
        if label is None and labels_required:
            problems.add(root / labels, f"no label {labels}/{case_id}{ending} for case {case_id}", "add it")
        if not missing and not extra and (label is not None or not labels_required):
            cases.append(Case(case_id, tuple(files[c] for c in range(n_channels)), label))
    return tuple(cases), len(found)


def parse_listing(root: Path, problems: Problems) -> Listing:
    """Parse dataset.json and list the cases; JSON-level errors raise at once, file problems are collected."""
    data = _read_json(root)
    if data.get("layout") == LAULIMA_V1:
        return _laulima(root, data, problems)
    if "layout" in data:
        raise _fail(root, f"layout {data['layout']!r} is not known", f'the only declared layout is "{LAULIMA_V1}"')
    if "channel_names" in data or "file_ending" in data:
        return _nnunet(root, data, problems)
    if "modality" in data or "training" in data:
        return _decathlon(root, data, problems)
    raise _fail(
        root,
        f"neither Decathlon nor nnU-Net v2 (keys: {', '.join(sorted(data)) or 'none'})",
        f"Decathlon needs {', '.join(_DECATHLON_KEYS)}; nnU-Net v2 needs {', '.join(_NNUNET_KEYS)}",
    )


def _laulima_file(root: Path, value: Any, where: str, problems: Problems, *, label: bool) -> Path | None:
    """An image (series reference or NIfTI) or label (NIfTI): absolute, or relative and inside the folder."""
    from laulima.imaging.series_ref import is_series_ref_name

    if not isinstance(value, str) or not value.strip():
        problems.add(root / "dataset.json", f"{where} is {value!r}, not a file path", "re-register the dataset")
        return None
    given = Path(value.strip())
    path = Path(os.path.normpath(given if given.is_absolute() else root / given))
    if not given.is_absolute() and not path.is_relative_to(root):
        problems.add(root / "dataset.json", f"{where} {value!r} points outside the dataset folder", "list files in it")
        return None
    if not (is_nifti_name(path) or (not label and is_series_ref_name(path))):
        kind = "a NIfTI label map" if label else "a series reference (.series.json) or NIfTI file"
        problems.add(path, f"{where} is not {kind}", "re-register the dataset")
        return None
    if not path.is_file():
        problems.add(path, f"listed in dataset.json ({where}) but missing", "restore it or re-register the dataset")
        return None
    return path


def _laulima_cases(root: Path, data: dict[str, Any], key: str, n_channels: int, problems: Problems) -> list[Case]:
    cases = []
    for i, entry in enumerate(_entries(root, data, key)):
        where = f"{key}[{i}]"
        images = entry.get("image") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or not isinstance(images, list):
            problems.add(root / "dataset.json", f"{where} is {entry!r}", 'write {"id", "image": [...], "label"}')
            continue
        if len(images) != n_channels:
            problems.add(
                root / "dataset.json",
                f"{where} lists {len(images)} image(s), the dataset has {n_channels} channel(s)",
                "list one image per channel",
            )
            continue
        found = [_laulima_file(root, v, f"{where}.image[{c}]", problems, label=False) for c, v in enumerate(images)]
        label = entry.get("label")
        label_path = None if label is None else _laulima_file(root, label, f"{where}.label", problems, label=True)
        if all(p is not None for p in found) and (label is None or label_path is not None):
            cases.append(Case(entry["id"], tuple(p for p in found if p is not None), label_path))
    return cases


def _laulima(root: Path, data: dict[str, Any], problems: Problems) -> Listing:
    _require(root, data, _LAULIMA_KEYS, "laulima-v1")
    channels = data["channels"]
    if not isinstance(channels, list) or not channels or not all(isinstance(c, str) and c for c in channels):
        raise _fail(root, f'channels must be a non-empty list of names like ["MR"], got {channels!r}', "fix it")
    labels = _decathlon_labels(root, data["labels"])
    declared = _count(root, data, "numTraining")
    training = _laulima_cases(root, data, "training", len(channels), problems)
    test = _laulima_cases(root, data, "test", len(channels), problems)
    listed = len(data["training"]) if isinstance(data["training"], list) else 0
    return Listing(
        root, LAULIMA_V1, str(data["name"]), tuple(channels), labels, frozenset(labels), tuple(training), tuple(test),
        declared, listed,
    )  # fmt: skip
