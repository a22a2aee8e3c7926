"""What a site may say to the hub about a failure: the problem, never where its data lives."""

from __future__ import annotations

import pytest

from laulima.site.redact import MAX_REASON_CHARS, redact


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("/data/hospital/brain/imagesTr/BraTS_0042_0000.nii.gz: file not found", "/data/hospital"),
        ("/data/hospital/brain/imagesTr/BraTS_0042_0000.nii.gz: file not found", "BraTS_0042"),
        ("FileNotFoundError: [Errno 2] No such file or directory: '/srv/site/tls/site.key'", "/srv/site"),
        ("cannot read 1.2.840.113619.2.55.3.604688119.dcm: bad tag", "113619"),
        ("label affine [[1.0, 0.0, 0.0, 12.5], [0.0, 1.0, 0.0, -3.25]] differs", "12.5"),
        ("image shape (182, 218, 182) does not match", "218"),
        ("train.csv: line 7, column 'x3': 'MRN-0042817' is not a finite number", "MRN-0042817"),
        ('KeyError: "patient Jane Doe"', "Jane Doe"),
        ("C:\\Users\\radiology\\case.dcm broken", "radiology"),
    ],
)
def test_paths_file_names_and_case_values_do_not_survive(text: str, secret: str):
    assert secret not in redact(text, folders=["/srv/site"], keep=["brain"])


def test_the_sentence_that_says_what_went_wrong_survives():
    assert redact("dataset 'brain' has 3 cases, policy min_cohort is 10", keep=["brain"]) == (
        "dataset 'brain' has 3 cases, policy min_cohort is 10"
    )
    assert redact("the site's audit trail cannot be written; the site's administrator must check it", keep=[]) == (
        "the site's audit trail cannot be written; the site's administrator must check it"
    )
    assert "remove it from dataset.json" in redact("/d/x.nii.gz: missing; remove it from dataset.json")
    assert redact("ZeroDivisionError: division by zero (at model.py:12 in train)", keep=[]).endswith(
        "(at model.py:12 in train)"
    )


def test_the_sites_own_folders_are_named_as_such_and_the_text_is_bounded():
    out = redact("cannot write /srv/site/work/t-1/scratch/x: disk full", folders=["/srv/site"])
    assert out == "cannot write <site folder>: disk full"
    assert len(redact("x" * 5000)) == MAX_REASON_CHARS
    assert "\n" not in redact("Traceback:\n  line 1\nValueError: boom")
