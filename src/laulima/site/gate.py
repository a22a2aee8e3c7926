"""The site's decision on a task before any of its code runs: policy, approvals, bundle.

For every task the agent asks :meth:`Gate.admit`, which reads the site's policy afresh
(an administrator's edit counts from the next task), finds the dataset, fetches and checks
the algorithm's bundle (digest, manifest, per-file hashes: data, never executed here),
finds who signed it, counts the cohort, and asks :func:`laulima.site.policy.decide` with
any decision an administrator recorded. The answer is one of three:

- :class:`Admitted`: run it, from this unpacked bundle, on this dataset, under this policy;
- :class:`Held`: it waits for an administrator (``laulima site jobs``); recorded for review;
- :class:`Refused`: the full reason for the site's log and audit trail, and a path-free one
  for the hub.

A training task with differential privacy is also charged to the site's privacy budget
(:mod:`laulima.site.privacy_ledger`) at every dataset its cohort reads: checked before it is
held for an administrator, reserved only once it is admitted to run (and audited as
``privacy_reserved``). Evaluation and fingerprint tasks are not charged: they release
metrics or aggregates, not model updates.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from laulima.algorithms.bundle import Manifest, builtin_digest, check_requirements, unpack, verify, verify_signature
from laulima.core.bundle import MAX_ARCHIVE_BYTES
from laulima.core.protocol import FailureKind, TaskKind, TaskPublic
from laulima.errors import ConfigurationError, DataError, LaulimaError, NotFound, PrivacyError, ProtocolError
from laulima.private_files import private_dir
from laulima.site.approvals import ApprovalStore
from laulima.site.audit import AuditEvent, AuditLog
from laulima.site.catalog import Catalog
from laulima.site.client import HubClient
from laulima.site.policy import JobFacts, SitePolicy, Verdict, decide, load_policy
from laulima.site.privacy_ledger import Charge, PrivacyAsk, PrivacyLedger
from laulima.site.redact import redact
from laulima.site.selection import Resolution, resolve

__all__ = ["BUNDLES_DIR", "Admission", "Admitted", "Gate", "Held", "Refused", "bundle_archive"]

log = logging.getLogger("laulima.site")
BUNDLES_DIR = "bundles"
"""``home/bundles``: each bundle as downloaded (``<digest>.bundle``, kept for review) and unpacked (``<digest>/``)."""


def bundle_archive(home: Path, digest: str) -> Path:
    """Where the agent keeps the bundle ``digest`` as the hub sent it (``laulima site jobs show --source`` reads it)."""
    return Path(home) / BUNDLES_DIR / f"{digest}.bundle"


@dataclass(frozen=True)
class Admitted:
    policy: SitePolicy
    cohort: Resolution
    """The task's cases at this site (``selection.materialize`` gives the folder to read)."""
    bundle_dir: Path | None
    """The unpacked bundle to import from; None for a built-in algorithm."""
    algorithm_digest: str
    """The bundle's digest, or the built-in's well-known one (for the audit trail)."""
    n_cases: int | None
    why: str
    privacy: tuple[Charge, ...] = ()
    """A training task with differential privacy: its experiment's reservation at each dataset
    of the cohort (this task counted); empty otherwise."""


@dataclass(frozen=True)
class Held:
    job_id: int
    why: str


@dataclass(frozen=True)
class Refused:
    kind: FailureKind
    reason: str
    """The full text, for the site's log and audit trail (may name the site's paths)."""
    public: str
    """What the hub may be told: no paths, file names or per-case values."""
    names_only_job_facts: bool = False
    """``public`` quotes only what the task or its bundle declared (package names, the
    policy's numbers), never site data: quoted values in it need not be redacted."""


Admission = Admitted | Held | Refused


