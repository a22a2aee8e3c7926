"""Shared fixtures: make tests/ importable in child processes (site workers load test algorithms)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.backends import BACKENDS, S3_BUCKET, S3_CREDENTIALS, SQLITE, backend_of, use_backend
from tests.helpers.orthanc import OrthancServer, OrthancUnavailable, orthanc_server
from tests.helpers.postgres import PostgresServer, PostgresUnavailable, postgres_server
from tests.helpers.s3 import S3Unavailable, s3_server

TESTS_ROOT = Path(__file__).resolve().parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--hub-backend",
        choices=BACKENDS,
        default=SQLITE,
        help="database and blob store of every hub the tests start (tests/helpers/backends.py)",
    )


def pytest_report_header(config: pytest.Config) -> str:
    return f"hub backend: {backend_of(config)}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if backend_of(config) == SQLITE:
        return
    local = [item for item in items if item.get_closest_marker("local_backend")]
    if local:  # tests of SQLite files and the blob folder: deselected, and counted in the summary
        config.hook.pytest_deselected(items=local)
        items[:] = [item for item in items if not item.get_closest_marker("local_backend")]


def pytest_configure(config: pytest.Config) -> None:
    # Agents and their task workers are separate processes; they find tests.helpers via PYTHONPATH.
    parts = [str(TESTS_ROOT.parent)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))


@pytest.fixture(scope="session")
def orthanc() -> Iterator[OrthancServer]:
    """A real Orthanc PACS with DICOMweb on a free loopback port, for the session; tests use distinct studies."""
    problem = ""
    try:
        with orthanc_server() as server:
            yield server
    except OrthancUnavailable as exc:
        problem = str(exc)
    if problem:  # fail, never skip: a PACS test that does not run proves nothing
        pytest.fail(problem, pytrace=False)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 server (moto's server mode) on a free loopback port, for the session; its endpoint URL.
    Tests use buckets (or prefixes) of their own."""
    problem = ""
    try:
        with s3_server() as endpoint:
            yield endpoint
    except S3Unavailable as exc:
        problem = str(exc)
    if problem:  # fail, never skip: a storage test that does not run proves nothing
        pytest.fail(problem, pytrace=False)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL server on a free loopback port, for the session; tests create databases in it."""
    problem = ""
    try:
        with postgres_server() as server:
            yield server
    except PostgresUnavailable as exc:
        problem = str(exc)
    if problem:  # fail, never skip
        pytest.fail(problem, pytrace=False)


@pytest.fixture(scope="session")
def s3_bucket(s3_endpoint: str) -> str:
    """The S3 server's endpoint, with the bucket the hubs of ``--hub-backend=postgres-s3`` share (a prefix each)."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                          aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])  # fmt: skip
    client.create_bucket(Bucket=S3_BUCKET)
    return s3_endpoint


@pytest.fixture(autouse=True)
def hub_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Every hub this test starts runs on the backend chosen with ``--hub-backend``."""
    drop = use_backend(request, monkeypatch)
    yield backend_of(request.config)
    if drop is not None:
        drop()
