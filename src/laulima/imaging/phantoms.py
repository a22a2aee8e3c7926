"""Brain MRI phantoms — deformed MNI152 anatomy seen through a site's scanner — written per site.

Synthetic, never patients. Every phantom is a pure function of ``(seed, site_index, split,
index)``: its anatomy and its scanner noise come from two independent streams of one numpy
SeedSequence, so the same subject can be imaged by another scanner profile, and a site's
test phantoms (their own split) do not change with the training cohort size.

Brain-tumour sites also differ in their patients and protocols: each site has a
:class:`~laulima.imaging.tumour.TumourProfile` (case mix: mostly small, mostly large or mixed
tumours; how strongly its FLAIR shows lesions), chosen by site index like the scanner
profile. A site's training and test phantoms both follow its own scanner and case mix, as a
hospital's test patients come from its own population; ``dataset.json`` records both.

A site's dataset is written in the Decathlon layout, built beside ``dest`` under a hidden
temporary name and renamed into place only when complete: a crash, a full disk or an
interrupt leaves nothing at ``dest`` that a site agent could mistake for a dataset.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from laulima.errors import ConfigurationError
from laulima.imaging import tumour
from laulima.imaging.anatomy import deformed_anatomy, synthesise
from laulima.imaging.atlas import TISSUE_NAMES, load_atlas
from laulima.imaging.nifti import write_label_nifti, write_nifti
from laulima.imaging.scanner import (
    DEFAULT_COHORTS,
    SCANNER_PROFILES,
    ScannerProfile,
    apply_scanner,
    default_cohort,
    site_profile,
)
from laulima.imaging.tumour import TumourProfile, site_tumour_profile
from laulima.private_files import replace_dir

__all__ = [
    "DEFAULT_COHORTS",
    "LICENCE",
    "REFERENCE",
    "SCANNER_PROFILES",
    "TASKS",
    "Phantom",
    "ScannerProfile",
    "TaskInfo",
    "TumourProfile",
    "make_phantom",
    "phantom_rngs",
    "write_site_dataset",
]

TRAIN, TEST = 0, 1


@dataclass(frozen=True)
class TaskInfo:
    """What a phantom task produces: its channels and its label names (Decathlon conventions)."""

    name: str
    channels: tuple[str, ...]
    labels: dict[int, str]
    case_prefix: str
    description: str


TASKS: dict[str, TaskInfo] = {
    "brain-tissue": TaskInfo(
        "brain-tissue",
        ("T1w",),
        dict(enumerate(TISSUE_NAMES)),
        "tissue",
        "Brain tissue segmentation (CSF, grey matter, white matter) on T1-weighted phantoms.",
    ),
    "brain-tumour": TaskInfo(
        "brain-tumour",
        tumour.CHANNELS,
        dict(tumour.LABELS),
        "tumour",
        "Brain tumour segmentation (oedema, non-enhancing and enhancing tumour) on four-contrast phantoms.",
    ),
}


@dataclass(frozen=True, eq=False)
class Phantom:
    image: np.ndarray  # float32 [C,X,Y,Z]
    label: np.ndarray  # uint8 [X,Y,Z]
    affine: np.ndarray  # 4x4 voxel -> RAS mm


def phantom_rngs(seed: int, site_index: int, split: int, index: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent generators for one phantom's anatomy and for its scanner effects."""
    anatomy, scanner = np.random.SeedSequence([seed, site_index, split, index]).spawn(2)
    return np.random.default_rng(anatomy), np.random.default_rng(scanner)


def make_phantom(
    task: str,
    profile: ScannerProfile,
    *,
    seed: int,
    site_index: int,
    split: int,
    index: int,
    spacing_mm: float = 4.0,
    shape: tuple[int, int, int] = (48, 48, 48),
    tumour_profile: TumourProfile | None = None,
) -> Phantom:
    """One phantom of ``task`` (a key of ``TASKS``); ``split`` 0 is training, 1 is test.

    ``tumour_profile`` (brain-tumour only): the site's case mix; None: ``site_tumour_profile(site_index, seed)``.
    """
    if task not in TASKS:
        raise ConfigurationError(f"unknown phantom task {task!r}; choose one of {sorted(TASKS)}", field="task")
    atlas = load_atlas(spacing_mm, shape)
    anatomy_rng, scanner_rng = phantom_rngs(seed, site_index, split, index)
    anatomy = deformed_anatomy(atlas, anatomy_rng)
    if task == "brain-tumour":
        lesions = tumour_profile or site_tumour_profile(site_index, seed)
        ideal, label = tumour.tumour_image(anatomy, atlas.spacing_mm, anatomy_rng, lesions)
    else:
        ideal, label = synthesise(anatomy, anatomy.template_means)[None], anatomy.labels
    image = apply_scanner(ideal, profile, atlas.spacing_mm, scanner_rng)
    return Phantom(image, label, np.array(atlas.affine))


