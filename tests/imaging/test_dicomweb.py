"""A PACS as a dataset source: DICOMweb against a real Orthanc, from STOW-RS upload to the cache.

Each test uploads its own study (a distinct PatientID) to the session's Orthanc, so they
share one server without seeing each other's data.
"""

from __future__ import annotations

import socket
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest

from laulima.errors import ConfigurationError, DataError, TransportError
from laulima.imaging.dicom import read_dicom
from laulima.imaging.dicom_write import write_dicom_series
from laulima.pki.ca import CertificateAuthority
from laulima.site.pacs import parse_dicomweb_source, retrieve, stow
from tests.helpers.orthanc import OrthancServer, orthanc_server, tls_proxy

SLICES = 8


def _affine() -> np.ndarray:
    """An oblique, anisotropic grid, so an axis or sign mix-up anywhere shows in the affine."""
    angle = np.deg2rad(15)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([1.5, 1.25, 3.0])
    affine[:3, 3] = [-12.0, 20.0, 31.5]
    return affine


def _study(folder: Path, patient: str, *, ct: bool = False) -> tuple[str, list[Path], list[Path]]:
    """An MR series (8 slices, 16x16) and optionally a CT series in the same study; (study UID, MR, CT files)."""
    volume = np.random.default_rng(zlib.crc32(patient.encode())).integers(0, 1200, (16, 16, SLICES)).astype(np.float32)
    mr = write_dicom_series(volume, _affine(), folder / "mr", series_description="T1 axial", patient_id=patient)
    study = str(pydicom.dcmread(mr[0], stop_before_pixels=True).StudyInstanceUID)
    other: list[Path] = []
    if ct:
        other = write_dicom_series(
            volume - 1000, _affine(), folder / "ct", modality="CT", study_uid=study, patient_id=patient, series_number=2
        )
    return study, mr, other


def _partials(cache: Path) -> list[Path]:
    return sorted(cache.glob(".partial-*"))


def test_query_retrieve_matches_the_folder_and_reuses_the_cache(orthanc: OrthancServer, tmp_path: Path):
    study, mr, ct = _study(tmp_path / "upload", "P-ROUNDTRIP", ct=True)
    assert stow(orthanc.dicomweb_url, [*mr, *ct]) == len(mr) + len(ct)

    source = parse_dicomweb_source(f"{orthanc.source_url}?Modality=MR&PatientID=P-ROUNDTRIP&SeriesDescription=T1*")
    cache = tmp_path / "home" / "pacs-cache"
    got = retrieve(source, cache)
    assert (got.studies, got.series, got.instances, got.fetched, got.cached) == (1, 1, SLICES, 1, 0)
    mr_series = str(pydicom.dcmread(mr[0], stop_before_pixels=True).SeriesInstanceUID)
    assert [p.name for p in got.root.iterdir()] == [study]  # the CT series of the same study is filtered out
    assert [p.name for p in (got.root / study).iterdir()] == [mr_series]
    assert len(list((cache / study / mr_series).glob("*.dcm"))) == SLICES

    # The same study loaded from the folder and through Orthanc's DICOMweb gives identical arrays and affines.
    image, affine = read_dicom(tmp_path / "upload" / "mr")
    fetched_image, fetched_affine = read_dicom(got.root / study / mr_series)
    np.testing.assert_array_equal(fetched_image, image)
    np.testing.assert_array_equal(fetched_affine, affine)

    again = retrieve(source, cache)
    assert (again.fetched, again.cached, again.instances, again.root) == (0, 1, SLICES, got.root)
    assert _partials(cache) == []


def test_a_wider_query_gets_its_own_exact_view(orthanc: OrthancServer, tmp_path: Path):
    _study_uid, mr, ct = _study(tmp_path / "upload", "P-VIEWS", ct=True)
    stow(orthanc.dicomweb_url, [*mr, *ct])
    cache = tmp_path / "cache"
    only_mr = retrieve(parse_dicomweb_source(f"{orthanc.source_url}?PatientID=P-VIEWS&Modality=MR"), cache)
    both = retrieve(parse_dicomweb_source(f"{orthanc.source_url}?PatientID=P-VIEWS"), cache)
    assert (both.series, both.fetched, both.cached) == (2, 1, 1)  # the MR series comes from the cache
    assert only_mr.root != both.root
    assert len(list(only_mr.root.glob("*/*/*.dcm"))) == SLICES  # still exactly the MR query's series
    assert len(list(both.root.glob("*/*/*.dcm"))) == 2 * SLICES


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("dicomweb+http://127.0.0.1:8042/dicom-web?Modality=MR&PatientName=DOE*", "PatientName"),
        ("dicomweb+http://127.0.0.1:8042/dicom-web?modality=MR", "modality"),
        ("dicomweb+http://pacs.hospital.example/dicom-web?Modality=MR", "pacs.hospital.example"),
        ("dicomweb+ftp://127.0.0.1/dicom-web", "scheme"),
        ("http://127.0.0.1:8042/dicom-web", "scheme"),
        ("dicomweb+https:///dicom-web", "no host"),
        ("dicomweb+https://u:secret@pacs.example/dicom-web", "credentials"),
        ("dicomweb+https://pacs.example:99999/dicom-web", "port"),
        ("dicomweb+https://pacs.example/dicom-web?StudyDate=2024", "StudyDate"),
        ("dicomweb+https://pacs.example/dicom-web?StudyInstanceUID=1.2.*", "StudyInstanceUID"),
        ("dicomweb+https://pacs.example/dicom-web?Modality=mr", "Modality"),
        ("dicomweb+https://pacs.example/dicom-web?Modality=MR&Modality=CT", "twice"),
        ("dicomweb+https://pacs.example/dicom-web?StudyDescription=" + "x" * 65, "StudyDescription"),
    ],
)
def test_bad_sources_are_refused_naming_the_part(url: str, named: str):
    with pytest.raises(ConfigurationError, match=named):
        parse_dicomweb_source(url)


