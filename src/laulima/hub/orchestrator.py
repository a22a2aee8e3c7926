"""The round loop: opens rounds, closes them at quorum or deadline, checkpoints the global model.

It keeps no state of its own: every tick re-reads the database and asks
:func:`laulima.core.rounds.decide` what an open round needs, so a hub restarted after
kill -9 simply continues. A round's result becomes real in one transaction (the
checkpoint); work done before a crash and not checkpointed is redone identically, because
updates are folded in site-name order from blobs that never change.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np
from sqlalchemy.exc import OperationalError

from laulima.core.crosssite import GLOBAL, MODEL, local_label
from laulima.core.fingerprint import FingerprintMismatch, merge_fingerprints
from laulima.core.privacy.clipping import unflatten
from laulima.core.privacy.messages import MASKED_TENSOR, TaskSecureAggregation
from laulima.core.privacy.quantize import dequantize, error_bound, scale_for
from laulima.core.privacy.secagg import Advertised, RoundContext, unmask
from laulima.core.privacy.tasks import task_privacy, task_secure_aggregation
from laulima.core.protocol import ExperimentStatus, TaskKind, TaskStatus
from laulima.core.rounds import RoundState, RoundView, decide, evaluation_due, failure_note
from laulima.core.spec import MAX_LOCAL_MODELS, MAX_TIMEOUT_S, ExperimentSpec
from laulima.core.strategies import FitResult, NotEnoughResults, Strategy, build_strategy
from laulima.core.strategies._fold import cast_back
from laulima.core.weights import Weights, WeightsSchema, check_weights_finite, safetensors_chunks
from laulima.errors import ConfigurationError, DataError, SecureAggregationError, WeightsError
from laulima.hub.blobstore import BlobStore, experiment_key
from laulima.hub.db import Experiment, Round, SessionFactory, Task, Update
from laulima.hub.leases import Leases, experiment_lease
from laulima.hub.peers import Peers
from laulima.hub.secure_rounds import SECAGG_CONFIG_KEY, SecAggState, SecureRounds, secagg_config
from laulima.hub.service import FINGERPRINT_LABEL, PRIVACY_KEY, FinaleTask, HubService, NewTask, spec_of
from laulima.hub.validation import Source, approval_deadline, open_source, read_into, schema_from, tensor_index

__all__ = ["LazyWeights", "NonFiniteAggregate", "Orchestrator", "store_weights"]

log = logging.getLogger(__name__)

HOUSEKEEPING_LEASE = "housekeeping"
"""The clean-up of unused uploads and orphan blobs: one hub process at a time runs it."""

DEFAULT_MAX_WEIGHT = 10**6
"""A site's weight cap in a masked sum when the sites did not report their cases."""

MAX_ERROR_CHARS = 4000
"""Longest failure text an experiment keeps (every site's reason, cut)."""