REFERENCE = "synthetic phantoms from the MNI152 template — not patients"
LICENCE = (
    "Synthetic data derived from the ICBM 2009a nonlinear symmetric MNI152 template as shipped with nilearn; "
    "the template's notice applies: Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, "
    "Montreal Neurological Institute, McGill University."
)


def _check(task: str, site_index: int, n_sites: int, seed: int, n_train: int, n_test: int) -> None:
    if seed < 0:
        raise ConfigurationError(f"seed must be a non-negative integer, got {seed}", field="seed")
    if task not in TASKS:
        raise ConfigurationError(f"unknown phantom task {task!r}; choose one of {sorted(TASKS)}", field="task")
    if not 0 <= site_index < n_sites:
        raise ConfigurationError(f"site_index {site_index} is outside 0..{n_sites - 1} (n_sites={n_sites})")
    if n_train < 1 or n_test < 0:
        raise ConfigurationError(f"need at least one training phantom and no negative counts (got {n_train}, {n_test})")


def write_site_dataset(
    dest: Path,
    *,
    task: str = "brain-tissue",
    site_index: int,
    n_sites: int,
    seed: int,
    n_train: int | None = None,
    n_test: int = 4,
    spacing_mm: float = 4.0,
    shape: tuple[int, int, int] = (48, 48, 48),
    overwrite: bool = False,
) -> Path:
    """Write site ``site_index``'s phantoms to ``dest`` (Decathlon layout); ``n_train`` None: the default cohort."""
    n_train = default_cohort(site_index) if n_train is None else n_train
    _check(task, site_index, n_sites, seed, n_train, n_test)
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise ConfigurationError(f"{dest} already exists; remove it or pass overwrite=True", file=str(dest))
    info = TASKS[task]
    profile = site_profile(site_index, seed)
    lesions = site_tumour_profile(site_index, seed) if task == "brain-tumour" else None
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".partial"))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0o700 would follow the folder to dest
        entries: dict[int, list[dict[str, str]]] = {TRAIN: [], TEST: []}
        for split, count, suffix in ((TRAIN, n_train, "Tr"), (TEST, n_test, "Ts")):
            (tmp / f"images{suffix}").mkdir()
            (tmp / f"labels{suffix}").mkdir()
            for index in range(count):
                phantom = make_phantom(
                    task, profile, seed=seed, site_index=site_index, split=split, index=index,
                    spacing_mm=spacing_mm, shape=shape, tumour_profile=lesions,
                )  # fmt: skip
                number = index if split == TRAIN else n_train + index
                file = f"{info.case_prefix}_s{site_index}_{number:03d}.nii.gz"
                image = phantom.image[0] if len(info.channels) == 1 else phantom.image
                write_nifti(tmp / f"images{suffix}" / file, image, phantom.affine)
                write_label_nifti(tmp / f"labels{suffix}" / file, phantom.label, phantom.affine)
                entries[split].append({"image": f"./images{suffix}/{file}", "label": f"./labels{suffix}/{file}"})
        description = {
            "name": f"laulima-{task}-site{site_index}",
            "description": f"{info.description} Site {site_index} of {n_sites}, scanner profile {profile.name}"
            + (f", case mix {lesions.name}." if lesions is not None else "."),
            "reference": REFERENCE,
            "licence": LICENCE,
            "release": "laulima phantoms 1",
            "tensorImageSize": "3D" if len(info.channels) == 1 else "4D",
            "modality": {str(i): name for i, name in enumerate(info.channels)},
            "labels": {str(k): v for k, v in info.labels.items()},
            "numTraining": n_train,
            "numTest": n_test,
            "training": entries[TRAIN],
            "test": entries[TEST],
            "laulima": {
                "task": task, "site_index": site_index, "n_sites": n_sites, "seed": seed,
                "spacing_mm": spacing_mm, "shape": list(shape), "scanner": dataclasses.asdict(profile),
                **({"tumour_profile": dataclasses.asdict(lesions)} if lesions is not None else {}),
            },
        }  # fmt: skip
        (tmp / "dataset.json").write_text(json.dumps(description, indent=2, ensure_ascii=False) + "\n", "utf-8")
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest

