"""What the site dashboard's pages show, read from the site's own records.

Each function reads the same stores the agent and ``laulima site …`` use — the approvals
store, the catalog, the privacy ledger, the audit trail, the policy — and creates none of
them: a dashboard opened on a fresh site shows empty lists, not new files. Nothing here
writes; deciding is :func:`laulima.site.review.decide_job`.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from laulima.algorithms.bundle import visible_text
from laulima.auditlog import AuditEntry, VerifyResult
from laulima.core.privacy.accountant import GaussianRelease, epsilon
from laulima.errors import ConfigurationError, DataError
from laulima.site.approvals import PendingJob
from laulima.site.audit import AUDIT_FILE, AUDIT_HEAD_FILE, AuditLog
from laulima.site.catalog import Catalog
from laulima.site.policy import SitePolicy, is_builtin, load_policy
from laulima.site.privacy_ledger import PRIVACY_FILE, PrivacyLedger, Reservation
from laulima.site.review import approvals_store, bundle_sources, job_facts

__all__ = [
    "MAX_FILE_CHARS",
    "MAX_SOURCE_CHARS",
    "AuditPage",
    "AuditStatus",
    "AuditVerifier",
    "Budget",
    "BudgetRow",
    "DatasetRow",
    "JobView",
    "SourceFile",
    "Verification",
    "audit_page",
    "budget",
    "datasets",
    "field_text",
    "job_view",
    "pending_jobs",
    "recent_decisions",
]

MAX_FILE_CHARS = 200_000
"""Characters of one source file shown on the job page; the rest is announced, not shown."""
MAX_SOURCE_CHARS = 1_000_000
"""Characters of all of a bundle's files shown on the job page together."""
AUDIT_PAGE_SIZE = 50
JOB_AUDIT_ENTRIES = 50


# -- jobs --------------------------------------------------------------------------------
def pending_jobs(home: Path) -> list[PendingJob]:
    """Jobs waiting for a decision, oldest first ([] when none ever waited)."""
    store = approvals_store(home)
    return store.pending() if store is not None else []


def recent_decisions(home: Path, limit: int = 10) -> list[PendingJob]:
    """The most recently received jobs that have been decided, newest first."""
    store = approvals_store(home)
    if store is None:
        return []
    return [job for job in store.jobs(limit=limit * 4) if job.status != "pending"][:limit]


@dataclass(frozen=True)
class SourceFile:
    """One file of a bundle as the job page shows it."""

    path: str
    text: str
    """Control characters written out (``\\x1b``, ``\\u202e``); cut at ``shown`` characters."""
    chars: int
    lines: int
    hidden: int
    """Control characters written out."""
    shown: int
    """Characters of the file shown; less than ``chars`` when cut."""

    @property
    def truncated(self) -> bool:
        return self.shown < self.chars


@dataclass(frozen=True)
class JobView:
    job: PendingJob
    facts: list[tuple[str, str]]
    manifest: dict[str, Any]
    builtin: bool
    sources: list[SourceFile] | None
    """None for a built-in algorithm, or when the bundle could not be read (``sources_error``)."""
    sources_error: str | None
    policy_facts: list[tuple[str, str]]
    policy_error: str | None
    audit: list[AuditEntry]
    audit_error: str | None


def job_view(home: Path, job_id: str | int) -> JobView:
    """Everything ``laulima site jobs show JOB --source`` prints, and the policy's view of the job.

    Raises :class:`~laulima.site.approvals.UnknownJob` for a job the site does not have.
    """
    store = approvals_store(home, job_id)
    assert store is not None
    job = store.get(job_id)
    sources: list[SourceFile] | None = None
    sources_error = None
    try:
        texts = bundle_sources(home, job)
    except DataError as exc:
        texts, sources_error = None, str(exc)
    if texts is not None:
        sources = _source_files(texts)
    policy_facts: list[tuple[str, str]] = []
    policy_error = None
    try:
        policy_facts = _policy_facts(load_policy(home), job, Catalog(home))
    except (ConfigurationError, DataError) as exc:
        policy_error = str(exc)
    audit: list[AuditEntry] = []
    audit_error = None
    try:
        audit = AuditLog(home).entries(experiment=job.experiment_id)[::-1][:JOB_AUDIT_ENTRIES]
    except DataError as exc:
        audit_error = str(exc)
    return JobView(
        job=job,
        facts=job_facts(job),
        manifest=dict(job.manifest),
        builtin=job.digest is None,
        sources=sources,
        sources_error=sources_error,
        policy_facts=policy_facts,
        policy_error=policy_error,
        audit=audit,
        audit_error=audit_error,
    )


