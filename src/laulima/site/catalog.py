"""The site's dataset catalog: which local data a task's dataset name refers to, checked case by case.

Tasks name datasets, never paths: the hub cannot make a site read anything its admin did
not register here. The catalog is ``home/catalog.db`` (SQLite): a row per dataset (kind,
source, tags, when, what was skipped) and a row per case (modality, series description,
shape, spacing, orientation, label, checksums, UIDs). Images stay where they are.

What ``add`` accepts, by what the source is
    - a folder with ``dataset.json`` (Decathlon or nnU-Net v2): validated by
      ``load_dataset`` (every case, every label) and recorded case by case;
    - a folder tree holding DICOM files: ``inspect_dicom_tree`` checks every case; a
      source with bad cases is refused whole, listing them, unless ``skip_bad``. The
      catalog then writes ``home/datasets/<name>/``: a laulima-v1 ``dataset.json``, one
      series reference per case (``series/<case_id>.series.json``, the slice files by
      absolute path) and SEG labels converted to NIfTI (``labels/<case_id>.nii.gz``); the
      DICOM files themselves are not copied;
    - anything else that exists (a tabular folder with train.csv, an empty folder, a
      file): registered as it is (kind "folder"), with no case rows.

``get`` returns what the algorithm reads (the source folder, or the written dataset
folder of a DICOM source); ``readable`` everything a task on the dataset must be able to
read, which is what the sandbox grants. A ``catalog.json`` of earlier versions is migrated
on first open (its entries become datasets without case rows) and renamed
``catalog.json.migrated``. Every call opens the database anew, so an agent sees datasets
registered while it runs; a write is one transaction.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import os
import re
import shutil
import sqlite3
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from laulima.errors import ConfigurationError, DataError
from laulima.private_files import PRIVATE_FILE, private_dir

if TYPE_CHECKING:
    from laulima.imaging.dicom_study import DicomInspection

__all__ = [
    "CATALOG_FILE",
    "DATASETS_DIR",
    "KINDS",
    "LEGACY_FILE",
    "CaseRecord",
    "Catalog",
    "DatasetInfo",
]

CATALOG_FILE = "catalog.db"
LEGACY_FILE = "catalog.json"
DATASETS_DIR = "datasets"
"""Under the home: the folders written for DICOM sources (dataset.json, series references, labels)."""
KINDS = ("decathlon", "nnunet-v2", "dicom", "dicomweb", "folder")
_WRITTEN_KINDS = ("dicom", "dicomweb")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS datasets (
    name TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    source TEXT NOT NULL,
    root TEXT,
    path TEXT NOT NULL,
    tags TEXT NOT NULL DEFAULT '[]',
    added_at REAL NOT NULL,
    skipped TEXT NOT NULL DEFAULT '[]',
    n_cases INTEGER,
    n_training INTEGER
);
CREATE TABLE IF NOT EXISTS cases (
    dataset TEXT NOT NULL,
    case_id TEXT NOT NULL,
    split TEXT NOT NULL,
    modality TEXT NOT NULL DEFAULT '',
    series_description TEXT NOT NULL DEFAULT '',
    shape TEXT,
    spacing TEXT,
    orientation TEXT NOT NULL DEFAULT '',
    has_label INTEGER NOT NULL,
    checksum TEXT NOT NULL,
    images TEXT NOT NULL,
    label TEXT,
    label_checksum TEXT,
    files TEXT NOT NULL,
    study_uid TEXT NOT NULL DEFAULT '',
    series_uid TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (dataset, case_id)
);
"""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    kind: str  # one of KINDS
    source: str  # the path (or URL) it was registered from
    path: Path  # what get() returns
    root: Path | None  # where a DICOM dataset's files lie (the source folder, or a retrieved cache)
    tags: tuple[str, ...]
    n_cases: int | None  # None: a kind without case rows (folder, or migrated from catalog.json)
    n_training: int | None
    skipped: tuple[str, ...]  # one line per case left out by --skip-bad
    added_at: float


@dataclass(frozen=True)
class CaseRecord:
    case_id: str
    images: tuple[Path, ...]  # what the layout lists: NIfTI files, or a series reference
    label: Path | None
    modality: str
    series_description: str
    shape: tuple[int, ...] | None
    spacing: tuple[float, ...] | None
    orientation: str  # axis codes, e.g. "RAS"
    has_label: bool
    checksum: str  # sha256 over the image files' sha256 (slices in order along the normal)
    study_uid: str
    series_uid: str
    split: str  # "training" | "test"
    files: tuple[Path, ...]  # every file the checksums cover: images (slices) and the label's source


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _combined(sums: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sums).encode()).hexdigest()


