"""A task's cohort at this site: the spec's dataset (a name or a tag) and ``[cohort]`` filter,
resolved against the site's own catalog.

The hub never learns which cases these are; the site uses them and reports counts only.
:func:`resolve` reads the catalog (which datasets, which cases, what the sandbox must let
the algorithm read); :func:`materialize` writes, when the cohort is not simply one whole
registered dataset, a ``laulima-v1`` dataset.json into the task's folder listing exactly the
chosen cases, so the algorithm reads that cohort and nothing else. Images are never copied.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from laulima.core.cohort import CohortFilter, case_matches, dataset_tag
from laulima.errors import DataError
from laulima.private_files import private_dir, write_atomic
from laulima.site.catalog import CaseRecord, Catalog
from laulima.site.cohort import count_cases

__all__ = ["COHORT_DIR", "Resolution", "materialize", "resolve"]

COHORT_DIR = "cohort"
"""``task_dir/cohort/dataset.json``: the cohort a filtered or tagged task reads."""


@dataclass(frozen=True)
class Resolution:
    """What a task's dataset and cohort filter mean at this site."""

    datasets: tuple[str, ...]
    """The registered datasets it draws from, by name."""
    cases: tuple[CaseRecord, ...] | None
    """The chosen cases; None when the cohort is one whole registered dataset (read as it is)."""
    path: Path
    """The whole dataset's folder, when ``cases`` is None."""
    readable: tuple[Path, ...]
    """Everything the algorithm must read: the sandbox grants exactly these."""
    n_cases: int | None
    """Cases in the cohort (None: the dataset's layout gives no count)."""
    described: str
    """How reasons name it: ``dataset 'brain'``, ``datasets tagged 't1'``, plus ``(filtered)``."""


def resolve(catalog: Catalog, dataset: str, cohort: CohortFilter | None) -> Resolution:
    """Resolve a task's ``dataset`` and ``cohort`` here; ``DataError`` names what is missing."""
    tag = dataset_tag(dataset)
    names = tuple(sorted(catalog.with_tag(tag))) if tag is not None else (dataset,)
    described = f"datasets tagged {tag!r}" if tag is not None else f"dataset {dataset!r}"
    if not names:
        raise DataError(
            f"no dataset at this site carries the tag {tag!r}; tag one with `laulima site dataset add NAME SOURCE "
            f"--tag {tag}`",
            dataset=dataset,
        )
    readable = tuple(p for name in names for p in catalog.readable(name))
    narrowing = cohort is not None and cohort.filters_cases
    if len(names) == 1 and not narrowing:
        path = catalog.get(names[0])
        records = catalog.cases(names[0])
        n = len(records) if records else count_cases(path)
        return Resolution(names, None, path, readable, n, described)
    chosen: list[CaseRecord] = []
    for name in names:
        records = catalog.cases(name)
        if not records:
            raise DataError(
                f"dataset {name!r} has no per-case records at this site (registered by an older version, or not an "
                f"imaging dataset), so {described} cannot be filtered or combined; re-register it with "
                f"`laulima site dataset add {name} SOURCE`",
                dataset=name,
            )
        chosen += [r for r in records if cohort is None or _matches(cohort, r)]
    if narrowing:
        described += " (filtered)"
    return Resolution(names, tuple(chosen), catalog.get(names[0]), readable, len(chosen), described)


def _matches(cohort: CohortFilter, record: CaseRecord) -> bool:
    return case_matches(
        cohort,
        modality=record.modality,
        spacing=record.spacing,
        has_label=record.has_label,
        series_description=record.series_description,
    )


def materialize(resolution: Resolution, catalog: Catalog, task_dir: Path) -> Path:
    """The folder the algorithm reads: the whole dataset's, or ``task_dir/cohort`` holding a
    ``laulima-v1`` dataset.json of exactly the chosen cases (labelled ones for training,
    the others as test cases)."""
    if resolution.cases is None:
        return resolution.path
    channels, labels = _common_schema(resolution, catalog)
    training = [_entry(r) for r in resolution.cases if r.label is not None]
    test = [_entry(r) for r in resolution.cases if r.label is None]
    view = {
        "layout": "laulima-v1",
        "name": "+".join(resolution.datasets),
        "channels": list(channels),
        "labels": {str(k): v for k, v in sorted(labels.items())},
        "numTraining": len(training),
        "training": training,
        "test": test,
    }
    folder = task_dir / COHORT_DIR
    private_dir(folder)
    write_atomic(folder / "dataset.json", json.dumps(view, indent=1))
    return folder


def _entry(record: CaseRecord) -> dict[str, Any]:
    return {
        "id": record.case_id,
        "image": [str(p) for p in record.images],
        "label": str(record.label) if record.label is not None else None,
    }


def _common_schema(resolution: Resolution, catalog: Catalog) -> tuple[tuple[str, ...], dict[int, str]]:
    """Channels shared by every dataset of the cohort, and their labels merged (a dataset without
    labels adds none); different channels, or one value named differently, are refused."""
    from laulima.imaging.layouts import Problems, parse_listing

    channels: tuple[str, ...] | None = None
    labels: dict[int, str] = {}
    for name in resolution.datasets:
        root = catalog.get(name)
        listing = parse_listing(root, Problems(root))
        if channels is not None and tuple(listing.channels) != channels:
            raise DataError(
                f"{resolution.described}: dataset {name!r} has channels {list(listing.channels)}, "
                f"{resolution.datasets[0]!r} has {list(channels)}; tag only datasets of the same kind together",
                dataset=name,
            )
        channels = tuple(listing.channels)
        for value, label in listing.labels.items():
            if value != 0 and labels.get(value, label) != label:
                raise DataError(
                    f"{resolution.described}: label {value} is {label!r} in dataset {name!r} but "
                    f"{labels[value]!r} in another; register them with the same label names",
                    dataset=name,
                )
            labels.setdefault(value, label)
    assert channels is not None
    return channels, labels
