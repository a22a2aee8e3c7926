"""A site's side of secure aggregation over the hub's phase routes (hub/secure_rounds.py).

As soon as a training task is admitted, :meth:`MaskedRound.prepare` runs beside the training
(in a thread): the site advertises fresh keys, waits for the roster, sends each member of its
neighbourhood in the round's graph (every roster member with the complete graph) its encrypted
shares and waits for the shares addressed to it — Bonawitz et al.'s order, and the round's key
exchange costs no time on top of training. Once the update is trained and
privatised (site/update_privacy.py), :meth:`MaskedRound.finish` masks the quantised update,
uploads it as the task's result and — once the hub names the survivors — answers with the
shares that remove the masks. Keys live only in this process's memory for this round: an agent
that restarts midway has dropped out, which the protocol tolerates up to the round's threshold.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx
import numpy as np
from pydantic import BaseModel, ValidationError
from safetensors import safe_open

from laulima.core.privacy.messages import (
    MASKED_TENSOR,
    Advertisement,
    Roster,
    SecAggPhase,
    ShareInbox,
    ShareOutbox,
    Unmasking,
    UnmaskingAnswer,
)
from laulima.core.privacy.secagg import Advertised, RoundContext, SecAggClient
from laulima.core.protocol import TaskPublic, UploadAccepted
from laulima.errors import Conflict, ProtocolError, TransportError
from laulima.site.client import HubClient
from laulima.site.update_privacy import QUANTIZED_TENSOR
from laulima.site.worker import write_safetensors

__all__ = ["MaskedRound"]

log = logging.getLogger(__name__)

_POLL_S = 30.0

M = TypeVar("M", bound=BaseModel)


class MaskedRound:
    """One TRAIN task's secure aggregation, from keys to the unmasking answer."""

    def __init__(self, client: HubClient, task: TaskPublic, site: str, stop: threading.Event) -> None:
        config = task.secure_aggregation
        if config is None:
            raise ValueError(f"task {task.id} carries no secure aggregation")
        self.client, self.task, self.site, self.stop = client, task, site, stop
        self.config = config
        self.base = f"/tasks/{task.id}/secagg"
        self.secagg = SecAggClient(
            site,
            RoundContext(
                experiment=task.experiment_id,
                round=task.round,
                threshold=config.threshold,
                neighbours=config.neighbours,
            ),
        )
        self._thread: threading.Thread | None = None
        self._failure: Exception | None = None
        self._cancelled = threading.Event()

    def prepare(self) -> None:
        """Start the key and share exchange in a thread (it runs while the site trains)."""
        self._thread = threading.Thread(target=self._exchange_keeping_failure, name=f"secagg-{self.task.id[:8]}")
        self._thread.daemon = True
        self._thread.start()

    def cancel(self) -> None:
        """The task failed: stop taking part (the hub counts this site as dropped)."""
        self._cancelled.set()

    def finish(self, quantized: Path, masked: Path, upload: Callable[[Path, str], UploadAccepted]) -> UploadAccepted:
        """Mask ``quantized`` into ``masked``, upload it with ``upload``, answer the unmasking."""
        if self._thread is None:
            self._exchange_keeping_failure()
        else:
            self._thread.join()
        if self._failure is not None:
            raise self._failure
        with safe_open(str(quantized), framework="numpy") as f:
            metadata = dict(f.metadata() or {})
            vector = f.get_tensor(QUANTIZED_TENSOR).view(np.uint32)  # int32 on disk, the same bits
        masked_vector = self.secagg.mask(vector).view(np.int32)
        del vector
        digest, _ = write_safetensors(masked, {MASKED_TENSOR: masked_vector}, metadata)
        del masked_vector
        accepted = upload(masked, digest)
        try:
            request = self._wait("unmasking", Unmasking)
            answer = self.secagg.reveal(request.survivors, request.dropped)
            self._post(
                "unmasking",
                UnmaskingAnswer(
                    self_mask={name: _b64(v) for name, v in answer["self_mask"].items()},
                    masking_key={name: _b64(v) for name, v in answer["masking_key"].items()},
                ),
            )
        except (Conflict, TransportError) as exc:  # the update is in; the round decides without us
            log.warning("task %s: secure aggregation ended before this site's unmasking answer: %s", self.task.id, exc)
        return accepted

    def exchange(self) -> None:
        """Keys, roster, shares, inbox, in this thread: everything before masking."""
        ad = self.secagg.advertise()
        body = Advertisement(encryption_key=_b64(ad.encryption_key), masking_key=_b64(ad.masking_key))
        self._post("keys", body)
        roster = self._wait("roster", Roster)
        advertised = [
            Advertised(site=name, encryption_key=_unb64(a.encryption_key), masking_key=_unb64(a.masking_key))
            for name, a in roster.sites.items()
        ]
        outbox = self.secagg.share(advertised)
        self._post("shares", ShareOutbox(ciphertexts={name: _b64(c) for name, c in outbox.items()}))
        inbox = self._wait("shares", ShareInbox)
        self.secagg.receive({name: _unb64(c) for name, c in inbox.ciphertexts.items()})

    def _exchange_keeping_failure(self) -> None:
        """:meth:`exchange`, its failure kept for :meth:`finish` to raise."""
        try:
            self.exchange()
        except Exception as exc:
            self._failure = exc

    def _post(self, phase: str, body: BaseModel) -> None:
        what = f"secure aggregation ({phase}) of task {self.task.id}"
        self.client.call("POST", f"{self.base}/{phase}", what=what, json=body.model_dump(mode="json"))

    def _wait(self, phase: str, model: type[M]) -> M:
        """Long-poll the phase until the hub answers with its result; give up after the phase's
        time limit twice over (the hub decides sooner; this only bounds a hub gone silent)."""
        what = f"secure aggregation ({phase}) of task {self.task.id}"
        give_up = time.monotonic() + max(self.task.seconds_left, self.task.time_limit_s, 0.0)
        give_up += 4 * self.config.phase_timeout_s
        while not (self.stop.is_set() or self._cancelled.is_set()):
            left = give_up - time.monotonic()
            if left <= 0:
                break
            response: httpx.Response = self.client.call(
                "GET",
                f"{self.base}/{phase}",
                what=what,
                params={"wait": f"{min(_POLL_S, left):g}"},
                timeout=min(_POLL_S, left) + 10.0,
            )
            try:
                if response.status_code == 202:
                    SecAggPhase.model_validate_json(response.content)
                    continue
                return model.model_validate_json(response.content)
            except ValidationError as exc:
                raise ProtocolError(f"{what}: the hub's answer cannot be read ({exc.errors()[0]['msg']})") from exc
        raise TransportError(f"{what}: no answer from the hub in time; this site drops out of the round")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)
