"""`laulima sim --engine ray`: the site agents as Ray actors, against a real hub.

The 100-site run is the point of the engine (a process per agent does not fit on 2 cores);
the small one shows that an agent that dies inside an actor is reported by its site's name.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from laulima.errors import ConfigurationError, LaulimaError
from laulima.sim import LocalFederation, simulation_hub_settings, site_names
from laulima.sim_ray import import_ray, packing
from tests.helpers.federation import wait_for

REPO = Path(__file__).resolve().parents[2]


def _toml(data: dict[str, object]) -> str:
    """The few TOML shapes a spec uses: scalars, then one level of tables."""
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    lines = [f"{k} = {json.dumps(v)}" for k, v in data.items() if k not in tables]
    for name, table in tables.items():
        lines += [f"[{name}]", *(f"{k} = {json.dumps(v)}" for k, v in table.items())]
    return "\n".join(lines) + "\n"


def _first_failure(fed: LocalFederation, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            fed.check_agents()
        except LaulimaError as exc:
            return str(exc)
        time.sleep(0.2)
    raise AssertionError(f"no agent was reported within {timeout} s")


# -- without Ray ------------------------------------------------------------------------
def test_sites_are_dealt_out_to_one_actor_per_cpu_or_in_groups_of_the_size_asked():
    names = site_names(7)
    assert packing(names, cpus=2) == [names[0::2], names[1::2]]
    assert packing(names[:1], cpus=16) == [names[:1]]  # never an actor without a site
    assert [len(g) for g in packing(names, cpus=2, sites_per_actor=3)] == [3, 2, 2]
    assert sorted(sum(packing(site_names(200), cpus=16), [])) == sorted(site_names(200))


def test_a_simulation_hub_admits_every_agent_from_loopback_unless_told_otherwise():
    settings = simulation_hub_settings(200, environ={})
    assert int(settings["LAULIMA_HUB_MAX_CONNECTIONS_PER_ADDRESS"]) >= 2 * 200
    assert int(settings.get("LAULIMA_HUB_MAX_CONNECTIONS", 1024)) >= 2 * 200  # the default holds 200 sites
    assert int(simulation_hub_settings(1000, environ={})["LAULIMA_HUB_MAX_CONNECTIONS"]) >= 2 * 1000
    assert int(settings["LAULIMA_HUB_REQUEST_BURST"]) >= 200
    given = simulation_hub_settings(200, environ={"LAULIMA_HUB_MAX_CONNECTIONS_PER_ADDRESS": "9"})
    assert "LAULIMA_HUB_MAX_CONNECTIONS_PER_ADDRESS" not in given  # the caller's own setting stands
    assert simulation_hub_settings(3, environ={}) == {}  # a handful of sites: the hub's defaults


def test_without_ray_the_engine_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: `import ray` raises ImportError
    with pytest.raises(ConfigurationError, match=r"pip install 'laulima\[ray\]'"):
        import_ray()


# -- with Ray ---------------------------------------------------------------------------
@pytest.mark.slow
def test_an_agent_that_dies_in_an_actor_is_reported_with_its_site_and_log(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    started = time.monotonic()
    fed = LocalFederation(
        tmp_path / "fed", 3, "none", engine="ray", sites_per_actor=1, site_env={"LAULIMA_SITE_POLL_WAIT_S": "1"}
    )
    with fed:
        assert "3 Ray actors (1 site each) on a local Ray instance" in fed.agents.description
        assert all(site.alive for site in fed.sites.values())
        fed.check_agents()  # all well

        fed.operator.remove_site("site-b")  # the hub refuses it from its next poll: its agent ends
        message = _first_failure(fed, timeout=30)
        assert message.startswith("site agent site-b exited (Forbidden:"), message
        assert "site site-b: the agent ended" in message, message  # the tail of site-b's own agent.log
        assert fed.sites["site-a"].alive and fed.sites["site-c"].alive

        engine = fed.agents
        actor = engine.actor_of["site-c"]  # a whole actor dying takes its agents with it
        os.kill(engine.pids[actor], signal.SIGKILL)
        wait_for(lambda: not fed.sites["site-c"].alive, timeout=30, what="site-c's actor to be found dead")
        assert str(engine.state("site-c")).startswith("died with its Ray actor"), engine.state("site-c")
        assert fed.sites["site-a"].alive
    print(f"\n3-site Ray federation, failure found and closed in {time.monotonic() - started:.1f} s")


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_hundred_sites_as_ray_actors_all_contribute_to_the_tabular_example(tmp_path):
    pytest.importorskip("ray")
    spec = tomllib.loads((REPO / "examples" / "tiny.toml").read_text())
    spec.update(rounds=1, min_sites=100, round_timeout_s=600)  # every site's update is needed
    spec_file = tmp_path / "tiny100.toml"
    spec_file.write_text(_toml(spec))
    out = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "laulima.cli", "sim", str(spec_file), "--sites", "100", "--engine", "ray"]
        + ["--workdir", str(tmp_path / "w"), "--json", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=400,
        env={**env, "COLUMNS": "200"},
    )
    wall = time.monotonic() - started
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-6000:]
    assert "100 site agents in" in run.stdout and "Ray actor" in run.stdout, run.stdout[-3000:]
    assert "on a local Ray instance" in run.stdout, run.stdout[-3000:]
    assert "experiment completed after 1 rounds" in run.stdout, run.stdout[-3000:]

    result = json.loads(out.read_text())
    every = set(site_names(100))
    metrics = result["metrics"]
    trained = {m["site"] for m in metrics if m["kind"] == "train" and m["round"] == 1}
    evaluated = {m["site"] for m in metrics if m["kind"] == "evaluate" and m["round"] == 1}
    assert trained == every, sorted(every - trained)
    assert evaluated == every, sorted(every - evaluated)
    print(f"\n100-site Ray simulation: {wall:.1f} s wall (the run itself: {result['wall_time_s']:.1f} s)")
