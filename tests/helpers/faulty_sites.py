"""A site that stops halfway through secure aggregation: its real identity and the site's own
protocol driver (site/secure_aggregation.py), run by the test instead of an agent, so it can
drop out at an exact phase."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from laulima.core.protocol import TaskKind
from laulima.site.client import HubClient
from laulima.site.secure_aggregation import MaskedRound
from laulima.site.settings import SiteSettings


def client_of(home: Path) -> HubClient:
    """The site's own credentials (its agent must be stopped first)."""
    settings = SiteSettings.load(home)
    context = settings.ssl_context()
    return HubClient(
        settings.hub_url,
        None if settings.uses_certificate else settings.token,
        verify=context if context is not None else True,
        attempts=3,
    )


def drop_after_sharing(client: HubClient, name: str, *, rounds: int = 1, timeout: float = 90.0) -> threading.Thread:
    """In a thread: take this site's next ``rounds`` training tasks, advertise keys, send and
    receive the shares in each, then vanish before masking (what a crash after sharing looks like)."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for _ in range(rounds):
                deadline = time.monotonic() + timeout
                task = None
                while task is None or task.kind != TaskKind.TRAIN:
                    assert time.monotonic() < deadline, f"{name}: no training task arrived"
                    task = client.next_task(wait=2.0, attempts=3)
                assert task.secure_aggregation is not None
                MaskedRound(client, task, name, threading.Event()).exchange()
        except BaseException as exc:  # surfaced by the test through .errors
            errors.append(exc)

    thread = threading.Thread(target=run, name=f"faulty-{name}", daemon=True)
    thread.errors = errors  # type: ignore[attr-defined]
    thread.start()
    return thread
