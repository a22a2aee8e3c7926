"""Two hub processes behind a load balancer, one killed -9 mid-round: the other finishes the
experiment, and every round is aggregated exactly once.

Both processes share the database and the blob store of the run's backend (one SQLite home
and blob folder, or PostgreSQL + S3 under ``--hub-backend=postgres-s3``), the blob keys, the
audit folder, the CA and the admin token. Sites and people reach them through a TCP load
balancer (tests/helpers/balancer.py), so mutual TLS stays end to end. The process that holds
the experiment's lease — the one orchestrating it — is the one killed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import select

from laulima.client import Client
from laulima.core.protocol import RoundStatus
from laulima.errors import TransportError
from laulima.hub.db import Lease, make_engine, make_session_factory
from laulima.hub.leases import experiment_lease
from laulima.processes import HubProcess, free_port
from tests.helpers.algorithms import LEDGER_SITES
from tests.helpers.balancer import balancer
from tests.helpers.federation import assert_completed, logs, wait_for
from tests.helpers.ledger import assert_every_update_counted_once, ledger_spec, train_records
from tests.integration.conftest import admit_test_bundles

pytestmark = pytest.mark.slow


def _holder(database_url: str, experiment_id: int) -> str | None:
    engine = make_engine(database_url)
    try:
        with make_session_factory(engine)() as s:
            lease = s.scalar(select(Lease).where(Lease.name == experiment_lease(experiment_id)))
            return lease.holder if lease is not None else None
    finally:
        engine.dispose()


def _ended(client: Client, experiment_id: int) -> bool:
    """Whether the experiment ended; a request that was on a connection to the killed process
    fails once (as it would behind any load balancer) and is simply asked again."""
    try:
        return client.experiment(experiment_id).status != "running"
    except TransportError:
        return False


def test_the_other_hub_process_finishes_the_experiment_when_the_orchestrating_one_is_killed(tmp_path: Path):
    from laulima.sim import LocalFederation

    ports = [free_port(), free_port()]
    home = tmp_path / "fed" / "hub"  # shared by both processes (their database and blobs, unless the run's backend)
    database = os.environ.get("LAULIMA_HUB_DATABASE_URL") or f"sqlite:///{home / 'hub.db'}"
    shared = {
        "LAULIMA_HUB_PEER_POLL_S": "0.5",  # on SQLite: long polls re-read the database (PostgreSQL notifies)
        "LAULIMA_HUB_LEASE_S": "5",
    }
    with balancer([("127.0.0.1", port) for port in ports]) as lb:
        with LocalFederation(
            tmp_path / "fed", 3, "none", hub_port=ports[0], public_url=f"https://127.0.0.1:{lb.port}", hub_env=shared
        ) as fed:
            for name in fed.sites:
                admit_test_bundles(fed.workdir / "sites" / name)
            second = HubProcess(
                home, ports[1], fed.hub.admin_token, ca_dir=fed.hub.ca_dir, settings={**fed.hub.env, **shared}
            )
            second.log_path = home / "hub-2.log"
            second.start()
            try:
                second.wait_ready()
                hubs = [fed.hub, second]
                exp = fed.submit(ledger_spec(rounds=4))
                wait_for(lambda: len(train_records(fed, exp.id, 2)) >= 1, 90, "a first update of round 2")
                holder = _holder(database, exp.id)
                assert holder is not None
                orchestrating = next(h for h in hubs if h.popen is not None and f":{h.popen.pid}:" in holder)
                other = next(h for h in hubs if h is not orchestrating)
                orchestrating.kill()

                # (not fed.wait: it gives up when its own hub process is gone, and that may be the one killed)
                wait_for(lambda: _ended(fed.client, exp.id), 180, "the experiment to end")
                done = fed.client.experiment(exp.id)
                assert_completed(done, fed)
                rounds = fed.client.rounds(exp.id)
                assert [r.index for r in rounds] == [1, 2, 3, 4]  # one row per round: none opened twice
                assert all(r.status == RoundStatus.AGGREGATED for r in rounds)
                assert [r.n_updates for r in rounds] == [3, 3, 3, 3], logs(fed)
                participants = assert_every_update_counted_once(fed, exp.id)
                assert participants == [sorted(LEDGER_SITES)] * 4
                assert f"taking over {experiment_lease(exp.id)}" in other.log_path.read_text(), other.log_tail()
            finally:
                second.stop()