def _source_files(texts: Mapping[str, str]) -> list[SourceFile]:
    files = []
    budget = MAX_SOURCE_CHARS
    for path, raw in sorted(texts.items()):
        text, hidden = visible_text(raw)
        shown = max(0, min(len(text), MAX_FILE_CHARS, budget))
        budget -= shown
        files.append(SourceFile(path, text[:shown], len(text), raw.count("\n") + 1, hidden, shown))
    return files


def _policy_facts(policy: SitePolicy, job: PendingJob, catalog: Catalog) -> list[tuple[str, str]]:
    """What the site's policy in force says about this job's algorithm, dataset and size."""
    rules = policy.algorithms
    if policy.approval == "manual":
        approval = "manual: every experiment waits for an administrator"
    else:
        approval = "auto: algorithms the policy admits run without asking"
    scope = "one approval covers the whole experiment" if policy.approval_scope == "experiment" else "per round"
    if job.digest is None:
        if is_builtin(job.entry_point) and rules.builtin:
            admitted = "yes: a built-in algorithm, and the policy admits built-ins"
        else:
            admitted = "no: the policy does not admit built-in algorithms (algorithms.builtin = false)"
    elif job.digest in rules.digests:
        admitted = "yes: its digest is listed in the policy"
    elif job.signer is not None and job.signer in {s.name for s in rules.signers}:
        admitted = f"yes: signed by {job.signer}, a signer the policy lists"
    else:
        admitted = "no: not a listed digest, and not signed by a signer the policy lists"
    if job.dataset.startswith("tag:"):
        dataset = "a tag: each dataset it names is checked against the policy when the task runs"
    elif policy.datasets.allows(job.experiment_name, job.dataset):
        dataset = f"allowed for experiment {job.experiment_name!r}"
    else:
        dataset = "not allowed for this experiment by the policy: its tasks are refused"
    facts = [("approval", f"{approval} ({scope})"), ("algorithm admitted", admitted), ("dataset", dataset)]
    if not job.dataset.startswith("tag:") and job.dataset in catalog:
        cases = catalog.count(job.dataset)
        counted = "cannot be counted" if cases is None else f"{cases} training cases"
        facts.append(("cohort", f"{counted}; the policy's min_cohort is {policy.min_cohort}"))
    cap = "unset" if policy.max_rounds is None else str(policy.max_rounds)
    facts.append(("rounds", f"{job.rounds} asked; the policy's max_rounds is {cap}"))
    privacy = policy.privacy
    if privacy.max_epsilon is None:
        facts.append(("privacy budget", f"no budget set (ε is recorded at δ = {privacy.delta:g})"))
    else:
        facts.append(("privacy budget", f"ε = {privacy.max_epsilon:g} per dataset at δ = {privacy.delta:g}"))
    return facts


# -- datasets ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Verification:
    """The result of checking a dataset's files against their checksums from registration."""

    at: float
    problems: tuple[str, ...]


@dataclass(frozen=True)
class DatasetRow:
    name: str
    kind: str
    cases: int | None
    training: int | None
    skipped: tuple[str, ...]
    tags: tuple[str, ...]
    added_at: float
    present: bool
    status: str
    """``ready``, ``skipped cases``, ``files changed`` or ``missing``."""
    status_class: str
    """The badge's colour: ``ok``, ``held`` (a warning) or ``failed``."""
    verification: Verification | None


def datasets(home: Path, verifications: Mapping[str, Verification]) -> list[DatasetRow]:
    """Every registered dataset with what its registration checked and its last file check."""
    catalog = Catalog(home)
    rows = []
    for name, path in catalog.list().items():
        info = catalog.info(name)
        present = path.exists()
        verified = verifications.get(name)
        if not present:
            status, colour = "missing", "failed"
        elif verified is not None and verified.problems:
            status, colour = "files changed", "failed"
        elif info.skipped:
            status, colour = "skipped cases", "held"
        else:
            status, colour = "ready", "ok"
        rows.append(
            DatasetRow(
                name,
                info.kind,
                info.n_cases,
                info.n_training,
                info.skipped,
                info.tags,
                info.added_at,
                present,
                status,
                colour,
                verified,
            )
        )
    return rows


