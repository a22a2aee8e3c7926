"""Property-based fuzzing of the hub's API from its own OpenAPI document (schemathesis).

Each operation gets generated requests, valid and invalid ones, with working credentials
(the operator's token for people's endpoints, a site's token for the site endpoints) on an
in-process hub; none may answer 5xx or raise. Then again, fewer per operation, over HTTP
against a hub served by uvicorn with mutual TLS, where a site is its client certificate:
the path every real request takes (TLS protocol classes, connection guard, certificate
checks). The number of cases is printed in pytest's terminal summary. (Hypothesis drives
schemathesis' strategies directly: schemathesis' own pytest integration does not run
under pytest 9.) test_stateful_fuzz.py drives whole rounds, with real tasks and nonces.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from laulima.core.protocol import API_PREFIX
from laulima.core.weights import to_safetensors
from laulima.hub.app import create_app
from laulima.hub.settings import HubSettings
from tests.security.conftest import ADMIN_TOKEN, TLSHub, start_tls_hub
from tests.security.fuzz_counter import CASES

OPERATOR = "fuzz-operator-token-0123456789"
MAX_EXAMPLES = 100
MAX_EXAMPLES_TLS = 30
IDENTITY = "laulima.algorithms.identity:Identity"
"""A built-in: the hub accepts it without a bundle, and no site runs it here."""

HOME = Path(tempfile.mkdtemp(prefix="laulima-fuzz-"))
APP = create_app(HubSettings(home=HOME / "hub", admin_token=OPERATOR, long_poll_max_s=0.05, orchestrator_tick_s=0.05))
SCHEMA = schemathesis.openapi.from_asgi("/openapi.json", APP)
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]


@pytest.fixture(scope="module")
def site_token() -> Iterator[str]:
    with TestClient(APP) as client:  # runs the lifespan: the hub's parts exist for the fuzzer's calls
        auth = {"Authorization": f"Bearer {OPERATOR}"}
        token = client.post(f"{API_PREFIX}/sites", json={"name": "site-a"}, headers=auth).json()["token"]
        weights = to_safetensors({"w": np.zeros(4, np.float32)})
        digest = client.put(f"{API_PREFIX}/blobs", content=weights, headers=auth).json()["digest"]
        spec = {"name": "fuzz", "algorithm": IDENTITY, "dataset": "d", "rounds": 1, "sites": ["site-a"]}
        r = client.post(f"{API_PREFIX}/experiments", json={"spec": spec, "initial_weights": digest}, headers=auth)
        assert r.status_code == 201, r.text
        yield token
    shutil.rmtree(HOME, ignore_errors=True)


def test_the_document_covers_every_route():
    paths = {f"{op.method.upper()} {op.path}" for op in OPERATIONS}
    assert {"PUT /api/v1/tasks/{task_id}/update", "POST /api/v1/experiments", "POST /api/v1/tokens"} <= paths


@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda op: f"{op.method.upper()} {op.path}")
def test_no_generated_request_makes_the_hub_fail(operation: schemathesis.APIOperation, site_token: str) -> None:
    token = site_token if operation.path.startswith(f"{API_PREFIX}/tasks") else OPERATOR
    label = f"{operation.method.upper()} {operation.path}"
    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))

    @given(case=cases)
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def run(case: schemathesis.Case) -> None:
        response = case.call(headers={"Authorization": f"Bearer {token}"})
        CASES[label] += 1
        assert response.status_code < 500, f"{label}: {response.status_code} {response.text[:500]}"

    run()


@pytest.fixture(scope="module")
def tls_fuzz_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSHub]:
    """A hub with mutual TLS, an experiment with an open task for site-a, site-a's certificate."""
    hub = start_tls_hub(tmp_path_factory.mktemp("fuzz-tls"), long_poll_max_s=0.05)
    site = hub.site("site-a")
    assert site.get("/tasks/next").status_code == 204  # known from its first verified request
    operator = hub.operator()
    digest = operator.put("/blobs", content=to_safetensors({"w": np.zeros(4, np.float32)})).json()["digest"]
    spec = {"name": "fuzz", "algorithm": IDENTITY, "dataset": "d", "rounds": 1, "sites": ["site-a"]}
    r = operator.post("/experiments", json={"spec": spec, "initial_weights": digest})
    assert r.status_code == 201, r.text
    yield hub
    hub.stop()


TLS_OPERATIONS = [result.ok() for result in schemathesis.openapi.from_dict(APP.openapi()).get_all_operations()]


@pytest.mark.parametrize("operation", TLS_OPERATIONS, ids=lambda op: f"{op.method.upper()} {op.path}")
def test_no_generated_request_over_mutual_tls_makes_the_hub_fail(
    operation: schemathesis.APIOperation, tls_fuzz_hub: TLSHub
) -> None:
    hub = tls_fuzz_hub
    site_endpoint = operation.path.startswith(f"{API_PREFIX}/tasks")
    cert = hub.tmp / "fuzz-site.pem"
    if not cert.exists():
        issued = hub.certs["site-a"]
        cert.write_bytes(issued.cert_pem)
        cert.with_suffix(".key").write_bytes(issued.key_pem)
    # A site presents its certificate and no token (a token would make it a person).
    auth = {} if site_endpoint else {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    tls = {"verify": str(hub.ca.ca_file), "cert": (str(cert), str(cert.with_suffix(".key")))}
    base_url = f"https://127.0.0.1:{hub.settings.port}"
    label = f"{operation.method.upper()} {operation.path} (mTLS)"
    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))
    session = requests.Session()

    @given(case=cases)
    @settings(max_examples=MAX_EXAMPLES_TLS, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def run(case: schemathesis.Case) -> None:
        try:
            response = case.call(base_url=base_url, session=session, headers=auth, **tls)
        except (requests.exceptions.InvalidHeader, requests.exceptions.InvalidURL, UnicodeError):
            reject()  # not sendable over HTTP at all: the client refuses before the hub sees it
        CASES[label] += 1
        assert response.status_code < 500, f"{label}: {response.status_code} {response.text[:500]}"

    try:
        run()
    finally:
        session.close()
