"""`laulima site predict` and `laulima predict --seg`: label maps and DICOM SEGs on the right series.

The model is exported from an untrained (randomly initialised) network: what it predicts
does not matter here, where it is put does. Each SEG must reference its own case's series
and frame of reference, have one frame per slice and segment, at the slices' positions,
and hold exactly the NIfTI label map written beside it.
"""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from laulima.algorithms.segmentation import UNetSegmentation
from laulima.cli import app
from laulima.errors import ConfigurationError, DataError, TransportError
from laulima.export import export_model
from laulima.imaging import read_image, write_label_nifti, write_nifti
from laulima.imaging.dicom_seg import SEGMENTATION_STORAGE, read_segmentation, read_source_series
from laulima.imaging.dicom_write import write_dicom_series
from laulima.imaging.nifti import read_label_array
from laulima.site.catalog import Catalog
from laulima.site.pacs import stow
from laulima.site.predict import default_seg_path, predict_dataset
from tests.helpers.orthanc import OrthancServer

# write_dicom_series names the patient "PHANTOM"; highdicom, copying it into the SEG, warns it has no "^"
pytestmark = pytest.mark.filterwarnings("ignore:The string .* unlikely to represent the intended person name")

PARAMS = {"task": "brain-tissue", "channels": [4, 8], "roi_size": [16, 16, 16]}
N_SEGMENTS = 3  # CSF, grey matter, white matter


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    weights = UNetSegmentation().initial_weights(PARAMS, 0)
    return export_model(weights, PARAMS, tmp_path_factory.mktemp("models") / "model", card={})


def _volume(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """A bright off-centre ball on noise: something for the network to respond to."""
    grid = np.indices(shape).astype(np.float32)
    centre = np.asarray(shape, dtype=np.float32)[:, None, None, None] * np.array([0.4, 0.55, 0.5])[:, None, None, None]
    ball = np.exp(-(((grid - centre) ** 2).sum(axis=0)) / (2 * (min(shape) / 4) ** 2))
    noise = np.random.default_rng(seed).random(shape, dtype=np.float32)
    return np.round(800 * ball + 50 * noise)


def _affine(spacing: tuple[float, float, float], angle_deg: float, origin: tuple[float, float, float]) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    rotation = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


@pytest.fixture
def site(tmp_path: Path) -> dict[str, Any]:
    """A site home with dataset "mri", a DICOM tree of three series (one oblique; one deleted after
    registration, as files vanish from a hospital's disk), and dataset "nifti", a one-case Decathlon folder.

    ``ids`` maps the series folders' names to the case ids the catalog gave them."""
    pacs, home = tmp_path / "pacs", tmp_path / "home"
    write_dicom_series(_volume((14, 12, 9), 1), _affine((4.0, 4.5, 5.0), 0, (-30, -20, -25)), pacs / "a")
    write_dicom_series(_volume((12, 13, 8), 2), _affine((4.0, 4.0, 6.0), 30, (10, -40, 5)), pacs / "b")
    write_dicom_series(_volume((10, 10, 6), 3), _affine((5.0, 5.0, 5.0), 0, (0, 0, 0)), pacs / "gone")
    catalog = Catalog(home)
    catalog.add("mri", pacs)
    series = {read_source_series(pacs / n)[0].SeriesInstanceUID: n for n in ("a", "b", "gone")}
    ids = {series[r.series_uid]: r.case_id for r in catalog.cases("mri")}
    for file in (pacs / "gone").iterdir():
        file.unlink()

    nifti = tmp_path / "decathlon"
    affine = _affine((4.0, 4.0, 4.0), 0, (5, 5, 5))
    (nifti / "imagesTr").mkdir(parents=True)
    (nifti / "labelsTr").mkdir()
    write_nifti(nifti / "imagesTr" / "brain_1.nii.gz", _volume((11, 12, 10), 4), affine)
    write_label_nifti(nifti / "labelsTr" / "brain_1.nii.gz", np.zeros((11, 12, 10), np.uint8), affine)
    listing = {
        "name": "nifti",
        "modality": {"0": "T1w"},
        "labels": {"0": "background", "1": "CSF", "2": "grey matter", "3": "white matter"},
        "numTraining": 1,
        "training": [{"image": "./imagesTr/brain_1.nii.gz", "label": "./labelsTr/brain_1.nii.gz"}],
    }
    (nifti / "dataset.json").write_text(json.dumps(listing))
    catalog.add("nifti", nifti)
    return {"home": home, "pacs": pacs, "ids": ids}


def _check_seg(seg_path: Path, series: Path, label_map: Path) -> None:
    """The SEG references ``series``, frames sit on its slices, and its content is the NIfTI label map's."""
    sources = read_source_series(series)
    by_uid = {ds.SOPInstanceUID: ds for ds in sources}
    seg = pydicom.dcmread(seg_path)
    assert seg.SOPClassUID == SEGMENTATION_STORAGE
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [sources[0].SeriesInstanceUID]
    assert int(seg.NumberOfFrames) == len(sources) * N_SEGMENTS
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["CSF", "grey matter", "white matter"]
    for item in seg.PerFrameFunctionalGroupsSequence:
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        frame_position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(frame_position, [float(v) for v in by_uid[uid].ImagePositionPatient], atol=1e-4)
    labels, affine = read_label_array(label_map)
    np.testing.assert_allclose(affine, read_image(series)[1], atol=1e-4)
    assert np.array_equal(read_segmentation(seg_path, sources), labels)


def test_site_predict_writes_label_maps_and_segs_and_survives_a_bad_case(
    model: Path, site: dict[str, Any], tmp_path: Path
):
    out, ids = tmp_path / "out", site["ids"]
    seen: list[str] = []
    result = predict_dataset(model, site["home"], "mri", out, on_case=lambda c: seen.append(c.case_id))
    assert sorted(seen) == sorted(ids.values())
    assert [c.case_id for c in result.failed] == [ids["gone"]] and "are gone" in (result.failed[0].error or "")
    for name in ("a", "b"):
        _check_seg(out / f"{ids[name]}.seg.dcm", site["pacs"] / name, out / f"{ids[name]}.nii.gz")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{ids[n]}{suffix}" for n in ("a", "b") for suffix in (".nii.gz", ".seg.dcm")
    )
    ok = next(c for c in result.cases if c.case_id == ids["b"])
    assert ok.shape == (12, 13, 8) and f"{ids['b']}.seg.dcm" in ok.summary()
    assert set(ok.voxels) == {"CSF", "grey matter", "white matter"} and sum(ok.voxels.values()) <= 12 * 13 * 8