# -- privacy budget ----------------------------------------------------------------------
@dataclass(frozen=True)
class BudgetRow:
    dataset: str
    reserved: float
    """ε the dataset has reserved over every experiment (what the budget counts): the ledger's ``spent``."""
    used: float
    """ε of the rounds that have run so far."""
    left: float | None
    """None without a budget."""
    reservations: list[Reservation]


@dataclass(frozen=True)
class Budget:
    max_epsilon: float | None
    delta: float
    rows: list[BudgetRow]
    error: str | None = None

    def share(self, row: BudgetRow) -> float:
        """How much of the budget ``row`` has reserved, 0..1 (1 without a budget)."""
        if self.max_epsilon is None or not math.isfinite(row.reserved):
            return 1.0
        return min(1.0, row.reserved / self.max_epsilon)


def budget(home: Path, dataset_names: Sequence[str]) -> Budget:
    """Each dataset's privacy budget: reserved and used ε against the policy's ``max_epsilon``.

    The numbers are the ledger's own (:meth:`PrivacyLedger.spent`, :meth:`PrivacyLedger.left`);
    datasets without reservations show 0. Without a ``privacy.db`` none is created.
    """
    try:
        rules = load_policy(home).privacy
    except ConfigurationError as exc:
        return Budget(None, 0.0, [], f"the site's policy cannot be read, so its budget is unknown: {exc}")
    ledger = PrivacyLedger(home) if (home / PRIVACY_FILE).exists() else None
    names = list(dict.fromkeys([*dataset_names, *(ledger.datasets() if ledger is not None else [])]))
    rows = []
    try:
        for name in sorted(names):
            reservations = ledger.reservations(name) if ledger is not None else []
            reserved = ledger.spent(name, rules) if ledger is not None else 0.0
            used = epsilon(
                [GaussianRelease(r.noise_multiplier, count=r.rounds_run) for r in reservations if r.rounds_run],
                rules.delta,
            )
            left: float | None = None
            if rules.max_epsilon is not None:
                left = ledger.left(name, rules) if ledger is not None else rules.max_epsilon
            rows.append(BudgetRow(name, reserved, used, left, reservations))
    except (ConfigurationError, DataError) as exc:
        return Budget(rules.max_epsilon, rules.delta, rows, str(exc))
    return Budget(rules.max_epsilon, rules.delta, rows)


# -- the audit trail ---------------------------------------------------------------------
@dataclass(frozen=True)
class AuditStatus:
    """The hash chain's verification, for the pages."""

    result: VerifyResult
    path: Path

    @property
    def label(self) -> str:
        return "intact" if self.result.ok else "broken"

    @property
    def summary(self) -> str:
        r = self.result
        if r.ok:
            return f"{r.entries} entries, hash chain intact"
        where = f"broken at line {r.line}" if r.line is not None else "broken at its end"
        return f"{where}: {r.problem}"


class AuditVerifier:
    """Verifies the site's audit trail, again only when the log or its head changed on disk."""

    def __init__(self, home: Path) -> None:
        self.log = AuditLog(home)
        self._lock = threading.Lock()
        self._key: object = None
        self._status: AuditStatus | None = None

    def status(self) -> AuditStatus:
        key = (_stat(self.log.home / AUDIT_FILE), _stat(self.log.home / AUDIT_HEAD_FILE))
        with self._lock:
            if self._status is None or key != self._key:
                self._status = AuditStatus(self.log.verify(), self.log.path)
                self._key = key
            return self._status


def _stat(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


@dataclass(frozen=True)
class AuditPage:
    entries: list[AuditEntry]
    """This page's entries, newest first."""
    total: int
    page: int
    pages: int
    experiment: int | None
    error: str | None = None
    events: list[str] = field(default_factory=list)


def audit_page(home: Path, *, page: int = 1, experiment: int | None = None, size: int = AUDIT_PAGE_SIZE) -> AuditPage:
    """Page ``page`` (1: the newest) of the audit trail, of one experiment's entries if given."""
    try:
        entries = AuditLog(home).entries(experiment=experiment)
    except DataError as exc:
        return AuditPage([], 0, 1, 1, experiment, str(exc))
    total = len(entries)
    pages = max(1, math.ceil(total / size))
    page = min(max(1, page), pages)
    newest = entries[::-1]
    return AuditPage(newest[(page - 1) * size : page * size], total, page, pages, experiment)


def field_text(value: object) -> str:
    """An audit field's value as text: lists joined, null as a dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ", ".join(field_text(item) for item in value)
    return str(value)
