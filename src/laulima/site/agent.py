"""The site agent: pull a task, run it in a child process, report the result; forever.

The agent opens only outbound connections. One task's trouble (a crash, a timeout, a
refusal by the hub) is reported or logged and the agent goes on; network trouble is
waited out with backoff. Progress is persisted per phase (:mod:`laulima.site.state`), so
a restarted agent resumes instead of redoing work or reporting twice.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from hashlib import sha256
from pathlib import Path
from typing import Any

from laulima.core.cohort import dataset_tag
from laulima.core.fingerprint import SiteFingerprint
from laulima.core.protocol import EvaluationResult, FailureKind, TaskFailure, TaskKind, TaskPublic
from laulima.errors import (
    AlgorithmError,
    ConfigurationError,
    Conflict,
    DataError,
    Forbidden,
    LaulimaError,
    NotFound,
    ProtocolError,
    TransportError,
)
from laulima.private_files import PRIVATE_FILE, private_dir, tighten, write_atomic
from laulima.site.approvals import ApprovalStore
from laulima.site.audit import AuditEntry, AuditEvent, AuditLog, reference
from laulima.site.catalog import Catalog
from laulima.site.client import HubClient
from laulima.site.cohort import site_report
from laulima.site.gate import Admitted, Gate, Held, Refused
from laulima.site.policy import load_policy
from laulima.site.redact import redact
from laulima.site.runner import TaskRunner, seconds_left
from laulima.site.sandbox import sandbox_for
from laulima.site.secure_aggregation import MaskedRound
from laulima.site.selection import materialize
from laulima.site.settings import SiteSettings
from laulima.site.state import Phase, SiteState, TaskRecord
from laulima.site.update_privacy import privatize_update
from laulima.site.worker import RESULT_FILE, RESULT_WEIGHTS_FILE, SCRATCH_DIR, WEIGHTS_FILE

__all__ = ["CACHE_DIR", "CACHE_MAX_AGE_S", "LOCK_FILE", "Agent", "open_agent", "prune_caches", "run_agent"]

log = logging.getLogger("laulima.site")
LOCK_FILE = "agent.lock"
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_MB = 1e6
MASKED_FILE = "masked.safetensors"
"""A secure-aggregation task's masked update, beside its quantised one (site/secure_aggregation.py)."""
_REASON_MAX = 300
"""Characters of the hub's own refusal quoted back to it when the agent closes a task."""
_NEVER = object()
"""The catalog signature before the first report: differs from every real one."""
CACHE_DIR = "cache"
"""``home/cache/experiment-<id>``: each experiment's persistent folder at this site
(``SiteContext.cache_dir``), kept across its tasks, owner-only (0700)."""
CACHE_MAX_AGE_S = 7 * 24 * 3600.0
"""A cache folder whose experiment has run no task here for this long (a week) is removed
when the agent starts: an experiment's rounds are hours or days apart, not weeks, and a
cache of preprocessed images is as large as the dataset."""
_HELD_POLL_S = 2.0
"""Longest poll while a job waits for approval here: an approval is acted on within seconds."""
_AUDIT_BROKEN = (
    "the site's audit trail cannot be written, so it runs nothing; the site's administrator must check it "
    "(`laulima site audit verify`)"
)


class _StopPolling(BaseException):
    """Raised by the signal handler to cut a long poll short (nothing is lost by it)."""


