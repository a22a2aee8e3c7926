"""A hospital may refuse to train a model on its data alone that then leaves it (local_models)."""

from __future__ import annotations

import pytest

from laulima.site.policy import SitePolicy, Verdict, decide, parse_policy
from tests.site.test_policy import facts


def test_a_local_model_job_is_refused_under_local_models_refuse_and_runs_by_default():
    refuse = parse_policy({"local_models": "refuse"})
    decision = decide(refuse, facts(local_model=True))
    assert decision.verdict is Verdict.REFUSE and 'local_models = "refuse"' in decision.why
    assert decide(refuse, facts()).verdict is Verdict.RUN  # federated rounds are not affected
    assert decide(refuse, facts(kind="evaluate")).verdict is Verdict.RUN  # nor evaluating others' models
    assert decide(SitePolicy(), facts(local_model=True)).verdict is Verdict.RUN


def test_the_key_is_validated_and_only_a_training_job_is_a_local_model():
    with pytest.raises(Exception, match="local_models"):
        parse_policy({"local_models": "maybe"})
    with pytest.raises(Exception, match="local_model"):
        facts(kind="evaluate", local_model=True)
