"""Names and ids are matched whole: a trailing newline (which ``$`` lets through) is no name."""

from __future__ import annotations

from pathlib import Path

import pytest

from laulima.errors import ConfigurationError, ProtocolError
from laulima.hub.blobstore import check_digest
from laulima.pki.ca import CertificateAuthority
from laulima.site.catalog import Catalog


def test_a_site_name_with_a_trailing_newline_gets_no_certificate(tmp_path: Path):
    ca = CertificateAuthority.init(tmp_path / "ca")
    with pytest.raises(ConfigurationError, match="site name"):
        ca.issue_site("site-a\n")


def test_a_dataset_name_with_a_trailing_newline_is_not_registered(tmp_path: Path):
    with pytest.raises(ConfigurationError, match="not valid"):
        Catalog(tmp_path / "home").add("brains\n", tmp_path)


def test_a_digest_with_a_trailing_newline_is_not_a_digest():
    with pytest.raises(ProtocolError):
        check_digest("ab" * 32 + "\n")
    assert check_digest("ab" * 32) == "ab" * 32
