"""Property-based fuzzing of the hub's API from its own OpenAPI document (schemathesis).

Each operation gets generated requests, valid and invalid ones, with working credentials
(the operator's token for people's endpoints, a site's token for the site endpoints) on an
in-process hub; none may answer 5xx or raise. The number of cases is printed in pytest's
terminal summary. (Hypothesis drives schemathesis' strategies directly: schemathesis'
own pytest integration does not run under pytest 9.)
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from laulima.core.protocol import API_PREFIX
from laulima.core.weights import to_safetensors
from laulima.hub.app import create_app
from laulima.hub.settings import HubSettings
from tests.security.fuzz_counter import CASES

OPERATOR = "fuzz-operator-token-0123456789"
MAX_EXAMPLES = 100

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
        spec = {"name": "fuzz", "algorithm": "x.y:Z", "dataset": "d", "rounds": 1, "sites": ["site-a"]}
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