class Gate:
    """Decides, per task, whether it runs, waits for an administrator, or is refused."""

    def __init__(
        self,
        home: Path,
        catalog: Catalog,
        client: HubClient,
        approvals: ApprovalStore,
        *,
        audit: AuditLog | None = None,
        ledger: PrivacyLedger | None = None,
    ) -> None:
        self.home = Path(home)
        self.catalog = catalog
        self.client = client
        self.approvals = approvals
        self._audit = audit
        self._ledger = ledger
        """Opened at the first task with differential privacy: a site that never runs one has no privacy.db."""

    def admit(self, task: TaskPublic) -> Admission:
        try:
            policy = load_policy(self.home)
        except ConfigurationError as exc:
            return Refused(
                FailureKind.REJECTED,
                str(exc),
                "the site's policy cannot be read; the site's administrator must fix it (`laulima site policy check`)",
            )
        try:
            cohort = resolve(self.catalog, task.dataset, task.cohort)
        except (DataError, ConfigurationError) as exc:
            return Refused(FailureKind.REJECTED, str(exc), redact(str(exc)))
        for name in cohort.datasets:  # a tag must not reach a dataset the policy keeps from this experiment
            if not policy.datasets.allows(task.experiment_name, name):
                why = f"dataset {name!r} is not allowed by the site's policy"
                return Refused(FailureKind.REJECTED, why, why, names_only_job_facts=True)
        minimum = task.cohort.min_cases if task.cohort is not None else None
        if minimum is not None and (cohort.n_cases is None or cohort.n_cases < minimum):
            counted = "cases that cannot be counted" if cohort.n_cases is None else f"{cohort.n_cases} cases"
            why = f"{cohort.described} has {counted}, the experiment's min_cases is {minimum}"
            return Refused(FailureKind.REJECTED, why, why, names_only_job_facts=True)
        manifest: Manifest | None = None
        if task.bundle_digest is not None:
            try:
                manifest = self._fetch_bundle(task)
            except (DataError, NotFound, ConfigurationError) as exc:
                public = f"the algorithm's bundle failed its check: {redact(str(exc))}"
                return Refused(FailureKind.ERROR, str(exc), public)
        try:
            facts = JobFacts(
                experiment_id=task.experiment_id,
                experiment_name=task.experiment_name,
                requester=task.requester or "unknown",
                round=task.round,
                kind=task.kind.value,
                entry_point=task.algorithm,
                bundle_digest=task.bundle_digest,
                bundle_signer=self._signer(policy, task),
                dataset=task.dataset,
                n_cases=cohort.n_cases,
                rounds=task.rounds,
                task_time_limit_s=task.time_limit_s,
                local_model=task.kind == TaskKind.TRAIN and task.config.get("local_model") is True,
                privacy=task.privacy if task.kind == TaskKind.TRAIN else None,
            )
        except ProtocolError as exc:
            return Refused(FailureKind.ERROR, str(exc), redact(str(exc)))
        if manifest is not None and manifest.entry_point != task.algorithm:
            why = f"the task runs {task.algorithm!r} but its bundle's entry point is {manifest.entry_point!r}"
            return Refused(FailureKind.REJECTED, why, why, names_only_job_facts=True)
        scope_round = task.round if policy.approval_scope == "round" else None
        approval = self.approvals.decision_for(task.experiment_id, scope_round, job=facts)
        decision = decide(policy, facts, approval=approval)
        if decision.verdict is Verdict.REFUSE:
            return Refused(FailureKind.REJECTED, decision.why, decision.why, names_only_job_facts=True)
        if decision.verdict is Verdict.ASK:
            refused = self._charge(task, cohort, policy, reserve=False)  # no use asking for what cannot be paid
            if refused is not None:
                return refused
            job = self.approvals.request(
                facts,
                task_id=task.id,
                scope=policy.approval_scope,
                algorithm_name=manifest.name if manifest is not None else task.algorithm,
                manifest=_manifest_dict(manifest),
            )
            return Held(job.id, decision.why)
        bundle_dir = None
        if manifest is not None and task.bundle_digest is not None:
            try:
                check_requirements(manifest)
                bundle_dir = unpack(bundle_archive(self.home, task.bundle_digest), task.bundle_digest, self._bundles())
            except LaulimaError as exc:
                if exc.context.get("field") == "requirements":  # names the bundle's own requirement
                    return Refused(FailureKind.REJECTED, str(exc), redact(str(exc)), names_only_job_facts=True)
                return Refused(FailureKind.ERROR, str(exc), redact(str(exc)))
        charges: list[Charge] = []
        refused = self._charge(task, cohort, policy, reserve=True, charged=charges)
        if refused is not None:
            return refused
        digest = task.bundle_digest or builtin_digest(task.algorithm)
        return Admitted(policy, cohort, bundle_dir, digest, facts.n_cases, decision.why, tuple(charges))

    # -- the privacy budget --------------------------------------------------------------
    def _charge(
        self,
        task: TaskPublic,
        cohort: Resolution,
        policy: SitePolicy,
        *,
        reserve: bool,
        charged: list[Charge] | None = None,
    ) -> Refused | None:
        """Check (``reserve=False``) or reserve the cost of a training task with differential
        privacy at every dataset its cohort reads; a Refused when the budget cannot pay for it.

        Only TRAIN tasks are charged: an evaluation releases metrics and a fingerprint
        aggregates, not a model update. A TRAIN task without DP parameters is not charged
        either (``[privacy] require`` refuses it in ``decide`` when the site wants that).
        """
        ask = PrivacyAsk.from_task(task) if task.kind == TaskKind.TRAIN else None
        if ask is None:
            return None
        try:
            ledger = self._privacy_ledger()
            if reserve:
                charges = ledger.reserve(
                    cohort.datasets,
                    ask,
                    policy.privacy,
                    record=lambda new: self._audit_reserved(task, policy, new),
                )
            else:
                charges = ledger.check(cohort.datasets, ask, policy.privacy)
        except PrivacyError as exc:
            return Refused(FailureKind.REJECTED, str(exc), str(exc), names_only_job_facts=True)
        except (ConfigurationError, DataError, OSError) as exc:  # the ledger or the audit trail
            public = (
                "the site cannot account this task's differential privacy (its privacy ledger or audit trail cannot "
                "be written); the site's administrator must fix it"
            )
            return Refused(FailureKind.ERROR, str(exc), public)
        if charged is not None:
            charged += charges
        return None

    def _privacy_ledger(self) -> PrivacyLedger:
        if self._ledger is None:
            self._ledger = PrivacyLedger(self.home)
        return self._ledger

    def _audit_reserved(self, task: TaskPublic, policy: SitePolicy, charges: Sequence[Charge]) -> None:
        """One ``privacy_reserved`` entry per dataset, written before the reservation commits:
        a reservation the trail cannot show is not made."""
        if self._audit is None:
            self._audit = AuditLog(self.home)
        for charge in charges:
            r = charge.reservation
            self._audit.append(
                AuditEvent.PRIVACY_RESERVED,
                task=task.id,
                experiment=task.experiment_id,
                dataset=r.dataset,
                experiment_name=r.experiment_name,
                round=task.round,
                rounds=r.rounds,
                reserved=r.reserved,
                new_releases=charge.new_releases,
                noise_multiplier=r.noise_multiplier,
                clip=r.clip,
                delta=r.delta,
                epsilon=_audit_number(charge.experiment_epsilon),
                spent=_audit_number(charge.spent),
                budget=policy.privacy.max_epsilon,
                budget_delta=policy.privacy.delta,
            )

    # -- the bundle ----------------------------------------------------------------------
    def _bundles(self) -> Path:
        folder = self.home / BUNDLES_DIR
        private_dir(folder)
        return folder

    def _fetch_bundle(self, task: TaskPublic) -> Manifest:
        """Download the task's bundle once (kept for review and later rounds) and check it."""
        assert task.bundle_digest is not None
        archive = bundle_archive(self.home, task.bundle_digest)
        if not archive.exists():
            self._bundles()
            limit = min(task.bundle_size if task.bundle_size is not None else MAX_ARCHIVE_BYTES, MAX_ARCHIVE_BYTES)
            self.client.download_blob(task.bundle_digest, archive, limit)
        try:
            return verify(archive, task.bundle_digest)
        except DataError:
            archive.unlink(missing_ok=True)  # fetched again for the next task
            raise

    def _signer(self, policy: SitePolicy, task: TaskPublic) -> str | None:
        """The first policy signer with a valid signature of the bundle in the task, if any."""
        if task.bundle_digest is None or not task.signatures:
            return None
        for signer in policy.algorithms.signers:
            for signature in task.signatures:
                try:
                    if verify_signature(task.bundle_digest, signature, signer.raw_key()):
                        return signer.name
                except LaulimaError as exc:  # a malformed signature counts as none
                    log.warning("task %s: a signature of its bundle is malformed (%s)", task.id, exc)
        return None


def _audit_number(value: float) -> float | str:
    """ε for the audit trail, which takes finite numbers only: ``"inf"`` for no privacy at all."""
    return value if math.isfinite(value) else "inf"


def _manifest_dict(manifest: Manifest | None) -> dict[str, Any] | None:
    return None if manifest is None else dict(json.loads(manifest.to_json()))
