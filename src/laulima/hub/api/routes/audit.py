"""The hub's audit record, for operators: read it and check its chain over the API.

The record itself is :mod:`laulima.hub.audit`. It names people and what they did, so only
operators read it (a scientist gets 403). On the hub machine, ``laulima hub-audit show`` and
``verify`` read the same file without a running hub.
"""

from __future__ import annotations

from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Query
from pydantic import BaseModel

from laulima.auditlog import AuditEntry
from laulima.hub.api.deps import Operator
from laulima.hub.audit import HubAuditDep

__all__ = ["AuditRecord", "AuditVerification", "router"]

router = APIRouter(prefix="/audit", tags=["audit"])


class AuditRecord(BaseModel):
    """One entry as written: ``hash`` chains it to ``prev``, the hash of the entry before."""

    seq: int
    at: float
    event: str
    task: str | None
    experiment: int | None
    fields: dict[str, Any]
    """``actor`` and ``role`` always; digests, sizes and names per event (never secrets)."""
    prev: str
    hash: str

    @classmethod
    def of(cls, entry: AuditEntry) -> AuditRecord:
        return cls.model_validate(entry.as_json())


class AuditVerification(BaseModel):
    """What checking the whole chain and its head found."""

    ok: bool
    entries: int
    """Entries found good from the top (all of them when ``ok``)."""
    line: int | None
    """The first bad line, when the problem is one line."""
    problem: str | None
    last_seq: int
    last_hash: str
    """The head to export elsewhere (a ticket, a log server): a later rewrite of the record shows against it."""
    notes: list[str]


@router.get("")
async def read_audit(
    _: Operator,
    audit: HubAuditDep,
    experiment: Annotated[int | None, Query(ge=0, le=2**31 - 1, description="Only this experiment's entries")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000, description="The most recent entries to return")] = 100,
) -> list[AuditRecord]:
    """The most recent ``limit`` entries (of ``experiment``), oldest first. A damaged line is
    answered 422 naming it; ``GET /audit/verify`` says where the chain breaks."""
    entries = await anyio.to_thread.run_sync(lambda: audit.entries(experiment=experiment, limit=limit))
    return [AuditRecord.of(entry) for entry in entries]


@router.get("/verify")
async def verify_audit(_: Operator, audit: HubAuditDep) -> AuditVerification:
    """Check the whole chain and its head, as ``laulima hub-audit verify`` does on the hub machine."""
    result = await anyio.to_thread.run_sync(audit.verify)
    return AuditVerification(
        ok=result.ok,
        entries=result.entries,
        line=result.line,
        problem=result.problem,
        last_seq=result.last_seq,
        last_hash=result.last_hash,
        notes=list(result.notes),
    )
