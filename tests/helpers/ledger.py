"""The SiteLedger algorithm's proof that every update counted exactly once.

``SiteLedger`` (tests/helpers/algorithms.py) makes every site's contribution visible in the
model itself: each round's global model is checked against the FedAvg of exactly the updates
the hub says it accepted, so a lost update, one counted twice or a round folded twice fails.
"""

from __future__ import annotations

import ssl

import httpx
import numpy as np

from laulima.core.protocol import API_PREFIX, MetricRecord, RoundPublic, RoundStatus
from laulima.core.spec import parse_spec
from laulima.core.weights import from_safetensors
from laulima.sim import LocalFederation
from tests.helpers.algorithms import LEDGER_SITES
from tests.helpers.bundles import packed_fields

__all__ = ["assert_every_update_counted_once", "ledger_spec", "train_records"]

#: FedAvg folds in float32 (a few roundings per value and round, relative error ~1e-6); a
#: lost or doubled update moves some slot by at least 0.1 (3/28), far outside this.
RTOL = 1e-5


def ledger_spec(**overrides):
    spec = {
        "name": "crash",
        **packed_fields("SiteLedger"),
        "dataset": "none",
        "rounds": 3,
        "min_sites": 2,
        "round_timeout_s": 30,
        "evaluation": {"every": 0, "final": True},
        "config": {"sleep_s": 0.7},
    }
    spec.update(overrides)
    return parse_spec(spec)


def train_records(fed, exp_id, round_index):
    return [m for m in fed.client.metrics(exp_id) if m.kind == "train" and m.round == round_index]


def _participants(rounds: list[RoundPublic], metrics: list[MetricRecord]) -> list[list[str]]:
    """Per round, the sites whose update the hub accepted (as many entries as it counted)."""
    out = []
    for r in rounds:
        sites = sorted(m.site for m in metrics if m.kind == "train" and m.round == r.index)
        assert len(sites) == len(set(sites)) == r.n_updates, f"round {r.index}: updates {sites}, n={r.n_updates}"
        assert set(sites) <= set(r.sites), f"round {r.index}: updates from unselected sites {sites} vs {r.sites}"
        out.append(sites)
    return out


def _expected_models(participants: list[list[str]]) -> list[np.ndarray]:
    """The global model after each round, in float64: site n adds ``round`` to slot n - 1,
    and FedAvg weights it by n / (sum of the round's n)."""
    w = np.zeros(len(LEDGER_SITES))
    models = []
    for round_index, sites in enumerate(participants, start=1):
        total = sum(LEDGER_SITES[s] for s in sites)
        for site in sites:
            n = LEDGER_SITES[site]
            w[n - 1] += n * round_index / total
        models.append(w.copy())
    return models


def _blob(fed: LocalFederation, digest: str) -> np.ndarray:
    verify = ssl.create_default_context(cafile=str(fed.hub.ca_file)) if fed.hub.ca_file else True
    response = httpx.get(
        f"{fed.url}{API_PREFIX}/blobs/{digest}",
        headers={"Authorization": f"Bearer {fed.hub.admin_token}"},
        verify=verify,
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return from_safetensors(response.content)["w"]


def assert_every_update_counted_once(fed: LocalFederation, exp_id: int) -> list[list[str]]:
    """Each round's stored global model, and the final evaluation's view of the last one,
    equal the FedAvg of exactly the accepted updates."""
    rounds = fed.client.rounds(exp_id)
    metrics = fed.client.metrics(exp_id)
    assert all(r.status == RoundStatus.AGGREGATED for r in rounds), [r.status for r in rounds]
    participants = _participants(rounds, metrics)
    expected = _expected_models(participants)
    for r, want in zip(rounds, expected, strict=True):
        assert r.global_digest is not None
        got = _blob(fed, r.global_digest)
        np.testing.assert_allclose(got, want, rtol=RTOL, err_msg=f"round {r.index} with updates {participants}")
    final = fed.client.experiment(exp_id)
    assert final.global_digest == rounds[-1].global_digest
    model = _blob(fed, final.global_digest)
    evaluations = [m for m in metrics if m.kind == "evaluate"]
    assert {m.site for m in evaluations} == set(rounds[-1].sites), evaluations
    for m in evaluations:  # each site evaluated exactly the stored final model
        reported = np.array([m.metrics[f"w{i}"] for i in range(len(LEDGER_SITES))])
        np.testing.assert_array_equal(reported, model.astype(np.float64), err_msg=m.site)
    return participants