def test_a_nifti_case_gets_a_label_map_and_no_seg(model: Path, site: dict[str, Any], tmp_path: Path):
    result = predict_dataset(model, site["home"], "nifti", tmp_path / "out")
    assert [(c.case_id, c.ok, c.seg) for c in result.cases] == [("brain_1", True, None)]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["brain_1.nii.gz"]


def test_site_predict_command_names_the_failed_case(model: Path, site: dict[str, Any], tmp_path: Path):
    args = ["site", "predict", "--model", str(model), "--dataset", "mri", "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(app, [*args, "--home", str(site["home"])])
    assert isinstance(result.exception, DataError), result.output
    gone = site["ids"]["gone"]
    assert f"1 case(s) failed: {gone}" in str(result.exception)
    assert "2 of 3 case(s) of mri segmented" in result.output and f"{gone}: FAILED" in result.output
    assert (tmp_path / "o" / f"{site['ids']['a']}.seg.dcm").is_file()


def test_predict_command_writes_a_seg_for_a_dicom_series(model: Path, site: dict[str, Any], tmp_path: Path):
    series = site["pacs"] / "b"
    base = ["predict", "--model", str(model), "--input", str(series)]
    result = CliRunner().invoke(app, [*base, "--output", str(tmp_path / "labels.nii.gz")])
    assert result.exit_code == 0, result.output
    assert default_seg_path(tmp_path / "labels.nii.gz") == tmp_path / "labels.seg.dcm"
    _check_seg(tmp_path / "labels.seg.dcm", series, tmp_path / "labels.nii.gz")

    chosen = tmp_path / "pacs-out" / "result.dcm"
    result = CliRunner().invoke(app, [*base, "--output", str(tmp_path / "2.nii.gz"), "--seg", str(chosen)])
    assert result.exit_code == 0, result.output
    _check_seg(chosen, series, tmp_path / "2.nii.gz")
    assert not (tmp_path / "2.seg.dcm").exists()


def test_predict_command_refuses_seg_for_a_nifti_input(model: Path, site: dict[str, Any], tmp_path: Path):
    image = Catalog(site["home"]).cases("nifti")[0].images[0]
    args = ["predict", "--model", str(model), "--input", str(image)]
    result = CliRunner().invoke(app, [*args, "--output", str(tmp_path / "l.nii.gz")])
    assert result.exit_code == 0 and not list(tmp_path.glob("*.dcm"))
    result = CliRunner().invoke(app, [*args, "--output", str(tmp_path / "l.nii.gz"), "--seg", str(tmp_path / "s.dcm")])
    assert isinstance(result.exception, ConfigurationError) and "not a DICOM series" in str(result.exception)


def _get_json(url: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Accept": "application/dicom+json"})) as reply:
        return list(json.loads(reply.read() or b"[]"))


def test_site_predict_sends_the_segs_to_the_pacs(
    model: Path, site: dict[str, Any], tmp_path: Path, orthanc: OrthancServer
):
    source = read_source_series(site["pacs"] / "a")[0]
    stow(orthanc.dicomweb_url, sorted((site["pacs"] / "a").iterdir()))  # the study as the PACS holds it
    result = predict_dataset(model, site["home"], "mri", tmp_path / "out", stow_url=orthanc.dicomweb_url)
    ids = site["ids"]
    assert sorted(p.name for p in result.stowed) == sorted([f"{ids['a']}.seg.dcm", f"{ids['b']}.seg.dcm"])
    assert result.stow_error is None

    study = f"{orthanc.dicomweb_url}/studies/{source.StudyInstanceUID}"
    series = {s["0020000E"]["Value"][0]: s["00080060"]["Value"][0] for s in _get_json(f"{study}/series")}
    assert series.pop(source.SeriesInstanceUID) == "MR" and list(series.values()) == ["SEG"]
    (seg_series,) = series
    (metadata,) = _get_json(f"{study}/series/{seg_series}/metadata")
    referenced = metadata["00081115"]["Value"][0]["0020000E"]["Value"][0]  # ReferencedSeriesSequence
    assert referenced == source.SeriesInstanceUID
    assert metadata["00200052"]["Value"][0] == source.FrameOfReferenceUID


def test_a_pacs_that_is_down_leaves_the_segs_on_disk(model: Path, site: dict[str, Any], tmp_path: Path):
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = ["site", "predict", "--model", str(model), "--dataset", "mri", "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(
        app, [*args, "--home", str(site["home"]), "--stow", f"http://127.0.0.1:{port}/dicom-web"]
    )
    assert isinstance(result.exception, TransportError), result.output
    assert "were not sent" in str(result.exception) and "1 case(s) failed" in str(result.exception)
    assert len(list((tmp_path / "o").glob("*.seg.dcm"))) == 2
