"""The hub's own audit trail: who submitted, cancelled, shared and downloaded what.

A site's audit (``laulima.site.audit``) says what ran on its data. The federation needs the
other half: which person submitted the experiment whose code ran there, who was let read
its models and who took them away, which operator registered or removed a site or issued a
token. That record is ``<audit_dir>/audit.jsonl`` (``audit_dir`` defaults to the hub's
home), the same append-only, hash-chained, fsynced JSON lines as the site's
(:mod:`laulima.auditlog`) with the hub's own vocabulary, :class:`HubAuditEvent`.

Every entry names the actor (``actor``: the person's token name, ``admin`` for the bootstrap
operator token, or the site's name; ``role``: operator, scientist or site), the experiment
when there is one, and digests and sizes. Never a secret: a new token's value, a spec's
``config`` or a blob's bytes are not recorded. Operators read it with ``GET /api/v1/audit``
and check it on the hub machine with ``laulima hub-audit verify --home HOME``.

What happens when the record cannot be written (disk full, the log's end no longer matching
its head after a bad restore) depends on what the action does:

* **Actions that grant** — submitting an experiment (its code goes to hospitals), sharing
  one, uploading a blob, a person downloading a model or blob (data derived from patients
  leaves the hub), registering a site, creating a token — are *refused* with 503 before
  anything is done (:meth:`HubAudit.require`): an action the federation cannot account for
  afterwards should not happen, and refusing first means nothing is half done.
* **Actions that take away** — cancelling an experiment, unsharing, revoking a token,
  removing a site — always proceed: refusing them because the disk is full would keep a
  risk alive that someone is trying to end. So do a site's downloads of its own tasks'
  weights: the federation's own traffic, which each site's audit also records.

Either way a record that could not be written is logged at CRITICAL level in the hub's log
with the whole entry (nothing is lost silently), and :attr:`HubAudit.lost` counts them. The
check before a granting action and the append after it are not one atomic step: if the
disk fills between the two, the action stands and the entry goes to the hub's log only —
answering 503 for an action that did happen would invite a retry that does it twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request

from laulima.auditlog import AuditEntry, HashChainLog, VerifyResult, canonical_json
from laulima.errors import DataError, ProtocolError
from laulima.hub.api.deps import Caller

__all__ = [
    "VERIFY_COMMAND",
    "AuditUnavailable",
    "HubAudit",
    "HubAuditDep",
    "HubAuditEvent",
    "HubAuditLog",
    "get_audit",
    "spec_facts",
]

log = logging.getLogger(__name__)

VERIFY_COMMAND = "laulima hub-audit verify --home HOME"
_MAX_LIST = 64


class HubAuditEvent(StrEnum):
    """What a person, a site or an operator did at the hub. Every entry has ``actor`` and ``role``."""

    SUBMITTED = "submitted"
    """An experiment was submitted: ``name``, ``algorithm``, ``bundle`` (digest or null),
    ``signatures`` (how many), ``dataset``, ``rounds``, ``sites``, ``initial_weights`` (digest),
    ``spec_sha256``."""
    CANCELLED = "cancelled"
    """An experiment was cancelled: ``name``, ``owner``."""
    SHARED = "shared"
    """An experiment was shared: ``with_person``, ``owner``."""
    UNSHARED = "unshared"
    """An experiment stopped being shared: ``with_person``, ``owner``."""
    UPLOADED = "uploaded"
    """A person uploaded a blob (weights or a bundle): ``digest``, ``bytes``."""
    DOWNLOADED = "downloaded"
    """A blob was handed out (recorded as its stream starts): ``what`` (model / blob), ``digest``,
    ``bytes``; ``round`` for a model."""
    SITE_REGISTERED = "site_registered"
    """An operator registered a site: ``site`` (a site token, if issued, is not recorded)."""
    SITE_REMOVED = "site_removed"
    """An operator removed a site: ``site``."""
    TOKEN_CREATED = "token_created"
    """An operator created an API token: ``token_id``, ``name``, ``token_role`` (never the token)."""
    TOKEN_REVOKED = "token_revoked"
    """An operator revoked an API token: ``token_id``, ``name``."""
    HEAD_RESET = "head_reset"
    """An operator re-anchored the log (``laulima hub-audit reanchor``): ``old_head_seq``, ``reason``."""


class HubAuditLog(HashChainLog):
    """The hub's audit trail under ``audit_dir``, taking :class:`HubAuditEvent` events."""

    def __init__(self, audit_dir: str | Path) -> None:
        super().__init__(audit_dir, events=HubAuditEvent, verify_command=VERIFY_COMMAND)


