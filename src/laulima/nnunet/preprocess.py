"""A site's cases in nnU-Net's raw layout and preprocessed by nnU-Net's own ``DefaultPreprocessor``, cached.

Every task of an experiment runs in a fresh process, and converting and preprocessing the
cohort costs more than a round of training on a CPU, so both results are kept in the
experiment's private cache folder at the site and reused while their inputs are unchanged:

* the raw view (:func:`laulima.nnunet.rawview.build_raw_view`) is keyed by the dataset's case
  files (paths, sizes, modification times) and the split;
* the preprocessed folder by the checked plan, dataset.json, nnunetv2's version and the raw
  files (names, sizes, modification times) of the cases it holds.

Each entry is built under a hidden temporary name and renamed into place when complete, so a
crash never leaves a half-written entry, and two tasks building the same entry at once both
end up reading one whole copy. Preprocessing runs in-process, one case at a time (a task
worker must not start processes), with nnU-Net's ``run_case``; each case is saved as its
``run_case_save`` saves it but with no pickle (:mod:`laulima.nnunet.cache_io`):
``<case>.b2nd``, ``<case>_seg.b2nd`` and ``properties/<case>.json``, which ``nnUNetTrainer``
reads through :class:`~laulima.nnunet.cache_io.JsonPropertiesDataset`. Nothing in the cache is
ever unpickled, so a tampered cache cannot run code.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from laulima.errors import DataError
from laulima.nnunet.params import NnUNetParams
from laulima.nnunet.rawview import FILE_ENDING, RawCase, RawView, build_raw_view
from laulima.private_files import private_dir

if TYPE_CHECKING:
    from laulima.imaging.layouts import SegmentationDataset

__all__ = ["CACHE_FOLDER", "Preprocessed", "cached_raw_view", "preprocess_cases", "preprocessing_key"]

CACHE_FOLDER = "nnunet"
"""Entries live in ``<cache>/nnunet/``: ``raw-<split>-<key>/`` and ``preprocessed-<key>/``."""
_FORMAT = 2  # bump when what an entry holds changes, so old entries are not reused (2: JSON properties, no .pkl)
_FOLDERS = {"training": ("imagesTr", "labelsTr"), "test": ("imagesTs", "labelsTs")}


@dataclass(frozen=True)
class Preprocessed:
    """An ``nnUNet_preprocessed`` root holding ``<dataset_name>/<data_identifier>/`` with ``case_ids``."""

    root: Path
    folder: Path
    case_ids: tuple[str, ...]
    key: str
    reused: bool


def cached_raw_view(
    dataset: SegmentationDataset, cache: Path, *, split: Literal["training", "test"], dataset_name: str
) -> RawView:
    """The raw view of ``split``'s labelled cases of ``dataset`` (checked by ``load_dataset`` already),
    from the cache when the dataset's files are unchanged."""
    cases = [c for c in (dataset.training if split == "training" else dataset.test) if c.label is not None]
    files = [path for case in cases for path in (*case.images, case.label) if path is not None]
    key = _digest({"format": _FORMAT, "split": split, "name": dataset_name, "files": _stats(files)})
    final = private_dir(Path(cache) / CACHE_FOLDER) / f"raw-{split}-{key[:24]}"

    def build(tmp: Path) -> None:
        build_raw_view(dataset.root, tmp, split=split, dataset_name=dataset_name)

    _ensure(final, build)
    return _read_view(final / dataset_name, split)


def preprocessing_key(params: NnUNetParams, cases: Sequence[RawCase]) -> str:
    """What the preprocessed cases depend on: the plan, dataset.json, nnU-Net's version and the raw files."""
    from importlib.metadata import version

    return _digest(
        {
            "format": _FORMAT,
            "nnunetv2": version("nnunetv2"),
            "plans": params.plans,
            "configuration": params.configuration,
            "dataset_json": params.dataset_json,
            "cases": [[case.id, _stats([*case.images, case.label])] for case in cases],
        }
    )


def preprocess_cases(params: NnUNetParams, cases: Sequence[RawCase], cache: Path) -> Preprocessed:
    """``cases`` preprocessed under ``params``' plan by nnU-Net's ``DefaultPreprocessor``, built once per key."""
    if not cases:
        raise DataError("no labelled cases to preprocess for nnU-Net training")
    key = preprocessing_key(params, cases)
    final = private_dir(Path(cache) / CACHE_FOLDER) / f"preprocessed-{key[:24]}"
    identifier = params.config["data_identifier"]
    dataset_name = params.plans["dataset_name"]
    reused = _ensure(final, lambda tmp: _preprocess_into(params, cases, tmp / dataset_name / identifier))
    return Preprocessed(
        root=final,
        folder=final / dataset_name / identifier,
        case_ids=tuple(case.id for case in cases),
        key=key,
        reused=reused,
    )


def _preprocess_into(params: NnUNetParams, cases: Sequence[RawCase], folder: Path) -> None:
    import blosc2
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from laulima.nnunet.cache_io import save_case

    blosc2.set_nthreads(1)
    private_dir(folder.parent)
    private_dir(folder)
    plans_manager = PlansManager(json.loads(json.dumps(params.plans)))  # (nnU-Net may write into its dicts)
    configuration = plans_manager.get_configuration(params.configuration)
    preprocessor = DefaultPreprocessor(verbose=False)
    for case in cases:
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                data, seg, properties = preprocessor.run_case(
                    [str(p) for p in case.images], str(case.label), plans_manager, configuration, params.dataset_json
                )
        except (AssertionError, RuntimeError, ValueError, OSError) as exc:
            raise DataError(
                f"nnU-Net could not preprocess case {case.id} ({case.images[0].name}): {exc}; check that its "
                "channels and label map share one grid",
                file=str(case.images[0]),
            ) from exc
        save_case(data, seg, properties, str(folder / case.id), configuration.patch_size)


def _ensure(final: Path, build: Callable[[Path], None]) -> bool:
    """``final`` exists afterwards; True when it was there already. Built in a temporary folder, renamed in."""
    if final.is_dir():
        return True
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".partial"))
    try:
        build(tmp)
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another task put the same entry in place first
        return True
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return False


def _read_view(root: Path, split: str) -> RawView:
    """A raw view written by ``build_raw_view``, listed again from its folder."""
    dataset_json: dict[str, Any] = json.loads((root / "dataset.json").read_text("utf-8"))
    images_dir, labels_dir = (root / name for name in _FOLDERS[split])
    n_channels = len(dataset_json["channel_names"])
    cases = []
    for label in sorted(labels_dir.glob(f"case_*{FILE_ENDING}")):
        case = label.name[: -len(FILE_ENDING)]
        images = tuple(images_dir / f"{case}_{c:04d}{FILE_ENDING}" for c in range(n_channels))
        missing = [p for p in images if not p.is_file()]
        if missing:
            raise DataError(
                f"{root}: the cached nnU-Net raw view lacks {missing[0].name}; delete {root.parent} to rebuild it",
                file=str(missing[0]),
            )
        cases.append(RawCase(case, images, label))
    return RawView(root, dataset_json, tuple(cases))


def _stats(files: Sequence[Path]) -> list[list[Any]]:
    out = []
    for path in files:
        try:
            st = Path(path).stat()
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc})", file=str(path)) from exc
        out.append([str(path), st.st_size, st.st_mtime_ns])
    return out


def _digest(document: Any) -> str:
    return hashlib.sha256(json.dumps(document, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()
