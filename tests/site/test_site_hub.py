"""The agent against the hub's real app: refused results close their task, the catalog is
reported, and the site home stays owner-only."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from laulima import __version__
from laulima.algorithms.tabular_data import write_tabular_site
from laulima.pki.bundle import enroll_site, install_bundle
from laulima.pki.ca import CertificateAuthority
from laulima.site.agent import Agent
from laulima.site.catalog import Catalog
from laulima.site.client import HubClient
from laulima.site.settings import SiteSettings
from laulima.site.state import Phase, SiteState
from tests.site.conftest import RealHub, admit_helpers


def site_home(tmp_path: Path) -> Path:
    home = tmp_path / "site-a"
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    Catalog(home, site="site-a").add("ds", data)
    admit_helpers(home)
    return home


def hub_agent(home: Path, hub: RealHub, token: str, settings: SiteSettings | None = None) -> Agent:
    settings = settings or SiteSettings(
        home=home, name="site-a", hub_url="http://127.0.0.1:9", token=token, poll_wait_s=0.2, backoff_max_s=0.05
    )
    client = HubClient(settings.hub_url, token, client=hub.http, backoff_base_s=0.01, backoff_max_s=0.05, attempts=2)
    return Agent(settings, client, Catalog(home, site="site-a"), SiteState(home))


def open_rounds(hub: RealHub, *experiments: int) -> None:
    for exp in experiments:
        hub.wait_for(lambda exp=exp: hub.call("GET", f"/experiments/{exp}/rounds"), f"experiment {exp} to start")


def status(hub: RealHub, exp: int) -> str:
    return str(hub.call("GET", f"/experiments/{exp}")["status"])


def test_a_refused_update_closes_its_task_and_the_agent_takes_the_next(
    helper_algorithms, real_hub, weights_blob, tmp_path
):
    token = real_hub.register("site-a")
    agent = hub_agent(site_home(tmp_path), real_hub, token)
    assert not agent.step()  # the hub has heard from the site: it is online, rounds select it
    strict = real_hub.submit("strict", weights_blob, max_update_norm=1.0)  # Echo moves each of 6 weights by 1
    other = real_hub.submit("other", weights_blob)
    open_rounds(real_hub, strict, other)

    assert agent.step()  # the oldest task first: the strict experiment's; its update is refused
    [refused] = agent.state.tasks()
    assert refused.phase == Phase.GIVEN_UP and refused.closed_at_hub
    refusals = real_hub.call("GET", f"/experiments/{strict}/refusals")
    assert any("max_update_norm" in r["reason"] for r in refusals)
    real_hub.wait_for(lambda: status(real_hub, strict) == "failed", "the strict experiment to fail (its task closed)")

    assert agent.step()  # the next task is the other experiment's, long before the round timeout
    reported = [r for r in agent.state.tasks() if r.task_id != refused.task_id]
    assert [r.phase for r in reported] == [Phase.REPORTED]
    real_hub.wait_for(lambda: status(real_hub, other) == "completed", "the other experiment to complete")


def test_a_task_given_up_before_a_restart_is_closed_when_the_hub_sends_it_again(
    helper_algorithms, real_hub, weights_blob, tmp_path
):
    token = real_hub.register("site-a")
    home = site_home(tmp_path)
    before = hub_agent(home, real_hub, token)
    assert not before.step()  # online
    first = real_hub.submit("first", weights_blob)
    second = real_hub.submit("second", weights_blob)
    open_rounds(real_hub, first, second)
    task = before.client.next_task(0)
    assert task is not None and task.experiment_id == first
    # An earlier agent gave up on it without telling the hub (an upload refused by a hub that kept the task open).
    SiteState(home).set(
        task.id, Phase.GIVEN_UP, note=f"uploading the update of task {task.id}: hub answered 403: nonce mismatch"
    )

    agent = hub_agent(home, real_hub, token)
    agent.step()  # the hub sends it again: the agent reports it failed at once, runs nothing
    assert agent.state.get(task.id).closed_at_hub
    real_hub.wait_for(lambda: status(real_hub, first) == "failed", "the given-up task's experiment to fail")
    assert agent.step()
    assert [r.phase for r in agent.state.tasks() if r.task_id != task.id] == [Phase.REPORTED]
    real_hub.wait_for(lambda: status(real_hub, second) == "completed", "the second experiment to complete")


def test_the_hub_lists_the_agents_version_and_case_counts(real_hub, tmp_path):
    token = real_hub.register("site-a")
    home = site_home(tmp_path)
    catalog = Catalog(home, site="site-a")
    catalog.add("tab", write_tabular_site(tmp_path / "tab", 0, 3, n_train=21, n_val=4))
    agent = hub_agent(home, real_hub, token)
    agent.step()

    def site() -> dict:
        [row] = [s for s in real_hub.call("GET", "/sites") if s["name"] == "site-a"]
        return row

    assert site()["version"] == __version__
    assert site()["datasets"] == {"ds": None, "tab": 21}
    catalog.add("more", write_tabular_site(tmp_path / "more", 1, 3, n_train=8, n_val=4))
    agent.report_interval_s = 0.0
    agent.step()
    assert site()["datasets"] == {"ds": None, "more": 8, "tab": 21}


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual umask, under which files are created world-readable unless made private."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_after_site_init_and_a_task_nothing_in_the_home_is_open_to_others(
    umask_022, helper_algorithms, real_hub, weights_blob, tmp_path
):
    ca = CertificateAuthority.init(tmp_path / "ca", federation="Test federation")
    bundle = enroll_site(ca.dir, "site-a", "https://127.0.0.1:8780", tmp_path / "site-a.laulima-site")
    home = tmp_path / "hospital" / "site-a"
    install_bundle(bundle, home)  # what `laulima site init BUNDLE --home HOME` does
    admit_helpers(home)
    token = real_hub.register("site-a")  # the task itself travels in token mode: TestClient has no TLS
    settings = SiteSettings.load(
        home, hub_url="http://127.0.0.1:9", token=token, cert_file=None, key_file=None, ca_file=None, poll_wait_s=0.2
    )
    (tmp_path / "data").mkdir()
    Catalog(home, site="site-a").add("ds", tmp_path / "data")
    agent = hub_agent(home, real_hub, token, settings)
    assert not agent.step()  # online
    exp = real_hub.submit("one", weights_blob)
    open_rounds(real_hub, exp)
    assert agent.step()
    real_hub.wait_for(lambda: status(real_hub, exp) == "completed", "the task's experiment to complete")

    task_dir = agent.task_dir(agent.state.tasks()[0].task_id)
    assert {"stderr.log", "stdout.log", "task.json", "result.json"} <= {p.name for p in task_dir.iterdir()}
    everything = [home, *home.rglob("*")]
    names = {p.name for p in everything}
    assert {"site.toml", "catalog.db", "state.json", "tls", "site.pem", "site.key", "work"} <= names
    opened = [
        f"{p.relative_to(home)} {stat.S_IMODE(p.stat().st_mode):o}" for p in everything if p.stat().st_mode & 0o077
    ]
    assert opened == []
