"""Secure aggregation over real processes: a hub, real agents, and sites that drop out."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
from safetensors.numpy import load_file

from laulima.core.privacy.quantize import error_bound, scale_for
from laulima.core.spec import parse_spec
from tests.helpers.faulty_sites import client_of, drop_after_sharing
from tests.helpers.federation import assert_completed, logs, wait_for

pytestmark = pytest.mark.slow

ALGORITHM = "laulima.algorithms.tabular:LogisticRegression"


def _spec(name: str, **extra: object):
    return parse_spec(
        {
            "name": name,
            "algorithm": ALGORITHM,
            "dataset": "tabular-demo",
            "rounds": 1,
            "min_sites": 2,
            "round_timeout_s": 20,  # a site that drops after sharing is waited for until then
            "seed": 3,
            "max_samples_per_site": 400,
            "evaluation": {"every": 0, "final": False},
            "config": {"lr": 0.1},
            **extra,
        }
    )


def test_the_secure_aggregate_equals_the_plain_one_when_a_site_drops_after_sharing(federation, tmp_path):
    fed = federation(3, "tabular-demo", seed=3)
    plain = fed.wait(fed.submit(_spec("plain", sites=["site-a", "site-b"])).id, timeout=120)
    assert_completed(plain, fed)

    fed.sites["site-c"].stop()
    faulty = drop_after_sharing(client_of(fed.workdir / "sites" / "site-c"), "site-c")
    secure = _spec("masked", secure_aggregation={"clip": 1000.0, "phase_timeout_s": 4})
    exp = fed.wait(fed.submit(secure).id, timeout=120)
    faulty.join(30)
    assert not faulty.errors, faulty.errors
    assert_completed(exp, fed)
    [rnd] = fed.client.rounds(exp.id)
    assert (rnd.status, rnd.n_updates) == ("aggregated", 2), logs(fed)

    expected = load_file(fed.client.download_model(plain.id, tmp_path / "plain.safetensors"))
    got = load_file(fed.client.download_model(exp.id, tmp_path / "masked.safetensors"))
    with sqlite3.connect(f"file:{fed.workdir / 'hub' / 'hub.db'}?mode=ro", uri=True) as db:
        weights = [n for (n,) in db.execute("SELECT n_samples FROM updates WHERE experiment_id = ?", (exp.id,))]
        leftovers = db.execute("SELECT count(*) FROM secagg_shares").fetchone()[0]
    bound = error_bound(scale_for(400 * 1000.0, 3), 3) / sum(weights)
    assert sorted(got) == sorted(expected)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=0, atol=bound + 1e-6, err_msg=key)
    assert any(not np.array_equal(got[k], fed_initial) for k, fed_initial in expected.items())
    assert leftovers == 0, "a decided round's shares are deleted"
    left_behind = sorted((fed.workdir / "sites").rglob("*.safetensors"))
    assert not left_behind, f"the sites keep no model-sized files of finished tasks: {left_behind}"


def test_too_many_dropouts_abort_the_round_and_the_next_round_runs(federation):
    fed = federation(3, "tabular-demo", seed=4)
    for name in ("site-b", "site-c"):
        fed.sites[name].stop()
    faulty = [drop_after_sharing(client_of(fed.workdir / "sites" / n), n) for n in ("site-b", "site-c")]
    spec = _spec("aborting", rounds=2, secure_aggregation={"clip": 1000.0, "phase_timeout_s": 3})
    submitted = fed.submit(spec)
    for thread in faulty:
        thread.join(60)
        assert not thread.errors, thread.errors

    def first_round_closed() -> bool:
        rounds = fed.client.rounds(submitted.id)
        return bool(rounds) and rounds[0].status != "open"

    wait_for(first_round_closed, 60, "round 1 to close")
    first = fed.client.rounds(submitted.id)[0]
    assert first.status == "aborted", logs(fed)
    assert "secure aggregation aborted" in first.note and "2 are needed" in first.note, first.note
    for name in ("site-b", "site-c"):
        fed.sites[name].start()
    exp = fed.wait(submitted.id, timeout=120)
    assert_completed(exp, fed)
    rounds = fed.client.rounds(exp.id)
    assert [(r.index, r.status) for r in rounds] == [(1, "aborted"), (2, "aggregated")], logs(fed)
    assert rounds[1].n_updates == 3
    assert rounds[1].global_digest == exp.global_digest


def test_distributed_dp_under_secure_aggregation_reports_the_accountants_epsilon(federation):
    from laulima.core.privacy.accountant import GaussianRelease, epsilon

    fed = federation(3, "tabular-demo", seed=5)
    privacy = {"mode": "distributed", "clip": 0.5, "target_epsilon": 6.0, "delta": 1e-5}
    spec = _spec("private", rounds=2, privacy=privacy, secure_aggregation={"phase_timeout_s": 20})
    exp = fed.wait(fed.submit(spec).id, timeout=180)
    assert_completed(exp, fed)
    stored = fed.client.experiment(exp.id)
    sigma = stored.spec["privacy"]["noise_multiplier"]
    assert sigma > 0 and epsilon([GaussianRelease(sigma, count=2)], 1e-5) <= 6.0 + 1e-9
    records = [m for m in fed.client.metrics(exp.id) if m.kind == "train"]
    assert {(m.round, m.site) for m in records} == {(r, s) for r in (1, 2) for s in fed.sites}, logs(fed)
    for m in records:
        assert m.n_samples == 1, "under DP every site weighs 1"
        expected = epsilon([GaussianRelease(sigma, count=m.round)], 1e-5)
        assert abs(m.metrics["privacy_epsilon"] - expected) < 1e-6, m
    assert [r.status for r in fed.client.rounds(exp.id)] == ["aggregated", "aggregated"]
