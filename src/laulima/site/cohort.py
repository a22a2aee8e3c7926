"""How many cases each registered dataset holds: what the agent reports to the hub.

The hub bounds the sample count a site claims for an update by these numbers, so they come
from what a layout declares or lists — ``dataset.json``, a folder listing, the rows of a
CSV — never from opening an image, and a dataset of a layout this module does not know
counts as None (no bound) rather than a guess. The report carries names and counts only,
never a path.

Counted are the cases an algorithm trains on: a Decathlon or nnU-Net v2 folder's training
cases (``numTraining``, else the training entries), a tabular folder's ``train.csv`` rows.
Where the catalog recorded a dataset's cases at registration (Decathlon, nnU-Net v2, DICOM:
every case checked), its count of training cases is used (``catalog_count``); the folder
is read only for datasets without case rows (tabular, or migrated from catalog.json).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from laulima import __version__
from laulima.core.protocol import N_SAMPLES_MAX, SiteReport
from laulima.errors import ConfigurationError, DataError
from laulima.site.catalog import Catalog

__all__ = ["MAX_DATASETS", "catalog_count", "count_cases", "site_report"]

log = logging.getLogger("laulima.site")

MAX_DATASETS = 256
"""Datasets one report may carry (the hub's limit); more are left out, with a warning."""
TRAIN_CSV = "train.csv"
"""The tabular layout's training file (``laulima.algorithms.tabular_data``)."""
_JSON_MAX = 16 << 20
"""A dataset.json larger than this is not one of the layouts counted here."""
_NNUNET_CASE = re.compile(r"^(?P<case>.+)_\d{4}$")


def count_cases(path: str | Path) -> int | None:
    """Training cases of the dataset at ``path``, or None for an unknown or unreadable layout."""
    try:
        n = _count(Path(path))
    except (OSError, ValueError):  # unreadable, not JSON or not UTF-8: no count, never an error
        return None
    return None if n is None else min(n, N_SAMPLES_MAX)


def catalog_count(catalog: Catalog, name: str) -> int | None:
    """Training cases of the registered dataset ``name``: the catalog's case count, else ``count_cases``."""
    try:
        info = catalog.info(name)
    except DataError:  # removed since the names were listed
        return None
    if info.n_training is not None:
        return min(info.n_training, N_SAMPLES_MAX)
    return count_cases(info.path)


def site_report(catalog: Catalog) -> SiteReport:
    """This agent's version and the case counts of the datasets in ``catalog``.

    Raises ConfigurationError if the catalog cannot be read or holds names the hub would refuse.
    """
    names = sorted(catalog.list().items())
    if len(names) > MAX_DATASETS:
        log.warning(
            "site %s: %d datasets registered; the report to the hub carries the first %d by name",
            catalog.site,
            len(names),
            MAX_DATASETS,
        )
        names = names[:MAX_DATASETS]
    try:
        return SiteReport(version=__version__, datasets={name: catalog_count(catalog, name) for name, _ in names})
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigurationError(
            f"{catalog.path}: cannot report the catalog to the hub ({'.'.join(map(str, err['loc']))}: {err['msg']}); "
            "re-register the dataset under a name of letters, digits, '.', '_' or '-'",
            file=str(catalog.path),
        ) from exc


def _count(path: Path) -> int | None:
    if path.is_file():
        return _csv_rows(path) if path.suffix.lower() == ".csv" else None
    if not path.is_dir():
        return None
    data = _dataset_json(path)
    if data is not None:
        if "channel_names" in data or "file_ending" in data:
            return _nnunet(path, data)
        if "modality" in data or "training" in data:
            return _decathlon(data)
    if (path / TRAIN_CSV).is_file():
        return _csv_rows(path / TRAIN_CSV)
    return None


def _dataset_json(root: Path) -> dict[str, Any] | None:
    path = root / "dataset.json"
    if not path.is_file() or path.stat().st_size > _JSON_MAX:
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else None


def _declared(data: dict[str, Any]) -> int | None:
    value = data.get("numTraining")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _decathlon(data: dict[str, Any]) -> int | None:
    declared = _declared(data)
    if declared is not None:
        return declared
    training = data.get("training")
    return len(training) if isinstance(training, list) else None


def _nnunet(root: Path, data: dict[str, Any]) -> int | None:
    declared = _declared(data)
    if declared is not None:
        return declared
    ending = data.get("file_ending")
    images = root / "imagesTr"
    if not isinstance(ending, str) or not ending or not images.is_dir():
        return None
    cases = set()
    for entry in images.iterdir():  # one file per case and channel: CASE_0000.nii.gz, CASE_0001.nii.gz
        name = entry.name
        match = _NNUNET_CASE.match(name[: -len(ending)]) if name.endswith(ending) else None
        if match is not None and not name.startswith("."):
            cases.add(match["case"])
    return len(cases)


def _csv_rows(path: Path) -> int:
    """Data rows: non-blank lines after the header (as ``read_tabular`` counts them).

    Read in 1 MiB chunks, so neither a huge file nor one endless line is held in memory.
    """
    lines, open_line = 0, False
    with open(path, "rb") as fh:
        while (chunk := fh.read(1 << 20)) and lines <= N_SAMPLES_MAX:
            *ended, rest = chunk.split(b"\n")
            for part in ended:
                lines += open_line or bool(part.strip())
                open_line = False
            open_line = open_line or bool(rest.strip())
    return max(lines + open_line - 1, 0)