def _is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _has_dicom(root: Path) -> bool:
    """Any DICOM Part 10 file in the tree (stops at the first). Imports nothing: a tabular-only
    site registers its folders without the imaging extra installed."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if any(not f.startswith(".") and _is_dicom(Path(folder) / f) for f in files):
            return True
    return False


def _guess_kind(path: Path) -> str:
    """decathlon / nnunet-v2 by dataset.json's keys alone (nothing else is opened), else "folder".

    A tabular folder has a dataset.json too, of other keys: it stays a folder. A dataset.json
    that is not valid JSON counts as a layout's, so that ``load_dataset`` says what is wrong.
    """
    if not (path / "dataset.json").is_file():
        return "folder"
    try:
        data = json.loads((path / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "decathlon"
    if not isinstance(data, dict):
        return "folder"
    if data.get("layout") is not None:
        return str(data["layout"])
    if "channel_names" in data or "file_ending" in data:
        return "nnunet-v2"
    return "decathlon" if "modality" in data or "training" in data else "folder"


class Catalog:
    """Dataset name -> registered data and its cases, for one site home."""

    def __init__(self, home: str | Path, site: str | None = None) -> None:
        self.home = Path(home)
        self.path = self.home / CATALOG_FILE
        self.legacy = self.home / LEGACY_FILE
        self.site = site or self.home.name

    # -- registration ------------------------------------------------------------------
    def add(
        self,
        name: str,
        source: str | Path,
        *,
        labels: str | Path | None = None,
        tags: Sequence[str] = (),
        skip_bad: bool = False,
    ) -> Path:
        """Register (or re-register) ``name`` after checking every case of ``source``; returns ``get(name)``.

        Raises DataError, with nothing registered, if the source is missing or holds bad
        cases (DICOM with ``skip_bad``: the good cases are registered, the bad ones recorded).
        """
        self._check_name(name)
        tags = self._check_tags(tags)
        target = self._existing(name, source)
        if target.is_dir() and _guess_kind(target) != "folder":
            self._refuse_options(name, labels, skip_bad, "a Decathlon or nnU-Net v2 folder")
            return self._add_layout(name, target, tags)
        if target.is_dir() and _has_dicom(target):
            return self.add_dicom(name, target, labels=labels, tags=tags, skip_bad=skip_bad)
        self._refuse_options(name, labels, skip_bad, "a folder without dataset.json or DICOM files")
        with self._write() as db:
            self._put(db, name, kind="folder", source=str(target), root=None, path=target, tags=tags)
        return target

    def add_dicom(
        self,
        name: str,
        root: str | Path,
        *,
        source: str | None = None,
        kind: str = "dicom",
        labels: str | Path | None = None,
        tags: Sequence[str] = (),
        skip_bad: bool = False,
        inspection: DicomInspection | None = None,
    ) -> Path:
        """Register the DICOM tree at ``root`` (e.g. a PACS retrieval's cache: ``source`` its URL, ``kind``
        "dicomweb"); returns the written dataset folder. ``inspection``: one already made of ``root``.
        """
        from laulima.imaging.dicom_study import BadCase, inspect_dicom_tree, label_map
        from laulima.imaging.nifti import write_label_nifti
        from laulima.imaging.series_ref import write_series_ref

        self._check_name(name)
        tags = self._check_tags(tags)
        if kind not in _WRITTEN_KINDS:
            raise ConfigurationError(f"kind {kind!r}: a DICOM dataset is one of {', '.join(_WRITTEN_KINDS)}")
        root = self._existing(name, root)
        result = inspection or inspect_dicom_tree(root, labels=Path(labels) if labels is not None else None)
        if (result.bad and not skip_bad) or not result.cases:
            result.raise_if_bad()  # every bad case listed, or: no volumetric series at all
        final = self.home / DATASETS_DIR / name
        private_dir(self.home)
        private_dir(self.home / DATASETS_DIR)
        tmp = self.home / DATASETS_DIR / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
        private_dir(tmp)
        try:
            (tmp / "series").mkdir()
            (tmp / "labels").mkdir()
            bad = list(result.bad)
            rows: list[dict[str, Any]] = []
            for case in result.cases:
                label_path: Path | None = None
                if case.label is not None and case.label.kind == "seg":
                    try:
                        values = label_map(case)
                    except DataError as exc:
                        bad.append(BadCase(str(case.label.path), exc.message, case.series_uid))
                        continue
                    assert values is not None
                    write_label_nifti(tmp / "labels" / f"{case.case_id}.nii.gz", values, case.affine)
                    label_path = final / "labels" / f"{case.case_id}.nii.gz"
                elif case.label is not None:
                    label_path = case.label.path
                write_series_ref(
                    tmp / "series" / f"{case.case_id}.series.json",
                    study_uid=case.study_uid,
                    series_uid=case.series_uid,
                    frame_of_reference_uid=case.frame_of_reference_uid,
                    modality=case.modality,
                    series_description=case.series_description,
                    files=case.files,
                    shape=case.shape,
                    affine=case.affine,
                )
                sums = [_sha256(f) for f in case.files]
                label_source = case.label.path if case.label is not None else None
                label_sum = _sha256(label_source) if label_source is not None else None
                files = [[str(f), s] for f, s in zip(case.files, sums, strict=True)]
                if label_source is not None and label_sum is not None:
                    files.append([str(label_source), label_sum])
                rows.append(
                    {
                        "case_id": case.case_id,
                        # Unlabelled cases cannot be trained on; they are the dataset's test
                        # cases (what a model is run on, and what `site predict` labels).
                        "split": "training" if label_path is not None else "test",
                        "modality": case.modality,
                        "series_description": case.series_description,
                        "shape": list(case.shape),
                        "spacing": list(case.spacing),
                        "orientation": case.orientation,
                        "has_label": label_path is not None,
                        "checksum": _combined(sums),
                        "images": [str(final / "series" / f"{case.case_id}.series.json")],
                        "label": str(label_path) if label_path is not None else None,
                        "label_checksum": label_sum,
                        "files": files,
                        "study_uid": case.study_uid,
                        "series_uid": case.series_uid,
                    }
                )
            if bad and not skip_bad:  # a SEG that could not be converted
                raise DataError(
                    f"{root}: {len(bad)} bad case(s); nothing was registered. Fix these, or register the good "
                    "cases with --skip-bad:\n  " + "\n  ".join(b.line for b in bad[:50]),
                    file=str(root),
                    problems=[b.line for b in bad],
                )
            if not rows:
                raise DataError(
                    f"{root}: no good case to register, {len(bad)} bad:\n  " + "\n  ".join(b.line for b in bad[:50]),
                    file=str(root),
                    problems=[b.line for b in bad],
                )
            modalities = sorted({r["modality"] or "image" for r in rows})
            description = {
                "layout": "laulima-v1",
                "name": name,
                "channels": ["/".join(modalities)],
                "labels": {str(k): v for k, v in result.label_names.items()},
                "numTraining": sum(r["split"] == "training" for r in rows),
                "training": [_view_entry(r) for r in rows if r["split"] == "training"],
                "test": [_view_entry(r) for r in rows if r["split"] == "test"],
                "source": source or str(root),
            }
            (tmp / "dataset.json").write_text(json.dumps(description, indent=1) + "\n", encoding="utf-8")
            for file in tmp.rglob("*"):
                os.chmod(file, PRIVATE_FILE if file.is_file() else 0o700)
            old = self._swap_in(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            with self._write() as db:
                self._put(
                    db,
                    name,
                    kind=kind,
                    source=source or str(root),
                    root=root,
                    path=final,
                    tags=tags,
                    skipped=[b.line for b in bad],
                    cases=rows,
                )
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)
            if old is not None:
                os.replace(old, final)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _add_layout(self, name: str, root: Path, tags: tuple[str, ...]) -> Path:
        """A Decathlon or nnU-Net v2 folder: every case validated, then recorded with its header facts."""
        import numpy as np

        from laulima.imaging.datasets import load_dataset
        from laulima.imaging.dicom_study import orientation_code
        from laulima.imaging.layouts import LAULIMA_V1
        from laulima.imaging.nifti import read_header

        dataset = load_dataset(root)
        if dataset.layout == LAULIMA_V1:
            raise DataError(
                f"{root}: this folder was written by the catalog for a DICOM source; register that source instead",
                file=str(root),
            )
        rows = []
        for split, cases in (("training", dataset.training), ("test", dataset.test)):
            for case in cases:
                header = read_header(case.images[0])
                sums = [_sha256(f) for f in case.images]
                label_sum = _sha256(case.label) if case.label is not None else None
                files = [[str(f), s] for f, s in zip(case.images, sums, strict=True)]
                if case.label is not None and label_sum is not None:
                    files.append([str(case.label), label_sum])
                rows.append(
                    {
                        "case_id": case.id,
                        "split": split,
                        "modality": "+".join(dataset.channels),
                        "series_description": "",
                        "shape": list(header.shape),
                        "spacing": [float(v) for v in np.linalg.norm(header.affine[:3, :3], axis=0)],
                        "orientation": orientation_code(header.affine),
                        "has_label": case.label is not None,
                        "checksum": _combined(sums),
                        "images": [str(f) for f in case.images],
                        "label": str(case.label) if case.label is not None else None,
                        "label_checksum": label_sum,
                        "files": files,
                        "study_uid": "",
                        "series_uid": "",
                    }
                )
        with self._write() as db:
            self._put(db, name, kind=dataset.layout, source=str(root), root=None, path=root, tags=tags, cases=rows)
        return root

    def _swap_in(self, tmp: Path, final: Path) -> Path | None:
        """Move the new folder into place; the previous one (re-registration) is kept aside until committed."""
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.old")
            os.replace(final, old)
        os.replace(tmp, final)
        return old

    # -- queries ---------------------------------------------------------------------------
    def get(self, name: str) -> Path:
        """What the algorithm reads for ``name``; ``DataError`` if unknown or gone."""
        info = self.info(name)
        if not info.path.exists():
            raise DataError(
                f"dataset {name!r} at site {self.site!r} is registered at {info.path}, which no longer "
                f"exists; re-register it with `laulima site dataset add {name} PATH`",
                site=self.site,
                dataset=name,
                file=str(info.path),
            )
        return info.path

    def list(self) -> dict[str, Path]:
        """Every registered dataset, by name: what ``get`` returns."""
        with self._read() as db:
            if db is None:
                return {}
            return {
                row["name"]: Path(row["path"]) for row in db.execute("SELECT name, path FROM datasets ORDER BY name")
            }

    def info(self, name: str) -> DatasetInfo:
        with self._read() as db:
            row = db.execute("SELECT * FROM datasets WHERE name = ?", (name,)).fetchone() if db is not None else None
        if row is None:
            raise DataError(self._unknown(name), site=self.site, dataset=name)
        return DatasetInfo(
            name=row["name"],
            kind=row["kind"],
            source=row["source"],
            path=Path(row["path"]),
            root=Path(row["root"]) if row["root"] else None,
            tags=tuple(json.loads(row["tags"])),
            n_cases=row["n_cases"],
            n_training=row["n_training"],
            skipped=tuple(json.loads(row["skipped"])),
            added_at=float(row["added_at"]),
        )

    def cases(self, name: str) -> builtins.list[CaseRecord]:
        self.info(name)  # unknown: the usual error
        with self._read() as db:
            assert db is not None
            rows = db.execute("SELECT * FROM cases WHERE dataset = ? ORDER BY split DESC, case_id", (name,)).fetchall()
        return [
            CaseRecord(
                case_id=r["case_id"],
                images=tuple(Path(p) for p in json.loads(r["images"])),
                label=Path(r["label"]) if r["label"] else None,
                modality=r["modality"],
                series_description=r["series_description"],
                shape=tuple(json.loads(r["shape"])) if r["shape"] else None,
                spacing=tuple(json.loads(r["spacing"])) if r["spacing"] else None,
                orientation=r["orientation"],
                has_label=bool(r["has_label"]),
                checksum=r["checksum"],
                study_uid=r["study_uid"],
                series_uid=r["series_uid"],
                split=r["split"],
                files=tuple(Path(f) for f, _ in json.loads(r["files"])),
            )
            for r in rows
        ]

    def count(self, name: str) -> int | None:
        """Training cases recorded for ``name``; None where the catalog has no case rows for it."""
        return self.info(name).n_training

    def readable(self, name: str) -> builtins.list[Path]:
        """Every folder or file a task on ``name`` must read: what the sandbox grants, and nothing more.

        The dataset (``get``), for a DICOM dataset the folder its slices lie in, and label
        files outside the dataset folder (a ``--labels`` folder's NIfTI files).
        """
        path = self.get(name)
        info = self.info(name)
        paths = [path]
        if info.root is not None:
            paths.append(info.root)
        for case in self.cases(name):
            if case.label is not None and not case.label.is_relative_to(path) and case.label not in paths:
                paths.append(case.label)
        return paths

    def with_tag(self, tag: str) -> builtins.list[str]:
        with self._read() as db:
            if db is None:
                return []
            rows = db.execute("SELECT name, tags FROM datasets ORDER BY name").fetchall()
        return [row["name"] for row in rows if tag in json.loads(row["tags"])]

    def verify(self, name: str) -> builtins.list[str]:
        """One line per file changed (checksum) or gone since ``name`` was registered; [] if none."""
        info = self.info(name)
        problems = []
        if not info.path.exists():
            problems.append(f"{info.path}: gone since registration (the dataset's folder)")
        with self._read() as db:
            assert db is not None
            rows = db.execute("SELECT case_id, files FROM cases WHERE dataset = ? ORDER BY case_id", (name,)).fetchall()
        for row in rows:
            for file, digest in json.loads(row["files"]):
                path = Path(file)
                if not path.is_file():
                    problems.append(f"{path}: gone since registration (case {row['case_id']})")
                elif _sha256(path) != digest:
                    problems.append(f"{path}: changed since registration (case {row['case_id']})")
        return problems

    def signature(self) -> tuple[int, int, int] | None:
        """Changes whenever the catalog does (a generation counter bumped by every write); None: no catalog."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None if not self.legacy.exists() else (0, 0, 0)
        with self._read() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone() if db is not None else None
        return (int(row["value"]) if row else 0, st.st_mtime_ns, st.st_ino)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        with self._read() as db:
            return (
                db is not None and db.execute("SELECT 1 FROM datasets WHERE name = ?", (name,)).fetchone() is not None
            )

    # -- removal ---------------------------------------------------------------------------
    def remove(self, name: str) -> None:
        """Forget ``name`` (and delete the folder the catalog wrote for it; the source stays)."""
        info = self.info(name)
        with self._write() as db:
            db.execute("DELETE FROM cases WHERE dataset = ?", (name,))
            db.execute("DELETE FROM datasets WHERE name = ?", (name,))
        if info.kind in _WRITTEN_KINDS and info.path.is_relative_to(self.home / DATASETS_DIR):
            shutil.rmtree(info.path, ignore_errors=True)

    # -- storage ---------------------------------------------------------------------------
    def _put(
        self,
        db: sqlite3.Connection,
        name: str,
        *,
        kind: str,
        source: str,
        root: Path | None,
        path: Path,
        tags: tuple[str, ...],
        skipped: Sequence[str] = (),
        cases: Sequence[dict[str, Any]] | None = None,
        added_at: float | None = None,
    ) -> None:
        n_cases = None if cases is None else len(cases)
        n_training = None if cases is None else sum(c["split"] == "training" for c in cases)
        db.execute("DELETE FROM cases WHERE dataset = ?", (name,))
        db.execute(
            "INSERT OR REPLACE INTO datasets (name, kind, source, root, path, tags, added_at, skipped, n_cases, "
            "n_training) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                name,
                kind,
                source,
                str(root) if root is not None else None,
                str(path),
                json.dumps(list(tags)),
                time.time() if added_at is None else added_at,
                json.dumps(list(skipped)),
                n_cases,
                n_training,
            ),
        )
        for c in cases or ():
            db.execute(
                "INSERT INTO cases (dataset, case_id, split, modality, series_description, shape, spacing, "
                "orientation, has_label, checksum, images, label, label_checksum, files, study_uid, series_uid) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    name,
                    c["case_id"],
                    c["split"],
                    c["modality"],
                    c["series_description"],
                    json.dumps(c["shape"]),
                    json.dumps(c["spacing"]),
                    c["orientation"],
                    int(c["has_label"]),
                    c["checksum"],
                    json.dumps(c["images"]),
                    c["label"],
                    c["label_checksum"],
                    json.dumps(c["files"]),
                    c["study_uid"],
                    c["series_uid"],
                ),
            )

    def _connect(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise self._damaged(exc) from exc
        return db

    def _damaged(self, exc: Exception) -> ConfigurationError:
        return ConfigurationError(
            f"{self.path}: the dataset catalog is damaged ({exc}); move it aside and re-register the datasets "
            "with `laulima site dataset add`",
            file=str(self.path),
        )

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection | None]:
        """A connection, or None when there is no catalog (reading creates nothing)."""
        if not self.path.exists():
            if not self.legacy.exists():
                yield None
                return
            self._migrate()
        db = self._connect()
        try:
            yield db
        except sqlite3.DatabaseError as exc:
            raise self._damaged(exc) from exc
        finally:
            db.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction (BEGIN IMMEDIATE: writers queue); the generation counter is bumped in it."""
        private_dir(self.home)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, PRIVATE_FILE))
            if self.legacy.exists():
                self._migrate()
        with self._transaction() as db:
            yield db
            _bump_generation(db)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT on a fresh connection; anything raised rolls it back."""
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise self._damaged(exc) from exc
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    def _migrate(self) -> None:
        """catalog.json -> catalog.db: entries become datasets without case rows; the json is renamed."""
        try:
            data = json.loads(self.legacy.read_text(encoding="utf-8"))
            entries = data["datasets"]
            if not isinstance(entries, dict) or not all(
                isinstance(e, dict) and isinstance(e.get("path"), str) for e in entries.values()
            ):
                raise ValueError("'datasets' must map names to {path: ...}")
        except FileNotFoundError:
            return  # another process migrated it a moment ago
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigurationError(
                f"{self.legacy}: the dataset catalog is damaged ({exc}); fix or delete it and "
                "re-register the datasets with `laulima site dataset add`",
                file=str(self.legacy),
            ) from exc
        private_dir(self.home)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, PRIVATE_FILE))
        with self._transaction() as db:
            if self.legacy.exists():  # still there once we hold the write lock: ours to migrate
                for name, entry in sorted(entries.items()):
                    if not _NAME.fullmatch(name):
                        continue
                    path = Path(entry["path"])
                    exists = db.execute("SELECT 1 FROM datasets WHERE name = ?", (name,)).fetchone()
                    if exists is None:
                        added = entry.get("added_at")
                        self._put(
                            db,
                            name,
                            kind=_guess_kind(path),
                            source=str(path),
                            root=None,
                            path=path,
                            tags=(),
                            added_at=float(added) if isinstance(added, int | float) else time.time(),
                        )
                _bump_generation(db)
                os.replace(self.legacy, self.legacy.with_name(LEGACY_FILE + ".migrated"))

    # -- checks ------------------------------------------------------------------------------
    def _check_name(self, name: str) -> None:
        if not _NAME.fullmatch(name):
            raise ConfigurationError(
                f"dataset name {name!r} is not valid: use letters, digits, '.', '_' or '-' "
                "(at most 64 characters, starting with a letter or digit)",
                field="dataset",
            )

    def _check_tags(self, tags: Sequence[str]) -> tuple[str, ...]:
        if isinstance(tags, str):
            tags = (tags,)
        for tag in tags:
            if not _NAME.fullmatch(tag):
                raise ConfigurationError(
                    f"tag {tag!r} is not valid: use letters, digits, '.', '_' or '-' (at most 64 characters)",
                    field="tag",
                )
        return tuple(dict.fromkeys(tags))

    def _existing(self, name: str, source: str | Path) -> Path:
        target = Path(source).expanduser().resolve()
        if not target.exists():
            raise DataError(
                f"cannot register dataset {name!r} at site {self.site!r}: {target} does not exist; "
                "check the path (it must be readable by the agent's user)",
                site=self.site,
                dataset=name,
                file=str(target),
            )
        return target

    def _refuse_options(self, name: str, labels: object, skip_bad: bool, what: str) -> None:
        if labels is not None:
            raise ConfigurationError(
                f"dataset {name!r}: --labels applies to DICOM sources; {what} carries its own labels", field="labels"
            )
        if skip_bad:
            raise ConfigurationError(
                f"dataset {name!r}: --skip-bad applies to DICOM sources; {what} is registered whole or not at all, "
                "fix the problems it lists",
                field="skip_bad",
            )

    def _unknown(self, name: str) -> str:
        return (
            f"dataset {name!r} is not registered at site {self.site!r}; "
            f"register it with `laulima site dataset add {name} PATH`"
        )


def _view_entry(row: dict[str, Any]) -> dict[str, Any]:
    """A case of a DICOM dataset's laulima-v1 dataset.json: its series reference and label."""
    return {"id": row["case_id"], "image": [f"series/{row['case_id']}.series.json"], "label": row["label"]}


def _bump_generation(db: sqlite3.Connection) -> None:
    """Count a write: ``signature`` changes with it, so the agent re-reports cohort sizes."""
    db.execute(
        "INSERT INTO meta (key, value) VALUES ('generation', '1') "
        "ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1"
    )