class AuditUnavailable(ProtocolError):
    """503: the action was refused because the hub could not have recorded it."""

    status = 503
    code = "audit_unavailable"


class HubAudit:
    """The hub's audit trail as the routes use it: a check before granting actions, a record after."""

    def __init__(self, audit_dir: str | Path) -> None:
        self.log = HubAuditLog(audit_dir)
        self.lost = 0
        """Entries that could not be written since the hub started (each is in the hub's log)."""
        self._lost_lock = threading.Lock()

    @property
    def path(self) -> Path:
        return self.log.path

    def check_at_start(self) -> None:
        """Say loudly at start when the record cannot be written; granting actions will be refused."""
        try:
            self.log.check_writable()
        except (DataError, OSError) as exc:
            log.error(
                "the hub's audit record cannot be written (%s): submissions, shares, uploads, person downloads, "
                "site registrations and new tokens will be refused with 503 until this is fixed; run `%s`",
                exc,
                VERIFY_COMMAND,
            )

    def require(self, action: str) -> None:
        """Refuse (503) ``action`` now unless it can be recorded; nothing has been done yet.

        The answer does not name the hub's files (the caller may be a scientist); the hub's
        log does, for the operator.
        """
        try:
            self.log.check_writable()
        except (DataError, OSError) as exc:
            log.error("refused to %s: the audit record %s cannot be written: %s", action, self.path, exc)
            raise AuditUnavailable(
                f"the hub cannot {action} now: its audit record cannot be written, and it does not act without "
                "recording who did what; nothing was done. Try again later; the operator finds why in the hub's "
                f"log and checks the record with `{VERIFY_COMMAND}`",
                retry_after=60,
            ) from exc

    def record(
        self, event: HubAuditEvent, caller: Caller, *, experiment: int | None = None, **fields: Any
    ) -> AuditEntry | None:
        """Append one entry for ``caller``; on failure log the entry at CRITICAL and return None.

        Never raises: the action it records has already happened, and its answer must say so.
        Lists longer than the log takes are cut, with their full length in ``n_<field>``.
        """
        clean: dict[str, Any] = {"actor": caller.name, "role": caller.role.value}
        for key, value in fields.items():
            if isinstance(value, list | tuple) and len(value) > _MAX_LIST:
                clean[f"n_{key}"] = len(value)
                value = list(value[:_MAX_LIST])
            clean[key] = value
        try:
            return self.log.append(event, experiment=experiment, **clean)
        except (DataError, OSError) as exc:
            with self._lost_lock:
                self.lost += 1
            entry = json.dumps(
                {"event": str(event), "experiment": experiment, "fields": clean}, default=str, sort_keys=True
            )
            log.critical("AUDIT RECORD NOT WRITTEN to %s (%s); the entry was: %s", self.path, exc, entry)
            return None

    def entries(self, *, experiment: int | None = None, limit: int | None = None) -> list[AuditEntry]:
        """The last ``limit`` entries (of ``experiment``, if given), oldest first."""
        found = self.log.entries(experiment=experiment)
        return found[-limit:] if limit is not None else found

    def verify(self) -> VerifyResult:
        return self.log.verify()


def spec_facts(spec: Mapping[str, Any]) -> dict[str, Any]:
    """What a submission's record says about its spec: what runs where, never its ``config``.

    ``spec_sha256`` (of the spec's canonical JSON) pins everything else, so the full spec
    kept with the experiment can be matched to the record later.
    """
    bundle = spec.get("bundle")
    sites = spec.get("sites")
    signatures = spec.get("signatures")
    try:
        spec_sha256: str | None = hashlib.sha256(canonical_json(dict(spec))).hexdigest()
    except (TypeError, ValueError):  # cannot happen for a parsed spec; the record must not fail for it
        spec_sha256 = None
    return {
        "name": spec.get("name"),
        "algorithm": spec.get("algorithm"),
        "bundle": bundle if isinstance(bundle, str) else None,
        "signatures": len(signatures) if isinstance(signatures, list) else 0,
        "dataset": spec.get("dataset"),
        "rounds": spec.get("rounds"),
        "sites": [str(site) for site in sites] if isinstance(sites, list) else [],
        "spec_sha256": spec_sha256,
    }


def get_audit(request: Request) -> HubAudit:
    """The running hub's audit trail (created by the app's lifespan)."""
    return request.app.state.audit  # type: ignore[no-any-return]


HubAuditDep = Annotated[HubAudit, Depends(get_audit)]
