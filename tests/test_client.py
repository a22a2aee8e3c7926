"""The scientist's client reads records that older hubs wrote, without failing on them."""

from __future__ import annotations

import httpx
from rich.console import Console

from laulima.client import Client
from laulima.core.protocol import API_PREFIX
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
