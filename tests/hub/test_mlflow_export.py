"""The hub's MLflow mirror (hub/mlflow/) against a real hub and MLflow's local file store.

The hub runs in process with its lifespan (so the exporter's thread runs as in production);
the tests play the sites by hand, so every metric value and sample count is known.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from laulima.errors import ConfigurationError
from laulima.hub.db import MlflowExport, make_engine, make_session_factory
from laulima.hub.mlflow import exporter as mlflow_exporter
from laulima.hub.mlflow import flatten_spec
from laulima.hub.settings import HubSettings

from .conftest import Hub, hub_settings, make_weights, spec, update_bytes

pytest.importorskip("mlflow", reason="the 'mlflow' extra: pip install 'laulima[mlflow]'")
from mlflow.tracking import MlflowClient  # noqa: E402

SITES = ("site-a", "site-b")
SAMPLES = {"site-a": 10, "site-b": 30}
EVAL_SAMPLES = {"site-a": 7, "site-b": 21}


@pytest.fixture(autouse=True)
def _fast_export(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mlflow_exporter, "POLL_S", 0.05)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store behind this switch
    monkeypatch.delenv("LAULIMA_MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture()
def store_uri(tmp_path: Path) -> str:
    return (tmp_path / "mlruns").as_uri()


def train_metrics(site: str, rnd: int) -> dict[str, float]:
    base = 1.0 if site == "site-a" else 2.0
    return {"loss": base / rnd, "top@1": 0.25 * rnd + (0.1 if site == "site-b" else 0.0)}


def eval_metrics(site: str, rnd: int) -> dict[str, float]:
    return {"dice": 0.5 + rnd / 10 + (0.05 if site == "site-a" else 0.0)}


def play_round(hub: Hub, rnd: int, *, evaluate: bool = True) -> None:
    for site in SITES:
        task = hub.next_task(site)
        assert task and task.kind == "train" and task.round == rnd
        body = update_bytes(make_weights(rnd), n_samples=SAMPLES[site], metrics=train_metrics(site, rnd))
        assert hub.upload(site, task, body).status_code == 200
    if not evaluate:
        return
    for site in SITES:
        ev = hub.next_task(site)
        assert ev and ev.kind == "evaluate" and ev.round == rnd
        r = hub.client.post(
            hub.url(f"/tasks/{ev.id}/evaluation"),
            json={"n_samples": EVAL_SAMPLES[site], "metrics": eval_metrics(site, rnd)},
            headers=hub.site(site),
        )
        assert r.status_code == 204, r.text


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def runs_of(client: MlflowClient, name: str) -> list[Any]:
    experiment = client.get_experiment_by_name(f"laulima/{name}")
    return list(client.search_runs([experiment.experiment_id])) if experiment else []


def wait_run_status(client: MlflowClient, name: str, status: str) -> Any:
    def ended() -> Any:
        runs = runs_of(client, name)
        return runs[0] if runs and runs[0].info.status == status else None

    return wait_for(ended, f"the MLflow run of {name} to become {status}")


def expected_history(records: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """What the hub's metric records say each MLflow metric must hold, computed here by hand:
    ``<site>/<kind>/<metric>`` per site, ``<kind>/<metric>`` the sample-weighted mean, step = round."""
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    sums: dict[tuple[str, int, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for rec in records:
        assert rec["model"] is None
        for name, value in rec["metrics"].items():
            clean = name.replace("@", "_")
            out[f"{rec['site']}/{rec['kind']}/{clean}"].append((rec["round"], value))
            acc = sums[(rec["kind"], rec["round"], clean)]
            acc[0] += value * rec["n_samples"]
            acc[1] += rec["n_samples"]
    for (kind, rnd, name), (total, n) in sums.items():
        out[f"{kind}/{name}"].append((rnd, total / n))
    return {k: sorted(v) for k, v in out.items()}


def assert_mirrors(client: MlflowClient, run: Any, hub: Hub, experiment_id: int) -> None:
    """Every metric of the run, point by point, is what the hub recorded; nothing more."""
    records = hub.get(f"/experiments/{experiment_id}/metrics")
    expected = expected_history(records)
    assert set(run.data.metrics) == set(expected)
    for key, points in expected.items():
        history = client.get_metric_history(run.info.run_id, key)
        got = sorted((m.step, m.value) for m in history)
        assert [s for s, _ in got] == [s for s, _ in points], key  # one point per round: no duplicates
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-12), key


def test_params_tags_and_every_round_metric_reach_mlflow_and_the_run_ends_finished(
    make_hub: Callable[..., Hub], store_uri: str
) -> None:
    hub = make_hub(mlflow_tracking_uri=store_uri)
    hub.register(*SITES)
    exp = hub.submit(
        spec(name="mirror", rounds=2, evaluation={"every": 1, "final": True}, config={"lr": 0.1, "layers": [2, 3]}),
        make_weights(0),
    )
    for rnd in (1, 2):
        play_round(hub, rnd)
    hub.wait_status(exp["id"], "completed")

    client = MlflowClient(tracking_uri=store_uri)
    run = wait_run_status(client, "mirror", "FINISHED")
    assert len(runs_of(client, "mirror")) == 1
    stored = hub.experiment(exp["id"])

    params = run.data.params
    assert params["name"] == "mirror"
    assert params["rounds"] == "2"
    assert params["strategy.name"] == "fedavg"
    assert params["config.lr"] == "0.1"
    assert params["config.layers"] == "[2, 3]"
    assert params["sites"] == '["site-a", "site-b"]'
    assert params["evaluation.final"] == "True"
    assert params["round_timeout_s"] == "60.0"
    assert params == dict(flatten_spec(stored["spec"]))  # every field, nothing else

    tags = run.data.tags
    assert tags["laulima.experiment_id"] == str(exp["id"])
    assert tags["laulima.owner"] == "admin"
    assert tags["laulima.mode"] == "train"
    assert tags["laulima.algorithm_digest"] == stored["algorithm_digest"] != ""
    assert tags["laulima.hub"] == hub.client.app.state.hub.settings.url
    assert tags["laulima.status"] == "completed"
    assert tags["mlflow.runName"] == f"mirror #{exp['id']}"

    assert_mirrors(client, run, hub, exp["id"])
    # the weighted mean really is weighted (10 and 30 samples), not a plain mean
    assert client.get_metric_history(run.info.run_id, "train/loss")[0].value == pytest.approx((10 * 1 + 30 * 2) / 40)
    assert run.info.start_time == int(round(stored["created_at"] * 1000))
    assert run.info.end_time == int(round(stored["finished_at"] * 1000))


def test_a_restarted_hub_duplicates_no_run_and_no_point_even_after_losing_its_cursor(
    make_hub: Callable[..., Hub], store_uri: str
) -> None:
    first = make_hub(mlflow_tracking_uri=store_uri)
    first.register(*SITES)
    exp = first.submit(spec(name="restart", rounds=2, evaluation={"every": 1, "final": False}), make_weights(0))
    play_round(first, 1)
    client = MlflowClient(tracking_uri=store_uri)

    def round_one_logged() -> bool:
        runs = runs_of(client, "restart")
        return bool(runs) and len(client.get_metric_history(runs[0].info.run_id, "evaluate/dice")) == 1

    wait_for(round_one_logged, "round 1 in MLflow")
    first.stop()
    # As if the hub had died after each MLflow request and before committing its cursor:
    # the run, its parameters and round 1 are in MLflow, the database knows nothing of them.
    engine = make_engine(hub_settings(first.home).database_url or "")  # the backend the test runs on
    with make_session_factory(engine).begin() as s:
        changed = s.execute(
            update(MlflowExport).values(run_id=None, params_done=False, rounds_done=0, finished=False)
        ).rowcount
    engine.dispose()
    assert changed == 1

    second = make_hub(mlflow_tracking_uri=store_uri)
    second.tokens = dict(first.tokens)
    play_round(second, 2)
    second.wait_status(exp["id"], "completed")
    run = wait_run_status(client, "restart", "FINISHED")
    assert len(runs_of(client, "restart")) == 1
    assert_mirrors(client, run, second, exp["id"])
    assert len(client.get_metric_history(run.info.run_id, "site-a/train/loss")) == 2

    # A second exporter over the same database, once everything is exported, logs nothing.
    second.stop()
    third = make_hub(mlflow_tracking_uri=store_uri)
    time.sleep(0.5)  # ten passes of its exporter
    third.stop()
    assert len(runs_of(client, "restart")) == 1
    assert_mirrors(client, client.get_run(run.info.run_id), second, exp["id"])


def test_a_cancelled_experiment_ends_its_run_killed(make_hub: Callable[..., Hub], store_uri: str) -> None:
    hub = make_hub(mlflow_tracking_uri=store_uri)
    hub.register(*SITES)
    exp = hub.submit(spec(name="stopped", rounds=3), make_weights(0))
    play_round(hub, 1, evaluate=False)
    hub.wait_for(lambda: hub.experiment(exp["id"])["rounds_done"] == 1, "round 1")
    r = hub.client.post(hub.url(f"/experiments/{exp['id']}/cancel"), headers=hub.admin)
    assert r.status_code == 200, r.text
    client = MlflowClient(tracking_uri=store_uri)
    run = wait_run_status(client, "stopped", "KILLED")
    assert run.data.tags["laulima.status"] == "cancelled"
    assert run.data.tags["laulima.error"] == "cancelled by request"
    assert_mirrors(client, run, hub, exp["id"])


class _LosesOneAnswer:
    """The real client, but the first metrics ``log_batch`` fails after MLflow stored it (the
    answer lost on the way back), and the next three requests, whatever they are, find the
    server down: one outage."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.faults = ["lost", "down", "down", "down"]

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.real, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.faults and (self.faults[0] == "down" or (name == "log_batch" and kwargs.get("metrics"))):
                fault = self.faults.pop(0)
                if fault == "lost":
                    attr(*args, **kwargs)
                raise ConnectionError(f"connection reset ({fault})")
            return attr(*args, **kwargs)

        return call


