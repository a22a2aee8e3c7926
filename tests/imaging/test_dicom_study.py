"""DICOM trees registered case by case: discovery, grouping, refusal of bad cases, labels, and training reads.

Studies are written with ``write_dicom_series`` (the geometry is known) and highdicom's SEG
writer, then broken one way per test; pydicom's own test files stand in for real exports.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from laulima.cli import app
from laulima.errors import DataError
from laulima.imaging import SCANNER_PROFILES, load_dataset, make_phantom, read_case, read_image, write_label_nifti
from laulima.imaging.dicom import read_dicom
from laulima.imaging.dicom_study import case_id_for, inspect_dicom_tree
from laulima.imaging.dicom_write import write_dicom_series
from laulima.imaging.series_ref import read_series_ref
from laulima.site.catalog import Catalog
from tests.helpers.dicom_study import edit, write_seg, write_study
from tests.imaging.test_dicom import oblique_affine

SHAPE = (24, 24, 16)


def pydicom_file(name: str) -> Path:
    """A file pydicom ships with its tests (no download: only the bundled ones are used)."""
    path = get_testdata_file(name)
    assert isinstance(path, str), name
    return Path(path)


NAMES = {1: "CSF", 2: "grey matter", 3: "white matter"}


@pytest.fixture(scope="session")
def phantom() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """T1 values (integers, as a scanner stores them), tissue labels and affine of one small phantom."""
    p = make_phantom(
        "brain-tissue", SCANNER_PROFILES[0], seed=3, site_index=0, split=0, index=0, spacing_mm=8.0, shape=SHAPE
    )
    return np.round(p.image[0] * 1000.0), p.label, p.affine


def small_series(folder: Path, *, n: int = 6, study_uid: str | None = None, z0: float = 0.0) -> tuple[str, list[Path]]:
    """A 8x8xn MR series with 2 mm voxels (fast to write and to break)."""
    uid = generate_uid()
    volume = np.arange(8 * 8 * n, dtype=np.float32).reshape(8, 8, n)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[2, 3] = z0
    files = write_dicom_series(volume, affine, folder, series_uid=uid, study_uid=study_uid, series_description="ok")
    return uid, files


def test_write_dicom_series_reads_back_the_same_volume_and_affine(tmp_path: Path):
    rng = np.random.default_rng(0)
    integers = rng.integers(-1000, 3000, size=(12, 10, 7)).astype(np.float32)
    write_dicom_series(integers, oblique_affine(), tmp_path / "int")
    volume, affine = read_dicom(tmp_path / "int")
    np.testing.assert_array_equal(volume[0], integers)  # integers in int16 range: exact
    np.testing.assert_allclose(affine, oblique_affine(), atol=1e-9)

    fractions = rng.random((12, 10, 7)).astype(np.float32) * 7.3
    write_dicom_series(fractions, oblique_affine(), tmp_path / "float", modality="CT")
    volume, _ = read_dicom(tmp_path / "float")
    np.testing.assert_allclose(volume[0], fractions, atol=7.3 / 65534)  # half a step, and float32 rounding

    left_handed = np.diag([-2.0, 2.0, 3.0, 1.0])
    write_dicom_series(integers, left_handed, tmp_path / "left")
    volume, affine = read_dicom(tmp_path / "left")
    np.testing.assert_array_equal(volume[0], integers[:, :, ::-1])  # same voxels, slice axis along row x column
    np.testing.assert_allclose(affine @ [0, 0, 6, 1], left_handed @ [0, 0, 0, 1])


def test_write_dicom_series_refuses_what_dicom_cannot_say(tmp_path: Path):
    sheared = np.eye(4)
    sheared[0, 1] = 0.5
    with pytest.raises(DataError, match="not orthogonal"):
        write_dicom_series(np.zeros((4, 4, 3)), sheared, tmp_path / "s")
    with pytest.raises(DataError, match=r"\[X,Y,Z\]"):
        write_dicom_series(np.zeros((4, 4)), np.eye(4), tmp_path / "s")
    with pytest.raises(DataError, match="NaN"):
        write_dicom_series(np.full((4, 4, 3), np.nan), np.eye(4), tmp_path / "s")
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())


def test_a_phantom_study_registers_and_trains_loads(tmp_path: Path, phantom):
    t1, label, affine = phantom
    study = write_study(tmp_path / "pacs" / "patient1", t1, affine, label=label, names=NAMES)
    inspection = inspect_dicom_tree(tmp_path / "pacs")
    assert [c.series_uid for c in inspection.cases] == [study.t1_uid]
    assert inspection.bad == ()
    assert inspection.ignored_files == 1  # README.txt
    assert any("localizer" in note for note in inspection.not_cases)
    assert inspection.label_names == {0: "background", **NAMES}

    catalog = Catalog(tmp_path / "home")
    folder = catalog.add("brains", tmp_path / "pacs", tags=["t1", "research"])
    assert folder == tmp_path / "home" / "datasets" / "brains" == catalog.get("brains")
    description = json.loads((folder / "dataset.json").read_text())
    case_id = case_id_for(study.t1_uid)
    assert description["layout"] == "laulima-v1" and description["channels"] == ["MR"]
    assert description["training"][0]["image"] == [f"series/{case_id}.series.json"]
    ref = json.loads((folder / "series" / f"{case_id}.series.json").read_text())
    assert ref["format"] == "laulima-dicom-series/1" and ref["files"] == [str(f) for f in study.t1_files]
    assert sorted(p.name for p in (folder / "labels").iterdir()) == [f"{case_id}.nii.gz"]  # the SEG, converted

    dataset = load_dataset(catalog.get("brains"))
    assert dataset.layout == "laulima-v1" and dataset.labels == {0: "background", **NAMES}
    image, case_label, case_affine = read_case(dataset.training[0], len(dataset.channels))
    expected, expected_affine = read_dicom(tmp_path / "pacs" / "patient1" / "T1")
    np.testing.assert_array_equal(image, expected)
    np.testing.assert_array_equal(image[0], t1)
    np.testing.assert_allclose(case_affine, expected_affine)
    np.testing.assert_allclose(case_affine, affine, atol=1e-6)
    assert case_label is not None
    np.testing.assert_array_equal(case_label, label)

    [record] = catalog.cases("brains")
    assert (record.case_id, record.modality, record.series_description) == (case_id, "MR", "T1w MPRAGE")
    assert record.shape == SHAPE and record.spacing == (8.0, 8.0, 8.0) and record.orientation == "RAS"
    assert record.has_label and record.label == folder / "labels" / f"{case_id}.nii.gz"
    assert (record.study_uid, record.series_uid) == (study.study_uid, study.t1_uid)
    assert len(record.checksum) == 64
    info = catalog.info("brains")
    assert (info.kind, info.n_cases, info.tags, info.skipped) == ("dicom", 1, ("t1", "research"), ())
    assert catalog.with_tag("t1") == ["brains"] and catalog.with_tag("ct") == []
    assert catalog.readable("brains") == [folder, (tmp_path / "pacs").resolve()]
    assert catalog.verify("brains") == []


def test_nifti_labels_are_matched_by_series_or_study_uid(tmp_path: Path, phantom):
    t1, label, affine = phantom
    first = write_study(tmp_path / "pacs" / "a", t1, affine)
    second = write_study(tmp_path / "pacs" / "b", t1, affine)
    labels = tmp_path / "labels"
    labels.mkdir()
    write_label_nifti(labels / f"{first.t1_uid}.nii.gz", label, affine)  # by series
    write_label_nifti(labels / f"{second.study_uid}.nii.gz", (label > 1).astype(np.uint8), affine)  # by study
    (labels / "labels.json").write_text(json.dumps({"0": "background", "1": "CSF", "2": "GM", "3": "WM"}))
    catalog = Catalog(tmp_path / "home")
    folder = catalog.add("brains", tmp_path / "pacs", labels=labels)
    dataset = load_dataset(folder)
    assert dataset.labels == {0: "background", 1: "CSF", 2: "GM", 3: "WM"}
    by_id = {c.id: c for c in dataset.training}
    _, first_label, _ = read_case(by_id[case_id_for(first.t1_uid)], 1)
    _, second_label, _ = read_case(by_id[case_id_for(second.t1_uid)], 1)
    np.testing.assert_array_equal(first_label, label)
    np.testing.assert_array_equal(second_label, label > 1)
    assert (labels / f"{first.t1_uid}.nii.gz") in catalog.readable("brains")  # the labels stay where they are


def _break_missing_tag(root: Path, files: list[Path], uid: str) -> str:
    edit(files[2], ImagePositionPatient=None)
    return f"{files[2].name}: missing tag\\(s\\) ImagePositionPatient in series {uid}"


def _break_orientation(root: Path, files: list[Path], uid: str) -> str:
    for f in files[:2]:
        edit(f, ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    return "orientation .* differs from the 4 other slices"


def _break_spacing(root: Path, files: list[Path], uid: str) -> str:
    edit(files[3], PixelSpacing=[2.5, 2.5])
    return f"{files[3].name}: pixel spacing \\[2.5, 2.5\\] differs"


def _break_gap(root: Path, files: list[Path], uid: str) -> str:
    files[3].unlink()
    return f"{files[4].name}: gap of 4.000 mm before this slice .* about 1 slice\\(s\\) missing after .*{files[2].name}"


def _break_duplicate(root: Path, files: list[Path], uid: str) -> str:
    copy = files[2].with_name("copy.dcm")
    shutil.copy(files[2], copy)
    edit(copy, SOPInstanceUID=generate_uid())
    return "duplicate slice position \\[.*\\], the same as"


def _break_uneven(root: Path, files: list[Path], uid: str) -> str:
    for k, f in enumerate(files):
        edit(f, ImagePositionPatient=[0.0, 0.0, 2.0 * k + (0.5 if k == 3 else 0.0)])
    return "slice spacing varies"


def _break_foreign_object(root: Path, files: list[Path], uid: str) -> str:
    plan = pydicom.dcmread(pydicom_file("rtplan.dcm"))
    plan.StudyInstanceUID = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    plan.SeriesInstanceUID = uid
    plan.save_as(files[0].parent / "plan.dcm", enforce_file_format=True)
    return f"plan.dcm: a RT Plan Storage object mixed into MR Image Storage series {uid}"


def _break_seg_geometry(root: Path, files: list[Path], uid: str) -> str:
    ds0 = pydicom.dcmread(files[0], stop_before_pixels=True)
    other = write_dicom_series(
        np.ones((8, 8, 6)), np.diag([2.0, 2.0, 3.0, 1.0]), root / "tmp", study_uid=ds0.StudyInstanceUID,
        frame_of_reference_uid=ds0.FrameOfReferenceUID,
    )  # fmt: skip
    seg = write_seg(np.ones((8, 8, 6), dtype=np.uint8), other, root / "seg.dcm", {1: "lesion"})
    shutil.rmtree(root / "tmp")
    ds = pydicom.dcmread(seg)
    ds.ReferencedSeriesSequence[0].SeriesInstanceUID = uid
    ds.save_as(seg)
    return f"seg.dcm: label geometry does not match its image, series {uid}: frame \\d+ .* does not lie on a slice"


def _break_nifti_geometry(root: Path, files: list[Path], uid: str) -> str:
    (root.parent / "labels").mkdir()
    write_label_nifti(root.parent / "labels" / f"{uid}.nii.gz", np.zeros((8, 8, 5), np.uint8), np.eye(4))
    return f"labels/{uid}.nii.gz: label geometry does not match its image, series {uid}: shape \\(8, 8, 5\\)"


BREAKS: dict[str, Callable[[Path, list[Path], str], str]] = {
    "missing-tag": _break_missing_tag,
    "two-orientations": _break_orientation,
    "varying-spacing": _break_spacing,
    "gap": _break_gap,
    "duplicate-position": _break_duplicate,
    "uneven-spacing": _break_uneven,
    "non-image-object": _break_foreign_object,
    "seg-geometry": _break_seg_geometry,
    "nifti-geometry": _break_nifti_geometry,
}


@pytest.mark.parametrize("kind", sorted(BREAKS))
def test_a_bad_case_refuses_the_source_and_skip_bad_keeps_the_good(tmp_path: Path, kind: str):
    root = tmp_path / "tree"
    good_uid, _ = small_series(root / "good")
    bad_uid, files = small_series(root / "bad")
    pattern = BREAKS[kind](root, files, bad_uid)
    labels = tmp_path / "labels" if (tmp_path / "labels").exists() else None
    catalog = Catalog(tmp_path / "home")
    with pytest.raises(DataError, match="1 bad case") as info:
        catalog.add("ds", root, labels=labels)
    assert len(info.value.context["problems"]) == 1
    [line] = info.value.context["problems"]
    assert re.search(pattern, line), line
    assert catalog.list() == {} and not (tmp_path / "home" / "datasets" / "ds").exists()

    folder = catalog.add("ds", root, labels=labels, skip_bad=True)
    assert [c.series_uid for c in catalog.cases("ds")] == [good_uid]
    assert catalog.info("ds").skipped == (line,)
    [case] = load_dataset(folder).test  # unlabelled: a case to run a model on, not to train on
    np.testing.assert_array_equal(read_case(case, 1)[0], read_dicom(root / "good")[0])


def test_pydicoms_test_tree(tmp_path: Path):
    """pydicom's ``dicomdirtests`` tree, as exported by real scanners (tiny 16x16 images).

    77654033/CT2 (4 CT slices, one 202 mm before the others: a gap) is bad;
    98892001/CT5N (5 evenly spaced CT slices) is the one case; 98892001/CT2N (a 2-slice
    LOCALIZER), 98892003/MR1 (single-slice FAST LOCALIZER series), MR2 (tri-planar pilots
    without the LOCALIZER flag), MR700 (7 radial projections) and 77654033/CR1-3
    (radiographs) are not cases; TINY_ALPHA's CT file lacks all geometry (bad); the DICOMDIR
    files are ignored.
    """
    root = Path(shutil.copytree(pydicom_file("DICOMDIR").parent, tmp_path / "tree"))
    inspection = inspect_dicom_tree(root)
    assert [c.files[0].parent.name for c in inspection.cases] == ["CT5N"]
    assert [line.split(":")[0] for line in inspection.lines] == [
        "TINY_ALPHA/PT000000/ST000000/SE000000/IM000000",
        "77654033/CT2/17136",
    ]
    assert "missing tag(s) ImagePositionPatient" in inspection.lines[0] and "gap of 202.500 mm" in inspection.lines[1]
    assert len(inspection.not_cases) == 11 and inspection.ignored_files >= 7
    catalog = Catalog(tmp_path / "home")
    with pytest.raises(DataError, match="2 bad case"):
        catalog.add("tree", root)
    folder = catalog.add("tree", root, skip_bad=True)
    [record] = catalog.cases("tree")
    assert (record.modality, record.shape, record.orientation) == ("CT", (16, 16, 5), "LPS")
    assert record.spacing == pytest.approx((0.488281, 0.488281, 2.5))
    [case] = load_dataset(folder).test  # unlabelled: a case to run a model on, not to train on
    np.testing.assert_array_equal(read_case(case, 1)[0], read_dicom(root / "98892001" / "CT5N")[0])

    lonely = tmp_path / "single"
    lonely.mkdir()
    shutil.copy(pydicom_file("MR_small.dcm"), lonely / "MR_small.dcm")  # one slice: no volume
    with pytest.raises(DataError, match="no volumetric DICOM image series found .*fewer than 3"):
        catalog.add("single", lonely)


def test_verify_finds_changed_and_gone_files_and_the_cli_exits_3(tmp_path: Path):
    _, files = small_series(tmp_path / "tree")
    home = tmp_path / "home"
    runner = CliRunner()
    result = runner.invoke(app, ["site", "dataset", "add", "ds", str(tmp_path / "tree"), "--home", str(home)])
    assert result.exit_code == 0, result.output
    assert "1 case(s)" in result.output
    assert runner.invoke(app, ["site", "dataset", "verify", "ds", "--home", str(home)]).exit_code == 0
    listing = runner.invoke(app, ["site", "dataset", "list", "--home", str(home)], terminal_width=200)
    assert "ds" in listing.output and "dicom" in listing.output
    shown = runner.invoke(app, ["site", "dataset", "show", "ds", "--home", str(home)], terminal_width=200)
    assert "8x8x6" in shown.output and "RAS" in shown.output

    edit(files[1], RescaleIntercept="5")
    files[4].unlink()
    result = runner.invoke(app, ["site", "dataset", "verify", "ds", "--home", str(home)], terminal_width=400)
    assert result.exit_code == 3
    assert f"{files[1]}: changed since registration" in result.output
    assert f"{files[4]}: gone since registration" in result.output
    ref = next((home / "datasets" / "ds" / "series").iterdir())
    with pytest.raises(DataError, match="1 of the series' 6 DICOM files are gone"):
        read_series_ref(ref)
    with pytest.raises(DataError, match="DICOM files are gone"):
        load_dataset(home / "datasets" / "ds")

    assert runner.invoke(app, ["site", "dataset", "remove", "ds", "--home", str(home)]).exit_code == 0
    assert not (home / "datasets" / "ds").exists() and files[0].exists()  # the source stays


def test_a_series_reference_reads_like_the_series(tmp_path: Path):
    uid, _ = small_series(tmp_path / "tree")
    folder = Catalog(tmp_path / "home").add("ds", tmp_path / "tree")
    ref = folder / "series" / f"{case_id_for(uid)}.series.json"
    image, affine = read_image(ref)
    expected, expected_affine = read_dicom(tmp_path / "tree")
    np.testing.assert_array_equal(image, expected)
    np.testing.assert_allclose(affine, expected_affine)


def test_a_laulima_view_may_name_absolute_files_but_no_relative_escape(tmp_path: Path):
    uid, _ = small_series(tmp_path / "tree")
    folder = Catalog(tmp_path / "home").add("ds", tmp_path / "tree")
    ref = folder / "series" / f"{case_id_for(uid)}.series.json"
    view = tmp_path / "view"
    view.mkdir()
    entry = {"id": "c1", "image": [str(ref)], "label": None}
    description = {"layout": "laulima-v1", "name": "v", "channels": ["MR"], "labels": {"0": "background"}}
    (view / "dataset.json").write_text(json.dumps({**description, "numTraining": 1, "training": [entry]}))
    [case] = load_dataset(view).training
    assert case.images == (ref,) and case.label is None
    escape = {**entry, "image": ["../home/datasets/ds/series/x.series.json"]}
    (view / "dataset.json").write_text(json.dumps({**description, "numTraining": 1, "training": [escape]}))
    with pytest.raises(DataError, match="points outside the dataset folder"):
        load_dataset(view)
    (view / "dataset.json").write_text(json.dumps({**description, "layout": "laulima-v9", "training": []}))
    with pytest.raises(DataError, match="layout 'laulima-v9' is not known"):
        load_dataset(view)
