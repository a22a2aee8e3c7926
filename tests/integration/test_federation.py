"""A real hub and real site agents, each its own process, run experiments over HTTP."""

from __future__ import annotations

import numpy as np
import pytest

from laulima.core.spec import parse_spec
from laulima.core.weights import from_safetensors
from laulima.errors import SpecError
from tests.helpers.bundles import packed_fields
from tests.helpers.federation import assert_completed, logs

pytestmark = pytest.mark.slow


def test_three_sites_run_three_rounds_of_logistic_regression(federation, tmp_path):
    fed = federation(3, "tabular-demo", seed=3)
    spec = parse_spec(
        {
            "name": "tiny-e2e",
            "algorithm": "laulima.algorithms.tabular:LogisticRegression",
            "dataset": "tabular-demo",
            "rounds": 3,
            "min_sites": 3,
            "round_timeout_s": 60,
            "seed": 3,
            "config": {"lr": 0.1},
        }
    )
    exp = fed.wait(fed.submit(spec).id, timeout=120)
    assert_completed(exp, fed)

    rounds = fed.client.rounds(exp.id)
    assert [r.index for r in rounds] == [1, 2, 3]
    assert all(r.status == "aggregated" and r.n_updates == 3 for r in rounds), logs(fed)
    assert len({r.global_digest for r in rounds}) == 3, "every round must produce a new model"

    metrics = fed.client.metrics(exp.id)
    evals = {(m.round, m.site): m for m in metrics if m.kind == "evaluate"}
    assert set(evals) == {(r, s) for r in (1, 2, 3) for s in ("site-a", "site-b", "site-c")}
    final_acc = np.mean([evals[(3, s)].metrics["accuracy"] for s in ("site-a", "site-b", "site-c")])
    assert final_acc > 0.7, f"the federated model did not learn: accuracy {final_acc:.3f}"

    model_path = fed.client.download_model(exp.id, tmp_path / "final.safetensors")
    model = from_safetensors(model_path.read_bytes())
    assert model and all(np.isfinite(v).all() for v in model.values())


def test_fedavg_over_processes_matches_the_hand_computed_model(federation):
    """SlowCounter adds 1 per round; FedAvg of identical updates is exactly +1 per round."""
    fed = federation(3)
    spec = parse_spec(
        {
            "name": "counter",
            **packed_fields("SlowCounter"),
            "dataset": "none",
            "rounds": 2,
            "min_sites": 3,
            "evaluation": {"every": 0, "final": True},
            "config": {"size": 4},
        }
    )
    exp = fed.wait(fed.submit(spec).id, timeout=60)
    assert_completed(exp, fed)
    final = [m for m in fed.client.metrics(exp.id) if m.kind == "evaluate"]
    assert {m.site for m in final} == {"site-a", "site-b", "site-c"}
    assert all(m.round == 2 and m.metrics["mean_w"] == pytest.approx(2.0) for m in final)


def test_an_experiment_naming_an_unregistered_site_is_refused_with_the_site_name(federation):
    fed = federation(1)
    spec = parse_spec(
        {"name": "x", **packed_fields("SlowCounter"), "dataset": "none", "rounds": 1,
         "sites": ["site-a", "site-zz"]}
    )
    with pytest.raises(Exception, match="site-zz"):
        fed.submit(spec)


def test_a_malformed_spec_names_the_field():
    with pytest.raises(SpecError, match="rounds"):
        parse_spec({"name": "x", "algorithm": "a.b:C", "dataset": "d", "rounds": 0})
