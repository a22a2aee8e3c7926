"""The site's audit trail: append-only, hash-chained JSON lines in ``home/audit.jsonl``.

A hospital must be able to say afterwards what ran on its data, who allowed it and what
left the building. Each event (task received, policy decision, approval, bundle run, dataset
and cases touched, bytes sent with their sha256, failures with their FULL text) is one line;
:class:`AuditEvent` is the site's vocabulary and the conventional fields of each event.

The chain, its head file, locking, fsync, ``verify`` and ``reanchor`` are
:mod:`laulima.auditlog`'s, shared with the hub's own record (:mod:`laulima.hub.audit`);
this module names the site's events and keeps the names the agent and the site's
commands use (``AuditLog(home)``, ``format_entries``, ``format_verify``, ``reference``).
Read it with ``laulima site audit show``, check it with ``laulima site audit verify``.

The file stays at the site and may hold paths and error texts. What is sent to the hub is
only ``reference(entry)``, e.g. ``"audit#42"``.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from laulima.auditlog import (
    AUDIT_FILE,
    AUDIT_HEAD_FILE,
    GENESIS,
    AuditEntry,
    FieldValue,
    HashChainLog,
    VerifyResult,
    canonical_json,
    format_entries,
    format_verify,
    reference,
)

__all__ = [
    "AUDIT_FILE",
    "AUDIT_HEAD_FILE",
    "GENESIS",
    "VERIFY_COMMAND",
    "AuditEntry",
    "AuditEvent",
    "AuditLog",
    "FieldValue",
    "VerifyResult",
    "canonical_json",
    "format_entries",
    "format_verify",
    "reference",
]

VERIFY_COMMAND = "laulima site audit verify"


class AuditEvent(StrEnum):
    """What happened. Conventional ``fields`` per event are listed; any small scalars may be added."""

    RECEIVED = "received"
    """The hub handed the site a task: ``kind``, ``round``, ``dataset``, ``bundle``."""
    DECIDED = "decided"
    """The policy decided on its own: ``decision`` (run / hold / refuse), ``rule``, ``reason``."""
    APPROVED = "approved"
    """A person approved a held job (``laulima site approve``): ``by``, ``reason``, ``scope``
    (experiment / round), ``round``, ``job``, ``digest``, ``entry_point``, ``dataset``, ``requester``."""
    REJECTED = "rejected"
    """A person rejected a held job (``laulima site reject``): the same fields as ``approved``."""
    REFUSED = "refused"
    """The site refused a task before running it: ``reason`` (full text)."""
    STARTED = "started"
    """The algorithm started: ``bundle`` (digest), ``dataset``, ``cases``."""
    FINISHED = "finished"
    """The algorithm finished: ``n_samples``, ``seconds``."""
    SENT = "sent"
    """Something left the site: ``what`` (update / evaluation / failure), ``bytes``, ``sha256``."""
    FAILED = "failed"
    """The task failed: ``error`` (the FULL text, paths included), ``reason_sent`` (what the hub got)."""
    SANDBOX_VIOLATION = "sandbox_violation"
    """The sandbox stopped the algorithm: ``violation``, ``detail``."""
    PRIVACY_RESERVED = "privacy_reserved"
    """A training task with differential privacy reserved its experiment's privacy cost at a
    dataset (its first task there, or a task beyond the rounds reserved): ``dataset``,
    ``experiment_name``, ``round``, ``rounds``, ``reserved`` (releases paid for),
    ``new_releases``, ``noise_multiplier``, ``clip``, ``delta`` (the experiment's), ``epsilon``
    (the reservation's, at the budget's δ), ``spent`` (the dataset's after it), ``budget``
    (``max_epsilon``, null: none), ``budget_delta``."""
    PRIVACY_APPLIED = "privacy_applied"
    """The agent clipped (and noised, and quantised for secure aggregation) a training task's
    update before it could leave: ``privacy`` (mode, clip, noise multiplier and std, ε so far
    at δ), ``clipped``, ``update_norm`` (before clipping; it stays here), ``secure_aggregation``."""
    HEAD_RESET = "head_reset"
    """An admin re-anchored the log with ``reanchor``: ``old_head_seq``, ``old_head_hash``, ``reason``."""


class AuditLog(HashChainLog):
    """The site's audit trail under ``home``, taking :class:`AuditEvent` events."""

    def __init__(self, home: str | Path) -> None:
        super().__init__(home, events=AuditEvent, verify_command=VERIFY_COMMAND)
