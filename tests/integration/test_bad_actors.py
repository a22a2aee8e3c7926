"""One careless or hostile party, against a real hub and real agents under mutual TLS.

Each case crosses hub and agent: a refused update must end that site's part at once (the
agent reports it, the hub fails the task and decides the round); a revoked site must be
left out of the next rounds instead of holding each until its deadline; an experiment
that fails must not keep the sites from another experiment's work.
"""

from __future__ import annotations

import time

import pytest

from laulima.core.spec import parse_spec
from laulima.pki.ca import CertificateAuthority
from tests.helpers.bundles import packed_fields
from tests.helpers.federation import assert_completed, logs, wait_for

pytestmark = pytest.mark.slow

LONG = 600  # a round timeout no test may wait for


def _counter(name: str, **overrides):
    spec = {
        "name": name,
        **packed_fields("SlowCounter"),
        "dataset": "none",
        "rounds": 2,
        "min_sites": 1,
        "round_timeout_s": LONG,
        "evaluation": {"every": 0, "final": True},
        "config": {"size": 4},
    }
    spec.update(overrides)
    return parse_spec(spec)


def test_refused_updates_end_the_round_at_once_and_the_sites_go_on_with_other_work(federation):
    fed = federation(3)
    started = time.monotonic()
    # SlowCounter adds 1 to every weight: an L2 step of 2 (size 4) is over this bound at every site.
    doomed = fed.submit(_counter("doomed", max_update_norm=0.5))
    healthy = fed.submit(_counter("healthy"))

    doomed_exp = fed.wait(doomed.id, timeout=90)
    assert doomed_exp.status == "failed", logs(fed)
    assert "failed (refused)" in (doomed_exp.error or "") and "max_update_norm" in (doomed_exp.error or "")
    assert_completed(fed.wait(healthy.id, timeout=90), fed)
    assert time.monotonic() - started < LONG / 2, "a refused update held its round towards the deadline"

    refusals = fed.client.refusals(doomed.id)
    assert {r.site for r in refusals} == {"site-a", "site-b", "site-c"}, (doomed_exp.error, logs(fed))
    assert all(r.status == 422 for r in refusals)  # each refused once: no site retried it forever
    assert [r.n_updates for r in fed.client.rounds(healthy.id)] == [3, 3]


def test_a_revoked_site_is_left_out_of_the_next_rounds_with_the_reason(federation):
    fed = federation(3)
    started = time.monotonic()
    exp = fed.submit(_counter("revocation", rounds=3, config={"size": 4, "sleep_s": 0.3}))
    wait_for(lambda: fed.client.experiment(exp.id).rounds_done >= 1, 60, "round 1 to finish")
    assert fed.ca_dir is not None
    CertificateAuthority.load(fed.ca_dir).revoke("site-c")  # the hub reads ca/hub/revoked.json

    done = fed.wait(exp.id, timeout=90)
    assert_completed(done, fed)
    rounds = fed.client.rounds(exp.id)
    later = [r for r in rounds if "site-c" not in r.sites]
    assert later, f"site-c was never left out\n{logs(fed)}"
    assert all(r.left_out.get("site-c") == "its certificate has been revoked" for r in later)
    assert time.monotonic() - started < LONG / 2, "a round waited for the revoked site until its deadline"
    status = {s.name: s.status for s in fed.operator.list_sites()}
    assert status == {"site-a": "online", "site-b": "online", "site-c": "revoked"}
