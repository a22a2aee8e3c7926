"""The scientist's client: it reads records that older hubs wrote without failing on them,
and submits an algorithm's bundle before the spec that names it."""

from __future__ import annotations

import hashlib
import json

import httpx
import pytest
from rich.console import Console

from laulima.client import Client
from laulima.core.protocol import API_PREFIX
from laulima.errors import ConfigurationError
from laulima.terminal import metrics_table

OLD_RECORDS = [
    # A hub from before metrics were checked stored NaN and served it as null.
    {"round": 1, "site": "site-a", "kind": "evaluate", "n_samples": 3, "metrics": {"dice": None, "loss": 0.25}},
    {"round": 1, "site": "site-b", "kind": "evaluate", "n_samples": 5, "metrics": {"dice": 0.5, "loss": 0.5}},
]


def old_hub(request: httpx.Request) -> httpx.Response:
    assert request.url.path == f"{API_PREFIX}/experiments/1/metrics"
    return httpx.Response(200, json=OLD_RECORDS)


def test_null_metric_values_are_skipped_and_status_renders() -> None:
    with Client("http://hub.test", "t", client=httpx.Client(transport=httpx.MockTransport(old_hub))) as client:
        records = client.metrics(1)
    assert [r.metrics for r in records] == [{"loss": 0.25}, {"dice": 0.5, "loss": 0.5}]
    console = Console(record=True, width=120)
    console.print(metrics_table(records))
    assert "site-a" in console.export_text()


class RecordingHub:
    """Answers blob uploads and submissions, and remembers what came in which order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == f"{API_PREFIX}/blobs":
            digest = hashlib.sha256(request.content).hexdigest()
            self.calls.append(("blob", request.content))
            return httpx.Response(201, json={"digest": digest, "size": len(request.content)})
        body = json.loads(request.content)
        self.calls.append(("experiment", body))
        return httpx.Response(201, json=experiment_json(body["spec"], body["initial_weights"]))


def experiment_json(spec: dict[str, object], initial_weights: str) -> dict[str, object]:
    """An ExperimentPublic as a hub older than bundles sends it."""
    return {
        "id": 1,
        "name": "x",
        "status": "running",
        "rounds_done": 0,
        "rounds": 1,
        "created_at": 1.0,
        "finished_at": None,
        "global_digest": initial_weights,
        "error": None,
        "spec": spec,
        "owner": "me",
    }


def test_submit_uploads_the_bundle_first_and_names_it_in_the_spec() -> None:
    hub = RecordingHub()
    spec = {"name": "x", "algorithm": "mymodel:Algo", "dataset": "d", "rounds": 1}
    client = Client("http://hub.test", "t", client=httpx.Client(transport=httpx.MockTransport(hub)))
    exp = client.submit(spec, b"weights", bundle=b"bundle bytes")
    digest = hashlib.sha256(b"bundle bytes").hexdigest()
    assert [kind for kind, _ in hub.calls] == ["blob", "blob", "experiment"]
    assert hub.calls[0] == ("blob", b"bundle bytes") and hub.calls[1] == ("blob", b"weights")
    assert exp.spec["bundle"] == digest and "bundle" not in spec
    assert exp.algorithm_digest == "" and exp.site_notes == {}  # an older hub sends neither


def test_submit_refuses_a_bundle_other_than_the_one_the_spec_names_before_sending_anything() -> None:
    hub = RecordingHub()
    spec = {"name": "x", "algorithm": "mymodel:Algo", "dataset": "d", "rounds": 1, "bundle": "ab" * 32}
    client = Client("http://hub.test", "t", client=httpx.Client(transport=httpx.MockTransport(hub)))
    with pytest.raises(ConfigurationError, match=r"field 'bundle': the spec names bundle abababababab"):
        client.submit(spec, b"weights", bundle=b"other bytes")
    assert hub.calls == []


def test_experiment_status_prints_what_each_site_is_doing(monkeypatch: pytest.MonkeyPatch) -> None:
    from laulima import cli
    from laulima.core.protocol import ExperimentPublic

    exp = ExperimentPublic.model_validate(
        {
            **experiment_json({"name": "x", "algorithm": "mymodel:Algo"}, "ab" * 32),
            "algorithm_digest": "cd" * 32,
            "site_notes": {"site-b": "waiting for approval at the site: [red]held[/]", "site-c": "refused: no"},
        }
    )
    monkeypatch.setattr(Client, "experiment", lambda self, _id: exp)
    for name in ("rounds", "metrics", "refusals"):
        monkeypatch.setattr(Client, name, lambda self, _id: [])
    console = Console(record=True, width=200)
    monkeypatch.setattr(cli, "console", console)
    cli.experiment_status(1, "http://hub.test", "t")
    text = console.export_text()
    assert "site-b: waiting for approval at the site: [red]held[/]" in text  # the site's words, not markup
    assert "site-c: refused: no" in text
    assert "mymodel:Algo (cdcdcdcdcdcd)" in text