def test_plaintext_off_the_machine_needs_an_explicit_allowance():
    url = "dicomweb+http://pacs.hospital.example:8042/dicom-web?Modality=MR"
    with pytest.raises(ConfigurationError, match="unencrypted.*dicomweb\\+https"):
        parse_dicomweb_source(url)
    source = parse_dicomweb_source(url, allow_plaintext=True)
    assert source.base_url == "http://pacs.hospital.example:8042/dicom-web"


def test_good_sources_parse():
    source = parse_dicomweb_source(
        "dicomweb+https://pacs.example/dicom-web/?Modality=M*&StudyDescription=BRAIN%20MR*&StudyDate=20240101-"
        "&StudyInstanceUID=1.2.3,1.2.4"
    )
    assert source.base_url == "https://pacs.example:443/dicom-web"
    assert dict(source.filters) == {
        "Modality": "M*", "StudyDescription": "BRAIN MR*", "StudyDate": "20240101-", "StudyInstanceUID": "1.2.3,1.2.4",
    }  # fmt: skip
    assert parse_dicomweb_source("dicomweb+http://[::1]:8042/dicom-web").base_url == "http://[::1]:8042/dicom-web"


def test_a_missing_ca_file_is_named(tmp_path: Path):
    source = parse_dicomweb_source("dicomweb+https://127.0.0.1:1/dicom-web")
    with pytest.raises(ConfigurationError, match="no-such-ca.pem"):
        retrieve(source, tmp_path / "cache", ca_file=tmp_path / "no-such-ca.pem")