class Agent:
    """One site's pull loop. Construct with its parts, so tests can swap any of them."""

    def __init__(
        self,
        settings: SiteSettings,
        client: HubClient,
        catalog: Catalog,
        state: SiteState,
        *,
        runner: TaskRunner | None = None,
        stop: threading.Event | None = None,
        audit: AuditLog | None = None,
        approvals: ApprovalStore | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.catalog = catalog
        self.state = state
        self.audit = audit or AuditLog(settings.home)
        self.approvals = approvals or ApprovalStore(settings.home)
        self.gate = Gate(settings.home, catalog, client, self.approvals, audit=self.audit)
        self.audit_broken: str | None = None
        """Why the audit trail cannot be written (the agent then runs nothing), or None."""
        self.runner = runner or TaskRunner(time_limit_cap_s=settings.task_time_limit_s)
        self.stop = stop or client.stop
        client.stop = self.stop
        self.polling = False
        """True while waiting on the hub where nothing is lost by stopping (the long poll, the
        catalog report): the one place a shutdown may interrupt at once."""
        self.report_interval_s = 5.0
        """How often, at most, the catalog is checked for changes to report to the hub."""
        self._started = False
        self._masked: dict[str, MaskedRound] = {}
        """Secure-aggregation exchanges under way, by task: they run while the task trains."""
        self._report_checked_at: float | None = None
        self._reported: object = _NEVER
        """Catalog signature the hub last heard about (or refused for good)."""

    # -- the loop ------------------------------------------------------------------------
    def run_forever(self, stop: threading.Event | None = None) -> None:
        """Poll and handle tasks until ``stop`` is set; raises only if the hub refuses this site."""
        if stop is not None:
            self.stop = self.client.stop = stop
        log.info(
            "site %s: agent started (hub %s, home %s)", self.settings.name, self.client.base_url, self.settings.home
        )
        errors = 0
        while not self.stop.is_set():
            try:
                self.step()
                errors = 0
            except _StopPolling:
                break
            except Forbidden as exc:
                log.error("site %s: %s", self.settings.name, exc)
                raise
            except TransportError as exc:
                if not self.stop.is_set():
                    log.warning("%s", exc)
            except Exception:  # the agent must outlive any single surprise
                errors += 1
                delay = min(self.settings.backoff_max_s, 2.0**errors)
                log.exception("site %s: unexpected error; continuing in %.0f s", self.settings.name, delay)
                self.stop.wait(delay)
        log.info("site %s: agent stopped", self.settings.name)

    def step(self) -> bool:
        """One long poll and, if a task came, its handling. True if there was a task."""
        if not self._started:
            self._start()
        self._resume_decided()
        held = any(r.phase == Phase.WAITING for r in self.state.tasks())
        wait = min(self.settings.poll_wait_s, _HELD_POLL_S) if held else self.settings.poll_wait_s
        self.polling = True
        try:
            self._report_if_changed()
            task = self.client.next_task(wait)
            received_at = time.monotonic()  # the task's time is counted from here, on this clock
        except ProtocolError as exc:
            if isinstance(exc, Forbidden):
                raise
            log.error("site %s: polling refused by the hub: %s", self.settings.name, exc)
            self.stop.wait(self.settings.backoff_max_s)
            return False
        finally:
            self.polling = False
        if task is None:
            return False
        self.handle(task, received_at=received_at)
        return True

    def _start(self) -> None:
        """Once per agent: make the home owner-only (an older version left it 0755)."""
        self._started = True
        home = self.settings.home
        private_dir(home)
        for folder in (home, self.settings.work_dir, home / CACHE_DIR):
            if folder.is_dir() and (old := tighten(folder)) is not None:
                log.warning(
                    "site %s: %s was accessible to other users (mode %o); made it owner-only (700)",
                    self.settings.name,
                    folder,
                    old,
                )
        removed = prune_caches(home / CACHE_DIR, CACHE_MAX_AGE_S)
        if removed:
            log.info(
                "site %s: removed %d experiment cache folder(s) unused for over %.0f days",
                self.settings.name,
                removed,
                CACHE_MAX_AGE_S / 86400,
            )

    def _report_if_changed(self) -> None:
        """Send the hub this agent's version and case counts at start and after the catalog
        changes; the check is a stat of the catalog file, at most every ``report_interval_s``."""
        now = time.monotonic()
        if not self.client.reports_supported or (
            self._report_checked_at is not None and now - self._report_checked_at < self.report_interval_s
        ):
            return
        self._report_checked_at = now
        signature = self.catalog.signature()
        if signature == self._reported:
            return
        try:
            report = site_report(self.catalog)
            if self.client.report(report):
                counts = " ".join(f"{name}={n if n is not None else '?'}" for name, n in report.datasets.items())
                log.info("site %s: reported version %s, datasets: %s", self.settings.name, report.version, counts)
        except TransportError as exc:  # tried again at the next check
            log.warning("site %s: %s", self.settings.name, exc)
            return
        except (ConfigurationError, ProtocolError) as exc:  # no use repeating it until the catalog changes
            log.warning("site %s: %s", self.settings.name, exc)
        self._reported = signature

    def request_stop(self) -> None:
        """Stop after the current step; a running algorithm is killed (its task resumes on restart)."""
        self.stop.set()
        self.runner.cancel()

    # -- one task ------------------------------------------------------------------------
    def handle(self, task: TaskPublic, *, received_at: float | None = None) -> None:
        """Take ``task`` as far as it goes; never raises for a problem of this task alone.

        ``received_at``: when the hub's answer carrying it arrived, by ``time.monotonic()``
        (default: now); the task's ``seconds_left`` count from then.
        """
        received_at = time.monotonic() if received_at is None else received_at
        record = self.state.get(task.id)
        if record is not None and record.phase.final:
            self._redelivered(task, record)
            return
        log.info(
            "task %s received: %s round %d of %r, algorithm %s, dataset %r",
            task.id,
            task.kind.value,
            task.round,
            task.experiment_name,
            task.algorithm,
            task.dataset,
        )
        try:
            self._handle(task, record, received_at)
        except TransportError as exc:
            log.warning("task %s: %s; kept for when the hub sends it again", task.id, exc)
        except ProtocolError as exc:
            if _credentials_refused(exc):
                raise
            log.warning("task %s: the hub refused it (%s); giving up on this task", task.id, exc)
            closed = bool(exc.context.get("task_closed"))  # the refusal itself ended the task at the hub
            given_up = self.state.set(task.id, Phase.GIVEN_UP, note=str(exc)[:1000], closed_at_hub=closed)
            self._clean(task.id)
            if not closed:
                self._close_at_hub(task, given_up)
        except Exception as exc:  # a fault of this agent (disk full, a bug): tell the hub, go on
            log.exception("task %s: the site agent failed on it", task.id)
            with contextlib.suppress(Exception):
                self._report(
                    task, self._failed(task, FailureKind.ERROR, f"site agent error: {type(exc).__name__}: {exc}")
                )
        finally:
            for task_id in self.state.prune():
                shutil.rmtree(self.task_dir(task_id), ignore_errors=True)

    def _redelivered(self, task: TaskPublic, record: TaskRecord) -> None:
        """The hub sent a task this agent is done with: have the hub close it, once."""
        if not record.closed_at_hub:
            log.info("task %s: already %s here; reporting it to the hub so that it closes it", task.id, record.phase)
            self._close_at_hub(task, record)
            return
        # The hub heard that already and still sends it: a fault at the hub. A short pause
        # keeps this agent from spinning on it; the task's deadline ends it.
        log.warning(
            "task %s: already %s here and reported closed; the hub sent it again - ignoring it", task.id, record.phase
        )
        self.stop.wait(min(5.0, self.settings.poll_wait_s))

    def _close_at_hub(self, task: TaskPublic, record: TaskRecord) -> None:
        """Report a task this agent will do no more for as failed, so the round does not wait
        for it until its deadline and the hub does not send it again and again."""
        reason = _closing_reason(record)
        try:
            self.client.send_failure(task.id, TaskFailure(kind=FailureKind.ERROR, reason=reason))
            log.info("task %s: reported to the hub as failed (%s)", task.id, reason)
        except Conflict:
            log.info("task %s: the hub had closed it already", task.id)
        except TransportError as exc:
            log.warning("task %s: %s; the hub is told when it sends the task again", task.id, exc)
            return
        except ProtocolError as exc:
            if _credentials_refused(exc):
                raise
            log.warning("task %s: the hub refused to close it as well (%s)", task.id, exc)
        self.state.set(task.id, record.phase, closed_at_hub=True)

    def _handle(self, task: TaskPublic, record: TaskRecord | None, received_at: float) -> None:
        if record is not None and record.phase == Phase.COMPUTED and _result_kept(record):
            log.info("task %s: its result was computed before a restart; reporting it", task.id)
            self._report(task, record)
            return
        downloaded = record is not None and record.phase == Phase.DOWNLOADED
        if record is None:
            self.state.set(task.id, Phase.RECEIVED, kind=task.kind.value)
            self._audit(
                AuditEvent.RECEIVED,
                task,
                kind=task.kind.value,
                round=task.round,
                dataset=task.dataset,
                algorithm=task.algorithm,
                bundle=task.bundle_digest,
                requester=task.requester,
            )
        if self.audit_broken is not None:
            self._report(task, self._failed(task, FailureKind.REJECTED, self.audit_broken))
            return
        if seconds_left(task, received_at) <= 0:
            log.warning("task %s: its deadline passed before this site could start it", task.id)
            reason = "timeout: the task's deadline passed before this site could start it"
            self._report(task, self._failed(task, FailureKind.TIMEOUT, reason))
            return
        admission = self.gate.admit(task)
        if isinstance(admission, Refused):
            log.warning("task %s refused: %s", task.id, admission.reason)
            self._audit(AuditEvent.REFUSED, task, reason=admission.reason)
            failed = self._failed(
                task, admission.kind, admission.reason, public=admission.public, quoted=admission.names_only_job_facts
            )
            self._report(task, failed)
            return
        if isinstance(admission, Held):
            self._hold(task, admission)
            return
        self._audit(AuditEvent.DECIDED, task, decision="run", reason=admission.why)
        if task.id not in self._masked:
            self._masked_round(task)  # secure aggregation's key exchange runs beside download and training
        task_dir = self.task_dir(task.id)
        private_dir(self.settings.work_dir)
        private_dir(task_dir)
        weights = task_dir / WEIGHTS_FILE
        if not (downloaded and weights.exists()):
            started = time.monotonic()
            try:
                size = self.client.download_blob(task.weights_digest, weights, task.weights_size)
            except (DataError, NotFound) as exc:
                log.warning("task %s: %s", task.id, exc)
                self._report(task, self._failed(task, FailureKind.ERROR, str(exc)))
                return
            seconds = time.monotonic() - started
            log.info("task %s downloaded: %.1f MB in %.2f s", task.id, size / _MB, seconds)
            self.state.set(task.id, Phase.DOWNLOADED)
        self._run(task, task_dir, admission, received_at)

    def _run(self, task: TaskPublic, task_dir: Path, admission: Admitted, received_at: float) -> None:
        """Run the admitted algorithm in its sandbox; record the result, or report the failure."""
        self._audit(
            AuditEvent.STARTED,
            task,
            bundle=admission.algorithm_digest,
            dataset=task.dataset,
            cases=admission.n_cases,
        )
        started = time.monotonic()
        try:
            dataset_path = materialize(admission.cohort, self.catalog, task_dir)
            cache_dir = self.cache_dir(task)
            confinement = sandbox_for(
                admission.policy,
                task_dir,
                dataset_path,
                admission.bundle_dir,
                dataset_readable=admission.cohort.readable,
                cache_dir=cache_dir,
            )
            result = self.runner.run(
                task,
                task_dir,
                site=self.settings.name,
                dataset_path=dataset_path,
                received_at=received_at,
                bundle_dir=admission.bundle_dir,
                sandbox=confinement,
                cache_dir=cache_dir,
            )
        except (AlgorithmError, ConfigurationError, DataError) as exc:
            kind = str(exc.context.get("kind", FailureKind.ERROR.value))
            if kind == "cancelled":
                log.info("task %s: stopped with the agent; it resumes when the agent restarts", task.id)
                return
            violation = exc.context.get("sandbox_violation")
            if violation:
                self._audit(AuditEvent.SANDBOX_VIOLATION, task, violation=str(violation), detail=str(exc))
            log.warning("task %s failed (%s): %s", task.id, kind, exc)
            self._report(task, self._failed(task, kind, str(exc)))
            return
        verb = {TaskKind.TRAIN: "trained", TaskKind.FINGERPRINT: "fingerprinted"}.get(task.kind, "evaluated")
        log.info(
            "task %s %s in %.2f s (algorithm %.2f s): n_samples=%d %s",
            task.id,
            verb,
            time.monotonic() - started,
            result.seconds,
            result.n_samples,
            _fmt(result.metrics),
        )
        self._audit(AuditEvent.FINISHED, task, n_samples=result.n_samples, seconds=round(result.seconds, 3))
        path = result.weights_path if result.weights_path is not None else task_dir / RESULT_FILE
        digest = result.sha256
        if result.weights_path is not None and (task.privacy is not None or task.secure_aggregation is not None):
            digest = self._privatize(task, result.weights_path, task_dir / WEIGHTS_FILE)
        record = self.state.set(task.id, Phase.COMPUTED, result_path=str(path), result_digest=digest)
        self._report(task, record)

    def _masked_round(self, task: TaskPublic) -> None:
        """Under secure aggregation, start the key and share exchange beside the training."""
        if task.kind == TaskKind.TRAIN and task.secure_aggregation is not None:
            secure = MaskedRound(self.client, task, self.settings.name, self.stop)
            secure.prepare()
            self._masked[task.id] = secure

    def _privatize(self, task: TaskPublic, update: Path, given: Path) -> str:
        """Clip, noise and (for secure aggregation) quantise the update before anything is
        sent; the site's audit trail records what was applied. Returns the new file's sha256."""
        private = privatize_update(task, update, given)
        privacy = task.privacy
        self._audit(
            AuditEvent.PRIVACY_APPLIED,
            task,
            privacy=(
                f"{privacy.mode} differential privacy: clip {privacy.clip:g}, noise multiplier "
                f"{privacy.noise_multiplier:g}, noise std {private.noise_std:.4g}, ε {private.epsilon:.4g} "
                f"at δ {privacy.delta:g} after round {task.round}"
                if privacy is not None
                else "no differential privacy"
            ),
            clipped=private.clipped,
            update_norm=round(private.norm, 6),
            secure_aggregation=task.secure_aggregation is not None,
        )
        if private.epsilon is not None:
            log.info("task %s: update privatised (ε = %.3f so far in this experiment)", task.id, private.epsilon)
        return private.sha256

    # -- jobs held for an administrator ------------------------------------------------------
    def _hold(self, task: TaskPublic, held: Held) -> None:
        """Keep the task until an administrator decides, and tell the hub why it waits."""
        already = (record := self.state.get(task.id)) is not None and record.phase == Phase.WAITING
        self.state.set(task.id, Phase.WAITING, task=task.model_dump(mode="json"))
        if not already:
            self._audit(AuditEvent.DECIDED, task, decision="hold", reason=held.why, job=held.job_id)
            log.warning(
                "task %s of experiment %r waits for approval: %s - review it with `laulima site jobs show %d --source`",
                task.id,
                task.experiment_name,
                held.why,
                held.job_id,
            )
        try:
            self.client.set_waiting(task.id, f"job {held.job_id} waits for the site's administrator: {held.why}")
        except (Conflict, NotFound) as exc:
            log.info("task %s: the hub closed it already (%s)", task.id, exc)
            self.state.set(task.id, Phase.GIVEN_UP, note="closed at the hub while held", closed_at_hub=True)

    def _resume_decided(self) -> None:
        """Tasks held for approval whose job an administrator has decided since: take them up."""
        held = [r for r in self.state.tasks() if r.phase == Phase.WAITING and r.task]
        if not held:
            return
        try:
            scope = load_policy(self.settings.home).approval_scope
        except ConfigurationError:
            return  # the next task is refused with the reason; held ones wait for a valid policy
        for record in held:
            if self.stop.is_set():
                return
            task = TaskPublic.model_validate(record.task)
            decided = self.approvals.decision_for(task.experiment_id, task.round if scope == "round" else None)
            if decided is None:
                continue
            try:
                fresh = self.client.resume_task(task.id)
            except ProtocolError as exc:
                if _credentials_refused(exc):
                    raise
                log.warning("task %s: the hub refused to resume it (%s); giving it up", task.id, exc)
                fresh = None
            if fresh is None:
                log.info("task %s: the hub closed it while it waited for approval", task.id)
                self.state.set(
                    task.id, Phase.GIVEN_UP, note="closed at the hub while held for approval", closed_at_hub=True
                )
                continue
            self.handle(fresh, received_at=time.monotonic())

    # -- what the hub is told ----------------------------------------------------------------
    def _failed(
        self, task: TaskPublic, kind: str, reason: str, *, public: str | None = None, quoted: bool = False
    ) -> TaskRecord:
        """Record a failure to report: the full ``reason`` goes to the audit trail, the hub gets
        ``public`` (default: ``reason``) without paths, file names or per-case values, and the
        reference of that audit entry. ``quoted``: quoted text in it names only what the job
        declared (a package, the dataset), so it stays."""
        if (secure := self._masked.pop(task.id, None)) is not None:
            secure.cancel()  # a failed task takes no further part in its round's secure aggregation
        tag = dataset_tag(task.dataset)
        names = (task.dataset, task.experiment_name, task.algorithm, self.settings.name, *([tag] if tag else []))
        text = redact(
            public if public is not None else reason, folders=self._own_folders(task), keep=None if quoted else names
        )
        entry = self._audit(AuditEvent.FAILED, task, kind=kind, error=reason[:8000], reason_sent=text)
        if entry is not None:
            text = f"{text} (site {reference(entry)})"
        return self.state.set(task.id, Phase.COMPUTED, failure_kind=kind, note=text[:4000])

    def _own_folders(self, task: TaskPublic) -> list[Path]:
        folders = [self.settings.home, self.settings.work_dir, self.task_dir(task.id)]
        with contextlib.suppress(LaulimaError, OSError):
            folders.append(self.catalog.get(task.dataset))
        return folders

    def _audit(self, event: AuditEvent, task: TaskPublic, **fields: Any) -> AuditEntry | None:
        """Append to the site's audit trail; if it cannot be written, run nothing more (fail closed)."""
        try:
            entry = self.audit.append(event, task=task.id, experiment=task.experiment_id, **fields)
        except (LaulimaError, OSError) as exc:
            if self.audit_broken is None:
                log.error("site %s: the audit trail cannot be written (%s); refusing tasks", self.settings.name, exc)
            self.audit_broken = _AUDIT_BROKEN
            return None
        if self.audit_broken is not None:  # the administrator repaired it (`laulima site audit reanchor`)
            log.info("site %s: the audit trail is writable again; running tasks", self.settings.name)
            self.audit_broken = None
        return entry

    def _report(self, task: TaskPublic, record: TaskRecord) -> None:
        started = time.monotonic()
        if record.failure_kind:
            try:
                kind = FailureKind(record.failure_kind)
            except ValueError:
                kind = FailureKind.ERROR
            reason = (record.note or "no reason recorded")[:4000]
            self.client.send_failure(task.id, TaskFailure(kind=kind, reason=reason))
            self._audit(AuditEvent.SENT, task, what="failure", bytes=len(reason.encode()), sha256=_sha(reason.encode()))
            log.info("task %s: reported the failure (%s) to the hub", task.id, kind.value)
        elif task.kind == TaskKind.TRAIN:
            path = Path(str(record.result_path))
            if task.secure_aggregation is not None:
                masked = path.with_name(MASKED_FILE)
                # Its keys were exchanged while the site trained; after a restart they are gone,
                # and a fresh exchange is refused unless the key phase is still open.
                secure = self._masked.pop(task.id, None)
                secure = secure or MaskedRound(self.client, task, self.settings.name, self.stop)
                accepted = secure.finish(
                    path, masked, lambda file, digest: self.client.upload_update(task, file, digest=digest)
                )
                path = masked
            else:
                accepted = self.client.upload_update(task, path, digest=record.result_digest)
            seconds = time.monotonic() - started
            size = path.stat().st_size
            self._audit(AuditEvent.SENT, task, what="update", bytes=size, sha256=accepted.digest)
            log.info(
                "task %s uploaded: %.1f MB in %.2f s (n_samples=%d, digest %s)",
                task.id,
                size / _MB,
                seconds,
                accepted.n_samples,
                accepted.digest[:12],
            )
        elif task.kind == TaskKind.FINGERPRINT:
            data = json.loads(Path(str(record.result_path)).read_text(encoding="utf-8"))
            fingerprint = SiteFingerprint.model_validate(data["fingerprint"])
            self.client.send_fingerprint(task.id, fingerprint)
            body = fingerprint.model_dump_json().encode()
            self._audit(AuditEvent.SENT, task, what="fingerprint", bytes=len(body), sha256=_sha(body))
            log.info("task %s: dataset fingerprint reported (%d cases)", task.id, fingerprint.n_cases)
        else:
            data = json.loads(Path(str(record.result_path)).read_text(encoding="utf-8"))
            evaluation = EvaluationResult(n_samples=data["n_samples"], metrics=data["metrics"])
            self.client.send_evaluation(task.id, evaluation)
            body = evaluation.model_dump_json().encode()
            self._audit(AuditEvent.SENT, task, what="evaluation", bytes=len(body), sha256=_sha(body))
            log.info("task %s: evaluation reported", task.id)
        self.state.set(task.id, Phase.REPORTED)
        self._clean(task.id)

    def cache_dir(self, task: TaskPublic) -> Path:
        """``home/cache/experiment-<id>``, created owner-only, its time of use refreshed (what
        :func:`prune_caches` goes by). A folder left by another experiment of the same id (a
        hub that started afresh) is emptied first: an algorithm must never read another
        experiment's data."""
        root = private_dir(self.settings.home / CACHE_DIR)
        folder = root / f"experiment-{int(task.experiment_id)}"
        owner_file = root / f"experiment-{int(task.experiment_id)}.json"
        hub = str(getattr(self.client, "base_url", ""))
        owner = {"hub": hub, "experiment": task.experiment_id, "name": task.experiment_name}
        try:
            known = json.loads(owner_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            known = None
        if known != owner:
            if folder.exists():
                log.info("task %s: experiment %s's cache folder was another's; emptied", task.id, task.experiment_id)
                shutil.rmtree(folder, ignore_errors=True)
            write_atomic(owner_file, json.dumps(owner, sort_keys=True))
        private_dir(folder)
        now = time.time()
        os.utime(folder, (now, now))
        os.utime(owner_file, (now, now))
        return folder

    def task_dir(self, task_id: str) -> Path:
        """``home/work/<task id>``; ids unfit for a file name (``..``, ``/``) are hashed."""
        name = task_id if _SAFE_ID.fullmatch(task_id) else "t-" + sha256(task_id.encode()).hexdigest()[:32]
        return self.settings.work_dir / name

    def _clean(self, task_id: str) -> None:
        """Drop the bulky files of a finished task; its logs and small JSON files stay."""
        task_dir = self.task_dir(task_id)
        for name in (WEIGHTS_FILE, RESULT_WEIGHTS_FILE, MASKED_FILE):
            (task_dir / name).unlink(missing_ok=True)
        shutil.rmtree(task_dir / SCRATCH_DIR, ignore_errors=True)


def prune_caches(root: Path, max_age_s: float = CACHE_MAX_AGE_S, *, now: float | None = None) -> int:
    """Remove the experiment cache folders under ``root`` (and their owner files) whose
    experiment ran no task here for ``max_age_s`` (the folder's own modification time, which
    :meth:`Agent.cache_dir` refreshes at every task); returns how many were removed."""
    now = time.time() if now is None else now
    if not root.is_dir():
        return 0
    removed = 0
    for entry in root.iterdir():
        if not entry.name.startswith("experiment-") or entry.is_symlink():
            continue
        try:
            age = now - entry.stat().st_mtime
        except OSError:
            continue
        if age <= max_age_s:
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
            (root / f"{entry.name}.json").unlink(missing_ok=True)
            removed += 1
        elif entry.suffix == ".json" and not (root / entry.stem).exists():
            entry.unlink(missing_ok=True)
    return removed


def run_agent(settings: SiteSettings) -> None:
    """Run the agent of ``settings`` until SIGTERM or SIGINT (what ``laulima site run`` calls).

    On a signal the agent stops polling, kills a running algorithm (its task resumes at the
    next start), and returns; a second agent on the same home is refused.
    """
    _default_logging()
    stop = threading.Event()
    with open_agent(settings, stop) as agent:

        def on_signal(signum: int, frame: object) -> None:
            log.info("site %s: %s received; stopping", settings.name, signal.Signals(signum).name)
            polling = agent.polling
            agent.request_stop()
            if polling:
                raise _StopPolling

        previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                previous[signum] = signal.signal(signum, on_signal)
        try:
            agent.runner.warm()
            agent.run_forever(stop)
        except _StopPolling:
            pass
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)


@contextlib.contextmanager
def open_agent(settings: SiteSettings, stop: threading.Event, *, runner: TaskRunner | None = None) -> Iterator[Agent]:
    """The agent of ``settings``, built as ``laulima site run`` builds it, holding the site's
    lock (one agent per home) until the block ends; then its fork server and connection close.

    :func:`run_agent` runs it with signal handlers; a process hosting several agents in
    threads (``laulima sim --engine ray``) runs ``agent.runner.warm()`` and
    ``agent.run_forever(stop)`` itself and stops it with :meth:`Agent.request_stop`.
    ``runner``: default, a :class:`TaskRunner` with a fork server, capped at the site's
    ``task_time_limit_s``; whichever runs the tasks, each runs in a process of its own.
    """
    private_dir(settings.home)
    if settings.cert_file is not None:
        _check_certificate_validity(settings)
    with _single_agent(settings.home):
        context = settings.ssl_context()
        verify: Any = context if context is not None else True
        client = HubClient(
            settings.hub_url,
            None if settings.uses_certificate else settings.token,
            backoff_max_s=settings.backoff_max_s,
            attempts=settings.upload_attempts,
            verify=verify,
            stop=stop,
            probe_verify=settings.ssl_context(with_certificate=False) if settings.uses_certificate else None,
        )
        agent = Agent(
            settings,
            client,
            Catalog(settings.home, site=settings.name),
            SiteState(settings.home, keep=settings.keep_tasks),
            runner=runner or TaskRunner(time_limit_cap_s=settings.task_time_limit_s, zygote=True),
            stop=stop,
        )
        try:
            yield agent
        finally:
            agent.runner.close()
            client.close()


@contextlib.contextmanager
def _single_agent(home: Path) -> Iterator[None]:
    """Hold ``home/agent.lock``: two agents on one home would corrupt each other's state."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        yield
        return
    path = home / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise ConfigurationError(
                f"another agent is already running for the site at {home} (pid {other}); stop it first",
                file=str(path),
            ) from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _check_certificate_validity(settings: SiteSettings) -> None:
    """Say early when the site's certificate is about to expire (or has): the hub would refuse it."""
    from cryptography import x509

    assert settings.cert_file is not None
    cert = x509.load_pem_x509_certificate(Path(settings.cert_file).read_bytes())
    days = (cert.not_valid_after_utc.timestamp() - time.time()) / 86400
    renew = f"ask the federation operator for a renewed bundle (`laulima ca renew {settings.name}`)"
    if days < 0:
        raise ConfigurationError(
            f"site {settings.name}: its certificate {settings.cert_file} expired {-days:.0f} days ago and would be "
            f"refused by the hub; {renew}",
            file=str(settings.cert_file),
        )
    if days < 14:
        log.warning("site %s: its certificate expires in %.1f days; %s", settings.name, days, renew)


def _default_logging() -> None:
    """One line per event on stderr, unless the caller (the CLI) configured logging.

    httpx would add a line per request (a poll every few seconds); the agent logs the
    events that matter itself, so httpx speaks only for warnings unless logging is at DEBUG.
    """
    if not logging.getLogger().handlers and not log.handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("httpx", "httpcore"):
        if logging.getLogger(name).level == logging.NOTSET and logging.getLogger().level > logging.DEBUG:
            logging.getLogger(name).setLevel(logging.WARNING)


def _credentials_refused(exc: ProtocolError) -> bool:
    """The hub refused this site itself (certificate or token), not one of its tasks."""
    return isinstance(exc, Forbidden) and exc.context.get("status") == 401


def _closing_reason(record: TaskRecord) -> str:
    """Why a task this agent is done with is over, for the hub: the hub's own words, no site paths."""
    if record.phase != Phase.GIVEN_UP:
        return f"this site has already {record.phase.value} this task and will not run it again"
    note = record.note or "no reason recorded"
    subject = "download of the task's weights" if note.startswith("downloading blob") else "result"
    refusal = note.split("hub answered ", 1)[1] if "hub answered " in note else note.split(": ", 1)[-1]
    if len(refusal) > _REASON_MAX:
        refusal = refusal[: _REASON_MAX - 1] + "…"
    return f"the hub refused this site's {subject}: {refusal}"


def _result_kept(record: TaskRecord) -> bool:
    return bool(record.failure_kind) or (record.result_path is not None and Path(record.result_path).exists())


def _sha(data: bytes) -> str:
    return sha256(data).hexdigest()


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
