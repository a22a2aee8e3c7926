"""A site that stops halfway through secure aggregation: a real identity and the real protocol,
driven by the test instead of an agent, so it can drop out at an exact phase."""

from __future__ import annotations

import base64
import threading
import time
from pathlib import Path

from laulima.core.privacy.messages import Advertisement, Roster, ShareOutbox
from laulima.core.privacy.secagg import Advertised, RoundContext, SecAggClient
from laulima.core.protocol import TaskKind
from laulima.site.client import HubClient
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
    """In a thread: take this site's next ``rounds`` training tasks, advertise keys and send the
    shares in each, then vanish before masking (what a crash after sharing looks like)."""
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
                base = f"/tasks/{task.id}/secagg"
                secagg = SecAggClient(
                    name,
                    RoundContext(
                        experiment=task.experiment_id,
                        round=task.round,
                        threshold=task.secure_aggregation.threshold,
                        neighbours=task.secure_aggregation.neighbours,
                    ),
                )
                ad = secagg.advertise()
                body = Advertisement(encryption_key=_b64(ad.encryption_key), masking_key=_b64(ad.masking_key))
                client.call("POST", f"{base}/keys", what="keys", json=body.model_dump())
                roster = None
                while roster is None:
                    response = client.call("GET", f"{base}/roster", what="roster", params={"wait": "5"})
                    if response.status_code == 200:
                        roster = Roster.model_validate_json(response.content)
                outbox = secagg.share(
                    [
                        Advertised(
                            site=site,
                            encryption_key=base64.b64decode(a.encryption_key),
                            masking_key=base64.b64decode(a.masking_key),
                        )
                        for site, a in roster.sites.items()
                    ]
                )
                shares = ShareOutbox(ciphertexts={site: _b64(c) for site, c in outbox.items()})
                client.call("POST", f"{base}/shares", what="shares", json=shares.model_dump())
        except BaseException as exc:  # surfaced by the test through .errors
            errors.append(exc)

    thread = threading.Thread(target=run, name=f"faulty-{name}", daemon=True)
    thread.errors = errors  # type: ignore[attr-defined]
    thread.start()
    return thread


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