class LazyWeights(Mapping[str, np.ndarray]):
    """A stored safetensors file seen as a mapping that reads one tensor per lookup.

    Each lookup reads that tensor into a fresh array the caller owns; nothing else of the
    file is held (not even as mapped pages, which would count towards the hub's resident
    memory), so folding N updates costs the accumulator plus one tensor.
    """

    def __init__(self, source: Source, name: str | None = None) -> None:
        self.name = name or (Path(source).name if isinstance(source, str | Path) else "blob")
        where = f"stored weights {self.name[:12]}"
        self._index, _ = tensor_index(source, where=where)
        self._file: io.RawIOBase | BinaryIO | None = open_source(source)  # closed by close()

    @classmethod
    def from_store(cls, blobs: BlobStore, digest: str) -> LazyWeights:
        """A stored (sealed) blob, read tensor by tensor through its decrypting reader."""
        blobs.size(digest)  # NotFound before anything else
        return cls(lambda: blobs.open(digest), name=digest)

    @property
    def schema(self) -> WeightsSchema:
        return schema_from(self._index)

    def __getitem__(self, key: str) -> np.ndarray:
        loc = self._index[key]
        out = np.empty(loc.shape, dtype=loc.dtype)
        if out.nbytes:
            if self._file is None:
                raise ValueError(f"{self.name}: closed")
            read_into(self._file, out.reshape(-1).view(np.uint8).data, loc.offset)
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class Orchestrator:
    """Drives every running experiment from a daemon thread; ``wake()`` after each result."""

    housekeeping: Callable[[], object] | None = None
    """Called after every pass of the loop; the app sets the clean-up of unused uploads and
    orphan blobs (:meth:`laulima.hub.housekeeping.Housekeeper.run_if_due`: at most once a
    minute, never raises)."""

    def __init__(
        self,
        session_factory: SessionFactory,
        blobs: BlobStore,
        clock: Callable[[], float] = time.time,
        *,
        tick_s: float = 0.5,
        notify: Callable[[Iterable[str]], None] | None = None,
        keep_updates: bool = False,
        service: HubService | None = None,
        recheck_waiting_s: float = 2.0,
        leases: Leases | None = None,
        peers: Peers | None = None,
    ) -> None:
        self.service = service or HubService(session_factory, blobs, clock)
        self.secure = SecureRounds(session_factory, clock)
        self.blobs = blobs
        self.clock = clock
        self.tick_s = tick_s
        self.keep_updates = keep_updates
        self._notify_here = notify or (lambda sites: None)
        self.leases = leases
        """With several hub processes on one database: this process steps only the experiments
        whose lease it holds (hub/leases.py). None: it steps them all (a single process)."""
        self.peers = peers or Peers()
        """The other hub processes: told of new tasks and of results (hub/peers.py)."""
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.recheck_waiting_s = recheck_waiting_s
        self._waiting: dict[int, float] = {}
        """Experiments that could not open their next round (too few sites online), with when
        to look again: a thousand of them must not cost every tick a thousand queries."""

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        if self.leases is not None:
            self.leases.start_renewing()
        self._thread = threading.Thread(target=self._run, name="laulima-orchestrator", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
            if self.leases is not None:  # another process may take over at once, not after expiry
                self.leases.stop_renewing()
                try:
                    self.leases.release()
                except Exception:
                    log.exception("could not release this hub process's leases; they expire by themselves")

    def wake(self, *, sites_changed: bool = False) -> None:
        """A result arrived: look at the rounds now instead of at the next tick (here, and in
        the process that orchestrates its experiment). ``sites_changed``: a site came or went,
        so experiments waiting for sites look again."""
        self.wake_here(sites_changed)
        self.peers.publish_wake(sites_changed=sites_changed)

    def wake_here(self, sites_changed: bool = False) -> None:
        """:meth:`wake` for this process only (what another process's news calls)."""
        if sites_changed:
            self._waiting.clear()
        self._wake.set()

    def _notify(self, sites: Iterable[str]) -> None:
        """New tasks for ``sites``: wake their long polls, here and in the other processes."""
        sites = list(sites)
        self._notify_here(sites)
        self.peers.publish_tasks(sites)

    def _run(self) -> None:
        try:  # catch up on clean-up a killed hub did not finish
            for experiment_id in self.service.experiment_ids():
                self.discard_spent_updates(experiment_id)
        except Exception:
            log.exception("clean-up of spent update blobs failed; continuing")
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self.tick()
            except Exception:  # the database itself failed; try again next tick
                log.exception("orchestrator tick failed; retrying in %.1f s", self.tick_s)
            if self.housekeeping is not None and self._may(HOUSEKEEPING_LEASE):
                self.housekeeping()  # unused uploads and orphan blobs (hub/housekeeping.py)
            self._wake.wait(self.tick_s)

    # -- one pass over all running experiments ----------------------------------------
    def tick(self) -> None:
        self.service.expire_overdue()
        now = time.monotonic()
        running = self._mine(self.service.running_experiment_ids())
        alive = set(running)
        self._waiting = {k: v for k, v in self._waiting.items() if k in alive}
        for experiment_id in running:
            if self._stop.is_set():
                return
            if self._waiting.get(experiment_id, 0.0) > now:
                continue
            try:
                for _ in range(8):  # a checkpoint is followed at once by the next round
                    if not self._still_mine(experiment_id) or not self.step(experiment_id):
                        break
            except OperationalError:
                raise  # the database, not this experiment, is in trouble
            except Exception as exc:
                if not self._still_mine(experiment_id, ask=True):  # another process has it: its state, not ours
                    log.warning("experiment %s: its lease went to another process (%s); left to it", experiment_id, exc)
                    continue
                log.exception("experiment %s failed in the orchestrator", experiment_id)
                self.service.finish_experiment(
                    experiment_id, ExperimentStatus.FAILED, f"hub error: {type(exc).__name__}: {exc}"
                )

    def _still_mine(self, experiment_id: int, *, ask: bool = False) -> bool:
        """Whether this process still orchestrates the experiment (``ask``: from the database)."""
        if self.leases is None:
            return True
        name = experiment_lease(experiment_id)
        if ask:
            return name in self.leases.claim([name])
        return self.leases.holds(name)

    def _mine(self, running: list[int]) -> list[int]:
        """Of the running experiments, those this process orchestrates: all of them, or with
        leases the ones whose lease it holds (taking over those whose holder stopped renewing);
        leases of experiments that ended are given back."""
        if self.leases is None:
            return running
        names = {experiment_lease(i): i for i in running}
        held = self.leases.claim(names)
        ended = [n for n in self.leases.held() if n.startswith("experiment:") and n not in names]
        if ended:
            self.leases.release(ended)
        return [i for name, i in names.items() if name in held]

    def _may(self, lease: str) -> bool:
        """Whether this process does the singleton chore ``lease`` now."""
        if self.leases is None:
            return True
        try:
            return lease in self.leases.claim([lease])
        except Exception:
            log.exception("could not claim the %s lease; skipping it this time", lease)
            return False

    def step(self, experiment_id: int) -> bool:
        """Advance one experiment by one transition; True if something changed."""
        svc = self.service
        with svc.sessions() as s:
            exp = s.get(Experiment, experiment_id)
            if exp is None or exp.status != ExperimentStatus.RUNNING:
                return False
            rnd = svc.open_round_of(s, experiment_id)
            tasks = svc.train_tasks(s, experiment_id, rnd.index) if rnd else []
            updates = svc.round_updates(s, experiment_id, rnd.index) if rnd else []
        spec = spec_of(exp)
        if rnd is not None and spec.secure_aggregation is not None:
            return self._close_secure(exp, spec, rnd, tasks, updates)
        if rnd is not None:
            return self._close_if_due(exp, spec, rnd, tasks, updates)
        if exp.rounds_done < exp.rounds:
            return self._open_next(exp, spec)
        if spec.has_finale:  # evaluate mode, or the cross-site matrix after training
            return self._finale(exp, spec)
        if not svc.evaluations_pending(experiment_id):
            return svc.finish_experiment(experiment_id, ExperimentStatus.COMPLETED)
        return False

    def _open_next(self, exp: Experiment, spec: ExperimentSpec) -> bool:
        index = exp.rounds_done + 1
        sites, left_out = self.service.select_sites(spec.sites)
        if len(sites) < spec.min_sites:
            why = _listed(left_out) or "no site registered"
            note = f"waiting to open round {index}: {len(sites)} site(s) online, min_sites = {spec.min_sites} ({why})"
            if self.service.set_waiting(exp.id, note):
                log.info("experiment %s: %s", exp.id, note)
            self._waiting[exp.id] = time.monotonic() + self.recheck_waiting_s
            return False
        self._waiting.pop(exp.id, None)
        strategy = self._strategy(spec, exp.strategy_state_digest)
        config = {
            "round": index,
            "local_epochs": spec.local_epochs,
            "local_steps": spec.local_steps,
            "seed": spec.seed,
            "params": spec.config,
            "progress": [(index - 1) / exp.rounds, index / exp.rounds],  # for learning-rate schedules
            **strategy.fit_config(index),
        }
        config.update(self._privacy_blocks(spec, sites))
        deadline = self.clock() + spec.round_timeout_s
        # FedDC: a site continues from the model handed to it at the last checkpoint; every other
        # site (any strategy, a new site, one that failed last round) from the global model.
        handed = self.service.handoffs(exp.id, index - 1) if index > 1 else {}
        tasks = [
            NewTask(
                site,
                TaskKind.TRAIN,
                handed.get(site, exp.global_digest),
                config,
                deadline,
                spec.effective_task_timeout_s,
            )
            for site in sites
        ]
        if not self.service.open_round(exp.id, index, sites, tasks, deadline, left_out=left_out):
            return False
        skipped = f" (left out: {_listed(left_out)})" if left_out else ""
        log.info("experiment %s: round %d opened for %s%s", exp.id, index, ", ".join(sites), skipped)
        self._notify(sites)
        return True

    def _close_if_due(
        self, exp: Experiment, spec: ExperimentSpec, rnd: Round, tasks: list[tuple[Task, str]], updates: list[Update]
    ) -> bool:
        completed = {u.site for u in updates}
        failed: dict[str, str] = {}
        deciding: set[str] = set()
        for task, site in tasks:
            if site in completed:
                continue
            if task.status == TaskStatus.FAILED:
                failed[site] = failure_note(task.failure_kind, task.failure_reason)
            elif task.status in (TaskStatus.CANCELLED, TaskStatus.EXPIRED):
                failed[site] = f"{task.status} ({task.failure_reason})"
            elif task.waiting_since is not None:
                deciding.add(site)  # held for its administrator: waited for until the approval deadline
        waiting_for = [site for task, site in tasks if site not in completed and site not in failed]
        failed.update(self.service.gone(waiting_for))  # revoked since the round opened: never coming
        selected = tuple(json.loads(rnd.sites_json))
        view = RoundView(
            index=rnd.index,
            selected=selected,
            completed=frozenset(completed),
            failed=failed,
            deadline=rnd.deadline,
            min_sites=spec.min_sites,
            now=self.clock(),
            deciding=frozenset(deciding - set(failed)),
            approval_deadline=approval_deadline(exp),
        )
        decision = decide(view)
        if decision.state == RoundState.WAIT:
            return False
        if decision.state == RoundState.FAIL:
            return self._fail(exp, rnd, decision.reason, updates)
        chosen = [u for u in updates if u.site in decision.sites]
        try:
            new_digest, state_digest = self._aggregate(spec, rnd, chosen)
            handoffs = self._handoffs(exp, spec, rnd, chosen)
        except (NonFiniteAggregate, NotEnoughResults) as exc:
            return self._fail(exp, rnd, f"round {rnd.index}: {exc}; the previous global model is kept", updates)
        return self._checkpoint(exp, spec, rnd, updates, decision.sites, new_digest, state_digest, handoffs)

    def _checkpoint(
        self,
        exp: Experiment,
        spec: ExperimentSpec,
        rnd: Round,
        updates: list[Update],
        aggregated: Iterable[str],
        new_digest: str,
        state_digest: str | None,
        handoffs: dict[str, tuple[str, str]],
    ) -> bool:
        """Record the round's new model (and its evaluation tasks, FedDC's handoffs) in one go."""
        selected = tuple(json.loads(rnd.sites_json))
        evaluation: list[NewTask] = []
        if evaluation_due(spec, rnd.index):
            deadline = self.clock() + spec.round_timeout_s
            config = {"round": rnd.index, "seed": spec.seed, "params": spec.config}
            evaluation = [
                NewTask(site, TaskKind.EVALUATE, new_digest, config, deadline, spec.effective_task_timeout_s)
                for site in selected
            ]
        ok = self.service.checkpoint_round(
            rnd.id,
            update_ids=[u.id for u in updates],
            global_digest=new_digest,
            state_digest=state_digest,
            evaluation=evaluation,
            handoffs=handoffs,
        )
        if ok:
            log.info("experiment %s: round %d aggregated from %s", exp.id, rnd.index, ", ".join(aggregated))
            if evaluation:
                self._notify(selected)
            self.discard_spent_updates(exp.id)
        return ok

    # -- secure aggregation: the round's phases, then the unmasked sum -----------------------
    def _privacy_blocks(self, spec: ExperimentSpec, sites: list[str]) -> dict[str, object]:
        """What a TRAIN task carries for privacy and secure aggregation (service.py turns the
        two entries into ``TaskPublic.privacy`` and ``.secure_aggregation``)."""
        blocks: dict[str, object] = {}
        privacy = task_privacy(spec)
        if privacy is not None:
            blocks[PRIVACY_KEY] = privacy.model_dump(mode="json")
        if spec.secure_aggregation is not None:
            max_weight = self._weight_bound(spec, sites)
            secagg = task_secure_aggregation(spec, len(sites), max_weight)
            assert secagg is not None
            blocks[SECAGG_CONFIG_KEY] = secagg.model_dump(mode="json")
        return blocks

    def _weight_bound(self, spec: ExperimentSpec, sites: list[str]) -> int:
        """The most a site may weigh in a masked sum: the cases the round's sites reported (the
        bound the hub applies to sample counts anyway), or the spec's cap, or 10^6."""
        reported = [self.service.reported_cases(site, spec.dataset) for site in sites]
        bounds = [n for n in reported if n is not None]
        bound = max(bounds) if bounds and len(bounds) == len(reported) else DEFAULT_MAX_WEIGHT
        if spec.max_samples_per_site is not None:
            bound = min(bound, spec.max_samples_per_site)
        return max(1, bound)

    def _close_secure(
        self, exp: Experiment, spec: ExperimentSpec, rnd: Round, tasks: list[tuple[Task, str]], updates: list[Update]
    ) -> bool:
        """Advance the round's secure aggregation by a phase; at its end, unmask and checkpoint."""
        config = next((c for c in (secagg_config(t) for t, _ in tasks) if c is not None), None)
        if config is None:  # a round opened before the spec had secure aggregation: cannot be
            return self._fail(exp, rnd, f"round {rnd.index}: its tasks carry no secure aggregation", updates)
        state, changed = self.secure.step(
            exp.id,
            rnd.index,
            selected=json.loads(rnd.sites_json),
            threshold=config.threshold,
            round_deadline=rnd.deadline,
            phase_timeout_s=config.phase_timeout_s,
        )
        if state.phase == "aborted":
            return self._abort(exp, rnd, state.reason)
        if state.phase != "done":
            if changed:
                log.info("experiment %s: round %d secure aggregation at %s", exp.id, rnd.index, state.phase)
                self._notify(json.loads(rnd.sites_json))
            return changed
        survivors = set(state.survivors or ())
        chosen = [u for u in updates if u.site in survivors]
        try:
            new_digest, state_digest = self._aggregate_masked(spec, rnd, chosen, state, config)
        except (DataError, ConfigurationError) as exc:  # what the sites sent cannot be unmasked (incl.
            # SecureAggregationError, NonFiniteAggregate, NotEnoughResults): this round only, never the experiment
            return self._abort(exp, rnd, f"round {rnd.index}: {exc}")
        ok = self._checkpoint(exp, spec, rnd, updates, sorted(survivors), new_digest, state_digest, {})
        if ok:
            self.secure.forget(exp.id, rnd.index)
        return ok

    def _abort(self, exp: Experiment, rnd: Round, reason: str) -> bool:
        closed = self.service.abort_round(rnd.id, reason)
        if closed:
            log.warning("experiment %s: %s", exp.id, reason)
            self.secure.forget(exp.id, rnd.index)
            self.discard_spent_updates(exp.id)
            self._notify(json.loads(rnd.sites_json))
        return closed

    def _aggregate_masked(
        self,
        spec: ExperimentSpec,
        rnd: Round,
        updates: list[Update],
        state: SecAggState,
        config: TaskSecureAggregation,
    ) -> tuple[str, str | None]:
        """Hand the strategy the unmasked weighted mean as one result: FedAvg returns it, FedProx
        too (its proximal term acts at the sites), FedAdam / FedYogi step along it; store it."""
        global_w = LazyWeights.from_store(self.blobs, rnd.global_in_digest)
        try:
            average = self._unmasked_average(spec, rnd, global_w, updates, state, config)
            result = FitResult(site="secure aggregate", weights=average, n_samples=1)
            new, strategy_state = self._apply_strategy(spec, rnd, global_w, [result])
        finally:
            global_w.close()
        return self._store_model(rnd, new, strategy_state)

    def _unmasked_average(
        self,
        spec: ExperimentSpec,
        rnd: Round,
        global_w: LazyWeights,
        updates: list[Update],
        state: SecAggState,
        config: TaskSecureAggregation,
    ) -> Weights:
        """The weighted mean of the survivors' models, from their masked updates: sum them
        modulo 2^32, remove the masks with the answered shares, dequantise, divide by the
        total weight and add the global model the round started from."""
        schema = global_w.schema
        keys = sorted(schema)
        length = sum(int(np.prod(schema[k].shape)) for k in keys)
        total = np.zeros(length, dtype=np.uint32)
        weight = 0
        for u in sorted(updates, key=lambda u: u.site):
            masked = LazyWeights.from_store(self.blobs, u.digest)
            try:
                np.add(total, np.asarray(masked[MASKED_TENSOR]).view(np.uint32), out=total)
            finally:
                masked.close()
            weight += config.max_weight if config.max_weight == 1 else u.n_samples
        ads, answers = self.secure.material(rnd.experiment_id, rnd.index)
        roster = [
            Advertised(
                site=site,
                encryption_key=base64.b64decode(ads[site].encryption_key),
                masking_key=base64.b64decode(ads[site].masking_key),
            )
            for site in sorted(state.roster or ())
        ]
        context = RoundContext(
            experiment=rnd.experiment_id,
            round=rnd.index,
            threshold=state.threshold,
            neighbours=config.neighbours,
        )
        summed = unmask(
            total,
            context,
            roster,
            shared=list(state.shared or ()),
            survivors=[u.site for u in sorted(updates, key=lambda u: u.site)],
            reveals=answers,
        )
        scale = scale_for(config.bound, config.sites)
        mean = dequantize(summed, scale) / float(weight)
        if spec.privacy is None:
            _check_within_clip(mean, config.clip, error_bound(scale, config.sites) / weight)
        delta = unflatten(mean, {k: schema[k].shape for k in keys})
        # In the model's dtypes (integer buffers rounded), as any site's model would be.
        return {
            k: cast_back(np.asarray(global_w[k], dtype=np.float64) + delta[k], np.dtype(schema[k].dtype)) for k in keys
        }

    # -- after training: local-only models, the cross-site matrix; or evaluate mode --------
    def _finale(self, exp: Experiment, spec: ExperimentSpec) -> bool:
        """One transition of what follows the rounds, re-derived from the labelled tasks of
        round ``rounds + 1`` (so a restarted hub continues where it stopped):

        1. no labelled task yet: create the first step's tasks — evaluate mode: one EVALUATE
           task per selected site on the given model; ``local_models``: one TRAIN task per
           participating site from the initial weights; otherwise the cross-site evaluations;
        2. local models all settled, no evaluation yet: evaluate the global model and every
           local model that arrived at every participating site;
        3. nothing open any more: complete — or, in evaluate mode with no result at all, fail
           with the sites' reasons.
        """
        svc, index = self.service, spec.final_index
        svc.expire_overdue_finale(exp.id, index)
        tasks = svc.finale_tasks(exp.id, index)
        if spec.mode == "fingerprint":
            return self._fingerprint(exp, spec, index, tasks)
        if not tasks:
            return self._open_finale(exp, spec, index)
        local = [t for t in tasks if t.kind == TaskKind.TRAIN]
        evaluations = [t for t in tasks if t.kind == TaskKind.EVALUATE]
        if any(t.open for t in local):
            return False
        if not evaluations:
            models = {t.model: t.update_digest for t in local if t.status == TaskStatus.COMPLETED and t.update_digest}
            return self._open_cross_site(exp, spec, index, sorted({t.site for t in local}), models)
        if any(t.open for t in evaluations) or svc.evaluations_pending(exp.id):
            return False  # (``tasks`` was read before: the reasons below must come from settled tasks)
        if spec.mode == "evaluate" and not any(t.status == TaskStatus.COMPLETED for t in evaluations):
            reasons = _listed({t.site: t.failure or str(t.status) for t in evaluations})
            return svc.finish_experiment(
                exp.id, ExperimentStatus.FAILED, f"no site evaluated the model: {reasons}"[:MAX_ERROR_CHARS]
            )
        missing = [t for t in tasks if t.failure]
        if missing:
            log.warning(
                "experiment %s: completed without %s", exp.id, "; ".join(f"{t.model}@{t.site}" for t in missing)
            )
        return svc.finish_experiment(exp.id, ExperimentStatus.COMPLETED)

    def _fingerprint(self, exp: Experiment, spec: ExperimentSpec, index: int, tasks: list[FinaleTask]) -> bool:
        """One transition of a fingerprint-mode experiment, re-derived from its tasks:

        1. no task yet: one FINGERPRINT task per selected site (on the empty model);
        2. any still open: wait (they expire at their deadline);
        3. then merge the fingerprints that arrived and complete, storing the merge — or fail:
           with every site's reason when none arrived, with the mismatch when the sites'
           datasets differ in channels or labels.
        """
        svc = self.service
        if not tasks:
            sites, left_out = svc.select_sites(spec.sites)
            if not self._enough(exp, sites, left_out, spec.min_sites, "compute the dataset fingerprint"):
                return False
            deadline = self.clock() + spec.round_timeout_s
            config = {"round": index, "seed": spec.seed, "params": spec.config}
            limit = spec.effective_task_timeout_s
            new = [
                NewTask(site, TaskKind.FINGERPRINT, exp.global_digest, config, deadline, limit, FINGERPRINT_LABEL)
                for site in sites
            ]
            return self._create(exp, index, TaskKind.FINGERPRINT, new)
        if any(t.open for t in tasks) or svc.evaluations_pending(exp.id):
            return False  # (``tasks`` was read before: the reasons below must come from settled tasks)
        parts = svc.fingerprint_parts(exp.id)
        missing = {t.site: t.failure or str(t.status) for t in tasks if t.site not in parts}
        if not parts:
            return svc.finish_experiment(
                exp.id,
                ExperimentStatus.FAILED,
                f"no site computed its dataset fingerprint: {_listed(missing)}"[:MAX_ERROR_CHARS],
            )
        try:
            merged = merge_fingerprints(parts)
        except FingerprintMismatch as exc:
            also = f" (no fingerprint from {_listed(missing)})" if missing else ""
            return svc.finish_experiment(
                exp.id,
                ExperimentStatus.FAILED,
                f"the sites' fingerprints cannot be merged: {exc}{also}"[:MAX_ERROR_CHARS],
            )
        if missing:
            log.warning("experiment %s: fingerprint merged without %s", exp.id, _listed(missing))
        done = svc.complete_fingerprint(exp.id, merged, sorted(parts))
        if done:
            log.info("experiment %s: fingerprint of %d cases merged from %s", exp.id, merged.n_cases, ", ".join(parts))
        return done

    def _open_finale(self, exp: Experiment, spec: ExperimentSpec, index: int) -> bool:
        if spec.mode == "evaluate":
            sites, left_out = self.service.select_sites(spec.sites)
            if not self._enough(exp, sites, left_out, spec.min_sites, "evaluate the model"):
                return False
            return self._create(
                exp, index, TaskKind.EVALUATE, self._evaluations(spec, index, sites, {MODEL: exp.global_digest})
            )
        rounds_of = self.service.participating_sites(exp.id)
        participants = sorted(rounds_of)
        if not spec.evaluation.local_models or len(participants) > MAX_LOCAL_MODELS:
            if spec.evaluation.local_models:
                log.warning(
                    "experiment %s: %d participating sites, more than the %d local models a matrix may hold; "
                    "only the global model is evaluated",
                    exp.id,
                    len(participants),
                    MAX_LOCAL_MODELS,
                )
            return self._open_cross_site(exp, spec, index, participants, {})
        sites, left_out = self.service.select_sites(participants)
        quorum = min(spec.min_sites, len(participants))
        if not self._enough(exp, sites, left_out, quorum, "train the local-only models"):
            return False
        now = self.clock()
        tasks = []
        for site in sites:
            n = max(1, rounds_of[site])
            config = {
                "round": index,
                "local_epochs": n * spec.local_epochs,
                "local_steps": n * spec.local_steps,
                "seed": spec.seed,
                "params": spec.config,
                "progress": [0.0, 1.0],  # a whole training in one task
                "local_model": True,  # the site's policy decides whether such a model may leave it
            }
            deadline = now + min(n * spec.round_timeout_s, MAX_TIMEOUT_S)
            limit = min(n * spec.effective_task_timeout_s, MAX_TIMEOUT_S)
            tasks.append(NewTask(site, TaskKind.TRAIN, exp.initial_digest, config, deadline, limit, local_label(site)))
        return self._create(exp, index, TaskKind.TRAIN, tasks)

    def _open_cross_site(
        self, exp: Experiment, spec: ExperimentSpec, index: int, participants: list[str], local: Mapping[str, str]
    ) -> bool:
        """Every model (the final global one, and the local-only ones that arrived) at every
        participating site that is online now."""
        if not participants:  # nothing was aggregated (cannot happen after a successful round)
            return self.service.finish_experiment(exp.id, ExperimentStatus.COMPLETED)
        sites, left_out = self.service.select_sites(participants)
        quorum = min(spec.min_sites, len(participants))
        if not self._enough(exp, sites, left_out, quorum, "run the cross-site evaluation"):
            return False
        models = {GLOBAL: exp.global_digest, **{m: local[m] for m in sorted(local)}}
        return self._create(exp, index, TaskKind.EVALUATE, self._evaluations(spec, index, sites, models))

    def _evaluations(
        self, spec: ExperimentSpec, index: int, sites: list[str], models: Mapping[str, str]
    ) -> list[NewTask]:
        """One EVALUATE task per model and site. The config is the same for every model: which
        hospital's local model a site evaluates is known to the hub only (``Task.model``)."""
        deadline = self.clock() + spec.round_timeout_s
        config = {"round": index, "seed": spec.seed, "params": spec.config}
        return [
            NewTask(site, TaskKind.EVALUATE, digest, config, deadline, spec.effective_task_timeout_s, model)
            for model, digest in models.items()
            for site in sites
        ]

    def _enough(self, exp: Experiment, sites: list[str], left_out: Mapping[str, str], quorum: int, what: str) -> bool:
        if len(sites) >= quorum and sites:
            self._waiting.pop(exp.id, None)
            return True
        why = _listed(left_out) or "no site registered"
        note = f"waiting to {what}: {len(sites)} site(s) online, {max(quorum, 1)} needed ({why})"
        if self.service.set_waiting(exp.id, note):
            log.info("experiment %s: %s", exp.id, note)
        self._waiting[exp.id] = time.monotonic() + self.recheck_waiting_s
        return False

    def _create(self, exp: Experiment, index: int, kind: TaskKind, tasks: list[NewTask]) -> bool:
        if not self.service.open_finale(exp.id, index, kind, tasks):
            return False
        sites = sorted({t.site for t in tasks})
        models = sorted({t.model or "" for t in tasks})
        log.info("experiment %s: %s tasks for %s at %s", exp.id, kind, ", ".join(models), ", ".join(sites))
        self._notify(sites)
        return True

    def _fail(self, exp: Experiment, rnd: Round, reason: str, updates: list[Update]) -> bool:
        """Fail the round (and its experiment) unless an update arrived since ``updates``
        were read; then the next step decides again."""
        closed = self.service.fail_round(rnd.id, reason, update_ids=[u.id for u in updates])
        if closed:
            log.warning("experiment %s: %s", exp.id, reason)
            self.discard_spent_updates(exp.id)
        return closed

    def discard_spent_updates(self, experiment_id: int) -> int:
        """Delete update blobs of closed rounds (unless ``keep_updates``); their digests,
        sample counts and metrics stay in the database. Idempotent, so a hub killed between
        checkpoint and clean-up catches up at the next checkpoint or start.

        The spent digests are every closed round's, most of them removed at earlier
        checkpoints: those already gone cost an existence check, not a delete (whose
        database check per digest made each checkpoint slower by sites x rounds)."""
        if self.keep_updates:
            return 0
        spent = self.service.spent_update_digests(experiment_id)
        removed = sum(self.blobs.delete(d) for d in spent if self.blobs.exists(d))
        if removed:
            log.debug("experiment %s: %d spent update blobs removed", experiment_id, removed)
        return removed

    def _aggregate(self, spec: ExperimentSpec, rnd: Round, updates: list[Update]) -> tuple[str, str | None]:
        """Fold the updates (ordered by site name) into the next global model; store it."""
        opened: list[LazyWeights] = []
        try:
            global_w = LazyWeights.from_store(self.blobs, rnd.global_in_digest)
            opened.append(global_w)
            results = []
            for u in sorted(updates, key=lambda u: u.site):
                weights = LazyWeights.from_store(self.blobs, u.digest)
                opened.append(weights)
                results.append(FitResult(site=u.site, weights=weights, n_samples=u.n_samples))
            new, state = self._apply_strategy(spec, rnd, global_w, results)
        finally:
            for w in opened:
                w.close()
        return self._store_model(rnd, new, state)

    def _apply_strategy(
        self, spec: ExperimentSpec, rnd: Round, global_w: LazyWeights, results: list[FitResult]
    ) -> tuple[Weights, Weights]:
        """The strategy's new model (checked: the global model's schema, finite) and its state."""
        strategy = self._strategy(spec, rnd.strategy_state_digest)
        new = _conform(strategy.aggregate(global_w, results), global_w.schema)
        _check_finite_aggregate(new, [r.site for r in results])
        return new, strategy.state_dict()

    def _store_model(self, rnd: Round, new: Weights, state: Weights) -> tuple[str, str | None]:
        key = experiment_key(rnd.experiment_id)
        digest = store_weights(self.blobs, new, key_id=key)
        state_digest = store_weights(self.blobs, state, key_id=key) if state else None
        return digest, state_digest

    def _handoffs(
        self, exp: Experiment, spec: ExperimentSpec, rnd: Round, updates: list[Update]
    ) -> dict[str, tuple[str, str]]:
        """FedDC: receiver -> (sender, digest of the sender's model) for the next round; empty
        when everyone continues from the new global model, or no round follows.

        The sender's update is stored again without its metadata (the sender's sample count,
        metrics and task id are not the receiver's business); the copy is content-addressed,
        so a hub that redoes this after a crash writes the same blob. Memory: one model."""
        if rnd.index >= exp.rounds:
            return {}
        by_site = {u.site: u for u in updates}
        plan = build_strategy(spec.strategy, seed=spec.seed).handoff(rnd.index, sorted(by_site))
        if not plan:
            return {}
        strays = sorted({*plan, *plan.values()} - set(by_site))
        if strays:
            raise WeightsError(
                f"handoff: the strategy named sites without an update this round: {strays[:5]}", where="handoff"
            )
        copies: dict[str, str] = {}
        for sender in sorted(set(plan.values())):
            weights = LazyWeights.from_store(self.blobs, by_site[sender].digest)
            try:
                copies[sender] = store_weights(self.blobs, weights, key_id=experiment_key(rnd.experiment_id))
            finally:
                weights.close()
        moves = ", ".join(f"{receiver} <- {sender}" for receiver, sender in sorted(plan.items()) if receiver != sender)
        if moves:
            log.info("experiment %s: after round %d models pass on: %s", exp.id, rnd.index, moves)
        return {receiver: (sender, copies[sender]) for receiver, sender in plan.items()}

    def _strategy(self, spec: ExperimentSpec, state_digest: str | None) -> Strategy:
        strategy = build_strategy(spec.strategy, seed=spec.seed)
        if state_digest is not None:
            state = LazyWeights.from_store(self.blobs, state_digest)
            try:
                strategy.load_state_dict({k: state[k] for k in state})
            finally:
                state.close()
        return strategy


def store_weights(blobs: BlobStore, weights: Mapping[str, np.ndarray], *, key_id: str | None = None) -> str:
    """Write ``weights`` as a safetensors blob, tensor by tensor: no second copy of the model
    is built in memory. ``key_id``: the experiment's key (default: the uploads key)."""
    with blobs.writer(key_id) if key_id else blobs.writer() as writer:
        for chunk in safetensors_chunks(weights):
            writer.write(chunk)
        digest, _ = writer.commit()
    return digest


def _listed(reasons: Mapping[str, str]) -> str:
    """``site: why; site: why`` in site order."""
    return "; ".join(f"{site}: {why}" for site, why in sorted(reasons.items()))


class NonFiniteAggregate(WeightsError):
    """The strategy produced NaN or Inf from the round's updates; nothing is checkpointed."""


def _check_finite_aggregate(weights: Mapping[str, np.ndarray], sites: list[str]) -> None:
    try:
        check_weights_finite(weights, where=f"the aggregate of the updates from {', '.join(sites)}")
    except WeightsError as exc:
        raise NonFiniteAggregate(
            f"{exc.message} (updates of extreme magnitude; bound them with the spec's max_update_norm)",
            where="aggregate",
        ) from exc


def _check_within_clip(mean: np.ndarray, clip: float, quantisation: float) -> None:
    """Without noise the mean step is a weighted mean of steps clipped to ``clip``, so its norm
    is at most ``clip`` (plus quantisation). More means a site masked a vector outside its
    bound or answered the unmasking with a wrong share: the sum cannot be trusted."""
    norm = float(np.linalg.norm(mean))
    limit = clip + quantisation * math.sqrt(mean.size)
    if norm > limit * (1 + 1e-9):
        raise SecureAggregationError(
            f"the unmasked mean step has L2 norm {norm:.6g}, above the clip bound {clip:g} every site applies: a "
            "site masked a vector outside its bound or sent a wrong share; the sum is not used",
            norm=norm,
        )


def _c_order(arr: np.ndarray) -> np.ndarray:
    """C-contiguous, keeping 0-d arrays 0-d (``np.ascontiguousarray`` makes them 1-d)."""
    arr = np.asarray(arr)
    return arr if arr.flags.c_contiguous else arr.copy(order="C")


def _conform(new: Mapping[str, np.ndarray], schema: WeightsSchema) -> Weights:
    """The new global model keeps the old one's keys, shapes and dtypes (a strategy may compute
    in float64); anything else is a strategy bug that must not reach the sites."""
    extra = sorted(set(new) - set(schema))
    if extra:
        raise WeightsError(f"aggregate: the strategy returned unknown tensors {extra[:5]}", where="aggregate")
    out: Weights = {}
    for name, spec in schema.items():
        if name not in new:
            raise WeightsError(f"aggregate: the strategy's result lacks tensor {name!r}", where="aggregate")
        arr = np.asarray(new[name])
        if arr.shape != spec.shape:
            raise WeightsError(
                f"aggregate: tensor {name!r} has shape {list(arr.shape)}, expected {list(spec.shape)}",
                where="aggregate",
            )
        out[name] = _c_order(arr.astype(spec.dtype, copy=False))
    return out