def test_a_server_that_is_not_there_is_a_transport_error_naming_it(tmp_path: Path):
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    source = parse_dicomweb_source(f"dicomweb+http://127.0.0.1:{port}/dicom-web?Modality=MR")
    with pytest.raises(TransportError, match=f"127.0.0.1:{port}.*cannot reach"):
        retrieve(source, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_a_wrong_path_says_so(orthanc: OrthancServer, tmp_path: Path):
    source = parse_dicomweb_source(f"dicomweb+{orthanc.url}/not-dicomweb")
    with pytest.raises(ConfigurationError, match="DICOMweb root"):
        retrieve(source, tmp_path / "cache")


def test_no_match_is_an_error_not_an_empty_dataset(orthanc: OrthancServer, tmp_path: Path):
    source = parse_dicomweb_source(f"{orthanc.source_url}?PatientID=NOBODY")
    with pytest.raises(DataError, match="no series matching.*NOBODY"):
        retrieve(source, tmp_path / "cache")


def test_the_bounds_refuse_before_anything_is_fetched(orthanc: OrthancServer, tmp_path: Path):
    _study(tmp_path / "a", "P-BOUND")
    _study(tmp_path / "b", "P-BOUND")
    stow(orthanc.dicomweb_url, sorted((tmp_path / "a").rglob("*.dcm")) + sorted((tmp_path / "b").rglob("*.dcm")))
    source = parse_dicomweb_source(f"{orthanc.source_url}?PatientID=P-BOUND")
    cache = tmp_path / "cache"
    with pytest.raises(ConfigurationError, match=f"more than {SLICES + 3} instances.*max_instances"):
        retrieve(source, cache, max_instances=SLICES + 3)
    with pytest.raises(ConfigurationError, match="more than 1 studies"):
        retrieve(source, cache, max_studies=1)
    assert not cache.exists() or list(cache.rglob("*.dcm")) == []
    with pytest.raises(ConfigurationError, match="max_instances"):
        retrieve(source, cache, max_instances=0)
    assert retrieve(source, cache, max_studies=2, max_instances=2 * SLICES).instances == 2 * SLICES


def test_an_interrupted_series_leaves_nothing_half_written(orthanc: OrthancServer, tmp_path: Path):
    study, mr, _ = _study(tmp_path / "upload", "P-CTRLC")
    stow(orthanc.dicomweb_url, mr)
    source = parse_dicomweb_source(f"{orthanc.source_url}?PatientID=P-CTRLC")
    cache = tmp_path / "cache"

    def ctrl_c_after_three(done: int, total: int) -> None:
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        retrieve(source, cache, progress=ctrl_c_after_three)
    assert _partials(cache) == [] and not (cache / study).exists()
    (cache / ".partial-of-a-killed-run").mkdir()  # what kill -9 would leave: swept by the next run
    (cache / ".partial-of-a-killed-run" / "1.2.3.dcm").write_bytes(b"half")
    assert retrieve(source, cache).fetched == 1  # and the next run completes it
    assert _partials(cache) == []


def test_a_pacs_that_stops_mid_way_leaves_only_complete_series(tmp_path: Path):
    with orthanc_server() as pacs:
        study, mr, ct = _study(tmp_path / "upload", "P-STOP", ct=True)
        stow(pacs.dicomweb_url, [*mr, *ct])
        source = parse_dicomweb_source(f"{pacs.source_url}?PatientID=P-STOP")
        cache = tmp_path / "cache"

        def stop_after_first_instance(done: int, total: int) -> None:
            if done == 1:
                pacs.stop()

        with pytest.raises(TransportError, match="cannot reach"):
            retrieve(source, cache, progress=stop_after_first_instance)
    assert _partials(cache) == []
    placed = list((cache / study).iterdir()) if (cache / study).exists() else []
    assert len(placed) <= 1  # the first series may have arrived whole before the stop; the second cannot
    assert all(len(list(series.glob("*.dcm"))) == SLICES for series in placed)  # whatever got in is whole
    assert not (cache / "views").exists() or list((cache / "views").iterdir()) == []  # no view of half a query


def test_https_verifies_the_certificate_against_the_given_ca(orthanc: OrthancServer, tmp_path: Path):
    ca = CertificateAuthority.init(tmp_path / "ca")
    issued = ca.issue_hub()  # a serverAuth certificate for 127.0.0.1, signed by this CA
    (tmp_path / "tls.pem").write_bytes(issued.cert_pem)
    (tmp_path / "tls.key").write_bytes(issued.key_pem)
    with tls_proxy(orthanc.port, tmp_path / "tls.pem", tmp_path / "tls.key") as port:
        base = f"https://127.0.0.1:{port}/dicom-web"
        _study_uid, mr, _ = _study(tmp_path / "upload", "P-TLS")
        assert stow(base, mr, ca_file=ca.ca_file) == SLICES
        source = parse_dicomweb_source(f"dicomweb+{base}?PatientID=P-TLS")
        assert retrieve(source, tmp_path / "cache", ca_file=ca.ca_file).instances == SLICES
        with pytest.raises(ConfigurationError, match="TLS certificate not accepted.*ca_file"):
            retrieve(source, tmp_path / "other-cache")  # the system CAs do not know this hospital CA


def test_a_pacs_query_registers_as_a_dataset_equal_to_the_same_study_from_a_folder(
    orthanc: OrthancServer, tmp_path: Path
):
    from typer.testing import CliRunner

    from laulima.cli import app
    from laulima.imaging.datasets import load_dataset
    from laulima.imaging.images import read_case
    from laulima.site.catalog import Catalog

    _study_uid, mr, _ = _study(tmp_path / "upload", "P-DATASET")
    stow(orthanc.dicomweb_url, mr)
    home = tmp_path / "home"
    url = f"{orthanc.source_url}?Modality=MR&PatientID=P-DATASET"
    result = CliRunner().invoke(
        app, ["site", "dataset", "add", "from-pacs", url, "--home", str(home), "--tag", "t1"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    assert "1 case(s)" in result.output and "dicomweb" in result.output
    catalog = Catalog(home)
    catalog.add("from-folder", tmp_path / "upload")
    assert catalog.info("from-pacs").source == url and catalog.with_tag("t1") == ["from-pacs"]

    def arrays(name: str) -> tuple[np.ndarray, np.ndarray]:
        (case,) = load_dataset(catalog.get(name)).test + load_dataset(catalog.get(name)).training
        image, _label, affine = read_case(case, n_channels=1)
        return image, affine

    pacs_image, pacs_affine = arrays("from-pacs")
    folder_image, folder_affine = arrays("from-folder")
    np.testing.assert_array_equal(pacs_image, folder_image)
    np.testing.assert_array_equal(pacs_affine, folder_affine)
    cache = (home / "pacs-cache").resolve()
    assert any(cache in Path(p).resolve().parents for p in catalog.readable("from-pacs"))  # the sandbox grants it
