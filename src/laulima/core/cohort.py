"""Which cases of a site's data an experiment trains on: a cohort filter, resolved at each site.

A spec names a dataset (``dataset = "brain"``) or every dataset with a tag
(``dataset = "tag:t1-brain"``), and may narrow it with ``[cohort]``: modality, a spacing
range, label presence, a series-description pattern, a minimum size. The hub only passes
the filter on; each site resolves it against its own catalog and tells the hub nothing but
how many cases it holds. Pure: :func:`case_matches` decides one case from its recorded
properties.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["TAG_PREFIX", "CohortFilter", "case_matches", "dataset_tag"]

TAG_PREFIX = "tag:"
"""``dataset = "tag:NAME"``: every dataset the site registered with that tag."""


class CohortFilter(BaseModel):
    """Conditions every case of the cohort meets; unset ones do not filter."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    modality: Annotated[str, Field(pattern=r"^[A-Z]{2,16}$")] | None = None
    """DICOM modality (``MR``, ``CT``); NIfTI datasets record the one dataset.json declares, if any."""
    spacing_min: Annotated[float, Field(gt=0, le=100)] | None = None
    """Every axis's voxel spacing (mm) at least this."""
    spacing_max: Annotated[float, Field(gt=0, le=100)] | None = None
    """Every axis's voxel spacing (mm) at most this."""
    has_label: bool | None = None
    """Only cases with (true) or without (false) a label map."""
    series_description: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[\x20-\x7e]+$")] | None = None
    """Shell-style pattern (``*T1*``), matched without regard to case."""
    min_cases: Annotated[int, Field(ge=1, le=10**9)] | None = None
    """The experiment's own minimum: a site with fewer matching cases refuses (as its policy's
    ``min_cohort`` would)."""

    @model_validator(mode="after")
    def _range(self) -> CohortFilter:
        if self.spacing_min is not None and self.spacing_max is not None and self.spacing_min > self.spacing_max:
            raise ValueError(f"spacing_min {self.spacing_min} is above spacing_max {self.spacing_max}")
        return self

    @property
    def filters_cases(self) -> bool:
        """Whether any condition narrows the cases (``min_cases`` alone does not)."""
        return any(
            v is not None
            for v in (self.modality, self.spacing_min, self.spacing_max, self.has_label, self.series_description)
        )


def case_matches(
    cohort: CohortFilter,
    *,
    modality: str | None,
    spacing: Sequence[float] | None,
    has_label: bool,
    series_description: str | None,
) -> bool:
    """Whether one case, as the site's catalog recorded it, belongs to ``cohort``. An unknown
    property fails a condition on it: a case is in only if it is known to match."""
    if cohort.modality is not None and (modality or "").upper() != cohort.modality:
        return False
    if cohort.spacing_min is not None or cohort.spacing_max is not None:
        if not spacing or not all(isinstance(s, int | float) and math.isfinite(s) for s in spacing):
            return False
        if cohort.spacing_min is not None and min(spacing) < cohort.spacing_min:
            return False
        if cohort.spacing_max is not None and max(spacing) > cohort.spacing_max:
            return False
    if cohort.has_label is not None and has_label != cohort.has_label:
        return False
    if cohort.series_description is not None:
        return fnmatchcase((series_description or "").lower(), cohort.series_description.lower())
    return True


def dataset_tag(dataset: str) -> str | None:
    """The tag a spec's ``dataset = "tag:NAME"`` names, or None for a dataset name."""
    return dataset[len(TAG_PREFIX) :] if dataset.startswith(TAG_PREFIX) else None