def test_a_failed_request_is_retried_without_duplicates_and_warned_once(
    make_hub: Callable[..., Hub], store_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="laulima.hub.mlflow.exporter")
    hub = make_hub(mlflow_tracking_uri=store_uri)
    exporter = hub.client.app.state.mlflow_export
    flaky = _LosesOneAnswer(exporter._client)
    exporter._client = flaky
    hub.register(*SITES)
    exp = hub.submit(spec(name="flaky", rounds=2, evaluation={"every": 0, "final": False}), make_weights(0))
    for rnd in (1, 2):
        play_round(hub, rnd, evaluate=False)
    hub.wait_status(exp["id"], "completed")
    client = MlflowClient(tracking_uri=store_uri)
    run = wait_run_status(client, "flaky", "FINISHED")
    assert flaky.faults == []
    assert_mirrors(client, run, hub, exp["id"])
    messages = [r.getMessage() for r in caplog.records if r.name == "laulima.hub.mlflow.exporter"]
    assert sum("paused" in m for m in messages) == 1, messages
    assert sum("answers again" in m for m in messages) == 1, messages


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_unreachable_tracking_server_never_stops_the_experiment(
    make_hub: Callable[..., Hub], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="laulima.hub.mlflow.exporter")
    hub = make_hub(mlflow_tracking_uri=f"http://alice:s3cret-pw@127.0.0.1:{_closed_port()}")
    hub.register(*SITES)
    exp = hub.submit(spec(name="offline", rounds=2), make_weights(0))
    started = time.monotonic()
    for rnd in (1, 2):
        play_round(hub, rnd, evaluate=False)
    hub.wait_status(exp["id"], "completed")
    assert time.monotonic() - started < 10
    exporter = hub.client.app.state.mlflow_export
    wait_for(lambda: exporter._backoff >= 0.4, "a few attempts with back-off")
    hub.stop()
    ours = [r for r in caplog.records if r.name == "laulima.hub.mlflow.exporter"]
    warnings = [r.getMessage() for r in ours if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "paused" in warnings[0] and "127.0.0.1" in warnings[0], warnings
    assert len([r for r in ours if "still unreachable" in r.getMessage()]) >= 2
    assert not any("s3cret-pw" in r.getMessage() for r in caplog.records)


def test_the_setting_is_read_from_its_own_variable_and_garbage_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store_uri: str
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")  # MLflow's own variable: not the hub's
    assert HubSettings(home=tmp_path).mlflow_tracking_uri is None
    monkeypatch.setenv("LAULIMA_MLFLOW_TRACKING_URI", store_uri)
    settings = HubSettings(home=tmp_path)
    assert settings.mlflow_tracking_uri == store_uri
    assert "mlruns" not in repr(settings)
    assert HubSettings(home=tmp_path, mlflow_tracking_uri="http://mlflow:5000").mlflow_tracking_uri == (
        "http://mlflow:5000"
    )
    monkeypatch.setenv("LAULIMA_MLFLOW_TRACKING_URI", "")
    assert HubSettings(home=tmp_path).mlflow_tracking_uri is None
    for garbage in ("yes", "mlruns", "http://", "http://bob:hunter22@host:99999", "file://otherhost/x"):
        monkeypatch.setenv("LAULIMA_MLFLOW_TRACKING_URI", garbage)
        with pytest.raises(ConfigurationError, match="LAULIMA_MLFLOW_TRACKING_URI") as refused:
            HubSettings(home=tmp_path)
        assert "hunter22" not in str(refused.value)


def test_the_hub_refuses_to_start_when_mlflow_cannot_serve_the_uri(
    make_hub: Callable[..., Hub], monkeypatch: pytest.MonkeyPatch, store_uri: str
) -> None:
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    with pytest.raises(ConfigurationError, match="LAULIMA_MLFLOW_TRACKING_URI.*MLFLOW_ALLOW_FILE_STORE"):
        make_hub(mlflow_tracking_uri=store_uri)
    for module in ("mlflow", "mlflow.entities", "mlflow.tracking"):
        monkeypatch.setitem(sys.modules, module, None)  # as if the extra were not installed
    with pytest.raises(ConfigurationError, match=r"pip install 'laulima\[mlflow\]'"):
        make_hub(mlflow_tracking_uri=store_uri)


def test_without_the_setting_the_hub_never_imports_mlflow(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from fastapi.testclient import TestClient\n"
        "from laulima.hub.app import create_app\n"
        "from laulima.hub.settings import HubSettings\n"
        f"with TestClient(create_app(HubSettings(home={str(tmp_path / 'hub')!r}))) as c:\n"
        "    assert c.app.state.mlflow_export is None\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'mlflow'], 'mlflow imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if "MLFLOW" not in k}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
