"""Stateful fuzzing of a real hub over mutual TLS (Hypothesis' ``RuleBasedStateMachine``).

The OpenAPI fuzzer (test_openapi_fuzz.py) sends each operation on its own, so it never
holds an open task with its nonce or a stored model: the upload, evaluation and failure
paths stay out of its reach. Here a scientist and three sites drive one hub, served by
uvicorn with mutual TLS on a loopback port, through whole experiments: weights uploaded
(valid and hostile safetensors), experiments submitted (valid and mutated specs, NaN and
huge numbers as raw JSON text), tasks polled with their real nonces, updates sent (valid;
damaged headers, wrong shapes and dtypes, NaN, odd n_samples and metrics, truncated
bodies, another task's nonce, replays), evaluations and failures posted, blobs read by
digest, experiments cancelled.

After every step: no answer is 5xx and every JSON answer is strict JSON; every refused
result of a task is in its experiment's refusals; no task has two accepted results and
the hub's metrics hold exactly the results it accepted; the experiment list and the
sites' polls keep answering. The steps run are counted in pytest's terminal summary.

Draws never depend on the hub's answers (Hypothesis replays draws, not the hub): a rule
draws plain choices, such as "the sending site's newest task" or "index 17", and only
then resolves them against what the hub said. Shrinking is off for the same reason; a
failure shows the request and the answer that broke the invariant.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test
from safetensors.numpy import load as load_safetensors

from laulima.core.protocol import Header, TaskKind
from laulima.core.weights import to_safetensors
from laulima.hub.service import MAX_REFUSALS_PER_TASK
from tests.security.conftest import TLSHub, start_tls_hub
from tests.security.fuzz_counter import OUTCOMES, STEPS
from tests.security.hostile import (
    MODEL_RECIPES,
    Payload,
    UpdateRecipe,
    failure_texts,
    hostile_evaluations,
    hostile_weights,
    make_model,
    site_reports,
    spec_texts,
    update_recipes,
    valid_evaluations,
    valid_weights,
    weights_bodies,
)

MAX_EXAMPLES = 30
STEPS_PER_EXAMPLE = 30
SITES = ["site-a", "site-b", "site-c"]
JSON = {"Content-Type": "application/json"}
OCTETS = {"Content-Type": "application/octet-stream"}
MADE_UP_TASKS = ["0" * 32, "0123456789abcdef" * 2, "x", "A" * 32, "%2e%2e", "a" * 500]
MADE_UP_DIGESTS = ["0" * 64, "0123456789abcdef" * 4, "A" * 64, "abc", "%00" * 3]
INDEX = st.integers(0, 2**16)
MAX_ROW_ID = 2**31 - 1
"""The largest id a path may name (32-bit on PostgreSQL); larger ones are refused with 422."""
"""A choice among things the hub created (tasks, blobs), resolved modulo their number."""

T = TypeVar("T")


def pick(items: Sequence[T], index: int) -> T | None:
    return items[index % len(items)] if items else None


@dataclass(frozen=True)
class SeenTask:
    """A task as its site received it from ``GET /tasks/next``."""

    id: str
    site: str
    kind: str
    experiment_id: int
    round: int
    nonce: str
    weights_digest: str


@dataclass
class Federation:
    """The hub and its callers, shared by every example (the hub keeps its state)."""

    hub: TLSHub
    scientist: httpx.Client
    operator: httpx.Client
    sites: dict[str, httpx.Client]


# What the hub accepted and refused, per task, over the whole module (tasks outlive examples).
ACCEPTED: Counter[str] = Counter()
REFUSED: Counter[str] = Counter()
ACCEPTED_METRICS: Counter[tuple[int, int, str, str]] = Counter()
"""(experiment, round, site, kind) of every accepted update and evaluation."""

RECENT: deque[str] = deque(maxlen=4)
"""The last requests and the status of their answers, for the report of a failure that
is not a status (a dropped connection, an unparseable answer)."""


def _request_line(req: httpx.Request) -> str:
    wanted = ("content-type", Header.UPLOAD_NONCE.lower(), Header.CONTENT_SHA256.lower())
    shown = {k: v for k, v in req.headers.items() if k.lower() in wanted}
    try:
        body = f"body({len(req.content)} B)={req.content[:2000]!r}"
    except httpx.RequestNotRead:
        body = "body streamed (chunked)"
    return f"{req.method} {req.url.raw_path.decode()} headers={shown} {body}"


def _record_request(request: httpx.Request) -> None:
    RECENT.append(f"{_request_line(request)} -> (no answer)")


def _record_response(response: httpx.Response) -> None:
    RECENT[-1] = f"{_request_line(response.request)} -> {response.status_code} {response.headers.get('content-type')}"


class ErrorLog(logging.Handler):
    """Errors the hub logs: an unexpected exception in a request (the 500 handler, uvicorn)
    or in the orchestrator's thread, where no HTTP status would show it."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))


ERRORS = ErrorLog()
LOGGERS = ("laulima", "uvicorn.error")


FAILURES: list[str] = []
"""Every invariant that failed, first first: Hypothesis re-runs a failing example to report
it, but the hub is not replayed, so the re-run may fail elsewhere (reported as flaky)."""


def check(condition: bool, message: object) -> None:
    """``assert``, remembering the failure for the report."""
    if not condition:
        FAILURES.append(str(message))
        raise AssertionError(message)


def describe(response: httpx.Response) -> str:
    """The request and the answer, enough to reproduce a failure by hand."""
    return f"{_request_line(response.request)}\n-> {response.status_code} {response.text[:2000]}"


def _no_constants(token: str) -> Any:
    raise ValueError(f"{token} is not JSON (RFC 8259)")


def answered(response: httpx.Response, *allowed: int) -> httpx.Response:
    """No 5xx; ``allowed`` statuses or any 4xx; a JSON answer must be strict JSON."""
    status = response.status_code
    check(status < 500, f"hub failed: {describe(response)}")
    check(status in allowed or 400 <= status < 500, f"unexpected status: {describe(response)}")
    if response.content and response.headers.get("content-type", "").startswith("application/json"):
        try:
            json.loads(response.text, parse_constant=_no_constants)
        except ValueError as exc:
            check(False, f"the answer is not strict JSON ({exc}): {describe(response)}")
    return response


def _bounded(response: httpx.Response) -> bool:
    """A valid update refused by a bound the hub was told about: the spec's
    ``max_update_norm`` or ``max_samples_per_site``, or the cases the site reported."""
    bounds = ("max_update_norm", "max_samples_per_site", "reported for dataset")
    return response.status_code == 422 and any(b in response.text for b in bounds)


class HubMachine(RuleBasedStateMachine):
    """One scientist and three sites, acting in any order, honest or not."""

    fed: ClassVar[Federation]

    def __init__(self) -> None:
        super().__init__()
        self.tasks: dict[str, SeenTask] = {}
        """Every task a site received, in the order they were first seen."""
        self.experiments: list[int] = []
        self.blobs: list[str] = []
        self.models: dict[str, dict[str, np.ndarray] | None] = {}
        self.accepted_bodies: list[bytes] = []
        self.touched: set[int] = set()
        self.turn = 0

    # -- helpers ----------------------------------------------------------------------
    def _poll(self, site: str) -> SeenTask | None:
        response = answered(self.fed.sites[site].get("/tasks/next", params={"wait": 0}), 200, 204)
        check(response.status_code in (200, 204), f"a site's poll must keep working: {describe(response)}")
        if response.status_code == 204:
            return None
        task = response.json()
        seen = SeenTask(
            task["id"],
            site,
            task["kind"],
            task["experiment_id"],
            task["round"],
            task["upload_nonce"],
            task["weights_digest"],
        )
        old = self.tasks.get(seen.id)
        check(old is None or old == seen, f"task {seen.id} changed between deliveries: {old} -> {seen}")
        self.tasks[seen.id] = seen
        return seen

    def _model_of(self, task: SeenTask) -> dict[str, np.ndarray] | None:
        """The task's global model as its site downloads it (None: not a safetensors file)."""
        if task.weights_digest not in self.models:
            response = answered(self.fed.sites[task.site].get(f"/blobs/{task.weights_digest}"), 200)
            model = None
            if response.status_code == 200:
                check(hashlib.sha256(response.content).hexdigest() == task.weights_digest, describe(response))
                try:
                    model = dict(load_safetensors(response.content))
                except Exception:  # a hostile initial model the hub let through: no valid update fits it
                    model = None
            self.models[task.weights_digest] = model
        return self.models[task.weights_digest]

    def _task(self, which: str, index: int, kind: str) -> tuple[str, SeenTask | None]:
        """Resolve a drawn choice: a site's newest task of ``kind``, any task, or a made-up id."""
        if which == "made up":
            return MADE_UP_TASKS[index % len(MADE_UP_TASKS)], None
        newest = {t.site: t for t in self.tasks.values() if t.kind == kind}
        candidates = list(newest.values()) if which == "current" and newest else list(self.tasks.values())
        task = pick(candidates, index)
        return (task.id, task) if task else (MADE_UP_TASKS[0], None)

    def _result(
        self, task_id: str, task: SeenTask | None, response: httpx.Response, *, ok: int, sender: str, metric: str | None
    ) -> None:
        """Book-keeping for the answer to a task's result (``metric``: the kind of metric
        record an accepted one adds), and the refusal invariant."""
        answered(response, ok)
        endpoint = response.request.url.path.rsplit("/", 1)[-1]
        OUTCOMES[f"{endpoint} {'accepted' if response.status_code == ok else response.status_code}"] += 1
        if task is None:
            return
        self.touched.add(task.experiment_id)
        if response.status_code == ok:
            ACCEPTED[task_id] += 1
            check(ACCEPTED[task_id] == 1, f"task {task_id} has a second accepted result: {describe(response)}")
            check(sender == task.site, f"site {sender} had a result accepted for {task.site}'s task")
            if metric is not None:
                ACCEPTED_METRICS[(task.experiment_id, task.round, task.site, metric)] += 1
            return
        if response.status_code == 429:  # a rate limit (set high here): nothing was read, nothing refused
            return
        REFUSED[task_id] += 1
        refusals = answered(self.fed.scientist.get(f"/experiments/{task.experiment_id}/refusals"), 200)
        check(refusals.status_code == 200, describe(refusals))
        mine = [r for r in refusals.json() if r["task_id"] == task_id]
        check(
            len(mine) == min(REFUSED[task_id], MAX_REFUSALS_PER_TASK),
            f"refused result not in the experiment's refusals ({len(mine)} recorded, {REFUSED[task_id]} refused): "
            f"{describe(response)}",
        )
        if REFUSED[task_id] <= MAX_REFUSALS_PER_TASK:
            check((mine[-1]["status"], mine[-1]["site"]) == (response.status_code, sender), mine[-1])

    def _send_update(
        self, sender: str, task_id: str, body: bytes, headers: dict[str, str], *, chunked: bool = False
    ) -> httpx.Response:
        """PUT the update; ``chunked``: streamed in pieces of 1000 bytes, without a Content-Length."""
        content: bytes | Iterator[bytes] = body
        if chunked:
            content = iter([body[i : i + 1000] for i in range(0, len(body), 1000)])
        path = f"/tasks/{task_id}/update"
        response = self.fed.sites[sender].put(path, content=content, headers={**OCTETS, **headers})
        if response.status_code == 200:
            self.accepted_bodies.append(body)
        # As an agent does: ask for the next task at once, on the same kept-alive connection,
        # whether the upload was accepted or refused (maybe before its body was read).
        self._poll(sender)
        return response

    # -- the scientist ----------------------------------------------------------------
    @initialize(model=MODEL_RECIPES, round_timeout_s=st.sampled_from([2.0, 30.0]))
    def start_an_experiment(self, model: tuple[int, int], round_timeout_s: float) -> None:
        """Every example starts with a valid experiment on all three sites and their first
        tasks delivered, so the sites' rules have real tasks and nonces from the first step."""
        STEPS["start experiment"] += 1
        blob = answered(self.fed.scientist.put("/blobs", content=to_safetensors(make_model(*model))), 201)
        check(blob.status_code == 201, describe(blob))
        spec = {
            "name": "fuzz-valid",
            "algorithm": "laulima.algorithms.identity:Identity",
            "dataset": "d",
            "sites": SITES,
            "rounds": 2,
            "round_timeout_s": round_timeout_s,
            "evaluation": {"every": 1, "final": True},
        }
        body = {"spec": spec, "initial_weights": blob.json()["digest"]}
        created = answered(self.fed.scientist.post("/experiments", json=body), 201)
        check(created.status_code == 201, describe(created))
        self.blobs.append(blob.json()["digest"])
        self.experiments.append(created.json()["id"])
        for site in SITES:
            self._poll(site)

    @rule(body=weights_bodies())
    def upload_weights(self, body: Payload) -> None:
        STEPS["upload weights"] += 1
        response = answered(self.fed.scientist.put("/blobs", content=body.data), 201)
        if response.status_code == 201:
            check(response.json()["digest"] == hashlib.sha256(body.data).hexdigest(), describe(response))
            self.blobs.append(response.json()["digest"])

    @rule(
        fault=st.sampled_from(["none", "spec", "spec", "spec", "weights", "weights", "uploaded", "made up"]),
        valid_weights=valid_weights(),
        odd_weights=hostile_weights(),
        valid_spec=spec_texts("{digest}", SITES, faulty=False),
        odd_spec=spec_texts("{digest}", SITES, faulty=True),
        index=INDEX,
    )
    def submit_experiment(
        self,
        fault: str,
        valid_weights: Payload,
        odd_weights: Payload,
        valid_spec: Payload,
        odd_spec: Payload,
        index: int,
    ) -> None:
        """Weights uploaded and an experiment submitted on them, with one thing wrong: the
        spec, the weights, or the digest (an earlier upload, maybe hostile, or made up)."""
        STEPS["submit experiment"] += 1
        uploaded = answered(
            self.fed.scientist.put("/blobs", content=(odd_weights if fault == "weights" else valid_weights).data), 201
        )
        digest = uploaded.json()["digest"] if uploaded.status_code == 201 else MADE_UP_DIGESTS[0]
        if fault == "uploaded":
            digest = pick(self.blobs, index) or digest
        elif fault == "made up":
            digest = MADE_UP_DIGESTS[index % 2]
        spec = odd_spec if fault == "spec" else valid_spec
        text = spec.data.replace(b"{digest}", digest.encode())
        response = answered(self.fed.scientist.post("/experiments", content=text, headers=JSON), 201)
        if response.status_code == 201:
            self.experiments.append(response.json()["id"])
            self.touched.add(response.json()["id"])
        elif fault == "none":
            check(False, f"a valid experiment was refused: {describe(response)}")

    @rule(which=INDEX, made_up=st.sampled_from([None, 0, 10**6, MAX_ROW_ID, 2**62]))
    def cancel_experiment(self, which: int, made_up: int | None) -> None:
        STEPS["cancel experiment"] += 1
        experiment_id = made_up if made_up is not None else pick(self.experiments, which)
        response = answered(self.fed.scientist.post(f"/experiments/{experiment_id}/cancel"), 200)
        if isinstance(experiment_id, int) and experiment_id > MAX_ROW_ID:  # beyond any database's ids
            check(response.status_code == 422, describe(response))
        elif isinstance(experiment_id, int):
            self.touched.add(experiment_id)

    @rule(source=st.sampled_from(["task", "blob", "made up"]), index=INDEX, reader=st.sampled_from([*SITES, "person"]))
    def read_blob(self, source: str, index: int, reader: str) -> None:
        """A site or the scientist downloads a blob: a task's model (its own or another
        site's), an uploaded one, or a digest that names nothing."""
        STEPS["read blob"] += 1
        known = {"task": [t.weights_digest for t in self.tasks.values()], "blob": self.blobs}.get(source, [])
        digest = pick(known, index) or MADE_UP_DIGESTS[index % len(MADE_UP_DIGESTS)]
        client = self.fed.scientist if reader == "person" else self.fed.sites[reader]
        response = answered(client.get(f"/blobs/{digest}"), 200)
        if response.status_code == 200:
            check(hashlib.sha256(response.content).hexdigest() == digest, describe(response))

    @rule(which=INDEX)
    def download_model(self, which: int) -> None:
        STEPS["download model"] += 1
        experiment_id = pick(self.experiments, which)
        response = answered(self.fed.scientist.get(f"/experiments/{experiment_id}/model"), 200)
        if response.status_code == 200:
            digest = response.headers[Header.CONTENT_SHA256]
            check(hashlib.sha256(response.content).hexdigest() == digest, describe(response))

    # -- the sites --------------------------------------------------------------------
    @rule(site=st.sampled_from(SITES), body=site_reports("d"))
    def report_datasets(self, site: str, body: Payload) -> None:
        """A site says what it holds; the hub bounds its later sample counts by it."""
        STEPS["site report"] += 1
        answered(self.fed.sites[site].put("/sites/self/report", content=body.data, headers=JSON), 204)

    @rule(site=st.sampled_from(SITES))
    def poll(self, site: str) -> None:
        STEPS["poll"] += 1
        self._poll(site)

    @rule(
        honest=st.tuples(*(st.sampled_from([True, True, False]) for _ in SITES)),
        updates=st.tuples(*(update_recipes(hostile=False) for _ in SITES)),
        odd_updates=st.tuples(*(update_recipes(hostile=True) for _ in SITES)),
        evaluations=st.tuples(*(valid_evaluations() for _ in SITES)),
        odd_evaluations=st.tuples(*(hostile_evaluations() for _ in SITES)),
    )
    def sites_answer_their_tasks(
        self,
        honest: tuple[bool, ...],
        updates: tuple[UpdateRecipe, ...],
        odd_updates: tuple[UpdateRecipe, ...],
        evaluations: tuple[Payload, ...],
        odd_evaluations: tuple[Payload, ...],
    ) -> None:
        """Each site polls and answers its open task: most as a correct agent would, so
        rounds aggregate, evaluations fall due and later rounds open; some with a body that
        is wrong in one way, so each fault meets a task that could still accept a result."""
        STEPS["sites answer"] += 1
        for i, site in enumerate(SITES):
            task = self._poll(site)
            if task is None:
                continue
            if task.kind == TaskKind.EVALUATE:
                body = evaluations[i] if honest[i] else odd_evaluations[i]
                path = f"/tasks/{task.id}/evaluation"
                response = self.fed.sites[site].post(path, content=body.data, headers=JSON)
                self._result(task.id, task, response, ok=204, sender=site, metric=TaskKind.EVALUATE)
                if honest[i]:
                    check(response.status_code in (204, 409), describe(response))
                continue
            update = (updates[i] if honest[i] else odd_updates[i]).build(self._model_of(task), task.id, [])
            if not update.data:
                continue
            response = self._send_update(site, task.id, update.data, {Header.UPLOAD_NONCE: task.nonce})
            self._result(task.id, task, response, ok=200, sender=site, metric=TaskKind.TRAIN)
            if honest[i]:  # refused only for the task's state (409) or a bound it was told about
                check(response.status_code in (200, 409) or _bounded(response), describe(response))

    @rule(
        which=st.sampled_from(["current", "current", "current", "any", "made up"]),
        index=INDEX,
        fault=st.sampled_from(["none", "none", "body", "body", "body", "nonce", "sender", "sha256", "replay"]),
        valid=update_recipes(hostile=False),
        hostile=update_recipes(hostile=True),
        other=st.sampled_from([*SITES, "another task's nonce", "empty nonce", "long nonce", "no nonce"]),
        announce=st.booleans(),
        chunked=st.booleans(),
        padding=st.sampled_from([0, 0, 0, 300_000]),
    )
    def send_update(
        self,
        which: str,
        index: int,
        fault: str,
        valid: UpdateRecipe,
        hostile: UpdateRecipe,
        other: str,
        announce: bool,
        chunked: bool,
        padding: int,
    ) -> None:
        """An update as its site sends it, or with one thing wrong: the body, the nonce, the
        sender, the announced sha256; or an accepted upload replayed. A faulty one may carry
        ``padding`` more bytes than a request head may have, which a refusal before the body
        is read leaves unread on the connection."""
        STEPS["send update"] += 1
        task_id, task = self._task(which, index, TaskKind.TRAIN)
        others = [t for t in self.tasks if t != task_id]
        model = self._model_of(task) if task else None
        if fault == "replay" and self.accepted_bodies:
            body = Payload("replay", pick(self.accepted_bodies, index) or b"")
        else:
            body = (valid if fault == "none" else hostile).build(model, task_id, others)
        if fault != "none" and padding:
            body = Payload(f"{body.label} + {padding} bytes", body.data + b"\0" * padding)
        sender = task.site if task else SITES[index % len(SITES)]
        if fault == "sender" and other in SITES and other != sender:
            sender = other
        nonce: str | None = task.nonce if task else "0" * 32
        if fault == "nonce":
            nonce = {
                "another task's nonce": (pick([self.tasks[t].nonce for t in others], index) or ""),
                "empty nonce": "",
                "long nonce": "n" * 300,
                "no nonce": None,
            }.get(other, "")
        headers = {} if nonce is None else {Header.UPLOAD_NONCE.value: nonce}
        if announce or fault == "sha256":
            digest = hashlib.sha256(body.data).hexdigest()
            headers[Header.CONTENT_SHA256.value] = digest[::-1] if fault == "sha256" else digest
        response = self._send_update(sender, task_id, body.data, headers, chunked=chunked)
        self._result(task_id, task, response, ok=200, sender=sender, metric=TaskKind.TRAIN)
        if fault == "none" and task is not None and body.label == "valid":
            # Refused only for the task's state (409) or a bound it was told about, never as malformed.
            check(response.status_code in (200, 409) or _bounded(response), describe(response))

    @rule(
        which=st.sampled_from(["current", "current", "current", "any", "made up"]),
        index=INDEX,
        fault=st.sampled_from(["none", "none", "body", "body", "sender"]),
        valid=valid_evaluations(),
        hostile=hostile_evaluations(),
    )
    def send_evaluation(self, which: str, index: int, fault: str, valid: Payload, hostile: Payload) -> None:
        """An evaluation as its site sends it, or from another site, or with an odd body."""
        STEPS["send evaluation"] += 1
        task_id, task = self._task(which, index, TaskKind.EVALUATE)
        sender = task.site if task else SITES[index % len(SITES)]
        if fault == "sender":
            sender = SITES[(SITES.index(sender) + 1 + index % 2) % len(SITES)]
        body = hostile if fault == "body" else valid
        response = self.fed.sites[sender].post(f"/tasks/{task_id}/evaluation", content=body.data, headers=JSON)
        self._result(task_id, task, response, ok=204, sender=sender, metric=TaskKind.EVALUATE)
        if fault == "none" and task is not None and task.kind == TaskKind.EVALUATE:
            check(response.status_code in (204, 409), describe(response))

    @rule(
        which=st.sampled_from(["current", "any", "made up"]),
        kind=st.sampled_from([TaskKind.TRAIN, TaskKind.EVALUATE]),
        index=INDEX,
        own=st.booleans(),
        body=failure_texts(),
    )
    def send_failure(self, which: str, kind: str, index: int, own: bool, body: Payload) -> None:
        STEPS["send failure"] += 1
        task_id, task = self._task(which, index, kind)
        sender = task.site if task and own else SITES[index % len(SITES)]
        response = self.fed.sites[sender].post(f"/tasks/{task_id}/failure", content=body.data, headers=JSON)
        self._result(task_id, task, response, ok=204, sender=sender, metric=None)

    @rule()
    def let_time_pass(self) -> None:
        """Short rounds pass their deadline; the orchestrator closes them and opens the next."""
        STEPS["wait 0.1 s"] += 1
        time.sleep(0.1)

    # -- after every step -------------------------------------------------------------
    @invariant()
    def the_hub_keeps_answering(self) -> None:
        listing = answered(self.fed.scientist.get("/experiments"), 200)
        check(listing.status_code == 200, f"the experiment list must keep working: {describe(listing)}")
        self.turn += 1
        self._poll(SITES[self.turn % len(SITES)])

    @invariant()
    def the_hub_logs_no_errors(self) -> None:
        check(not ERRORS.records, "the hub logged an error:\n" + "\n".join(ERRORS.records))

    @invariant()
    def records_match_what_was_accepted(self) -> None:
        """Each experiment a step touched: its rounds, metrics and refusals answer, and its
        metrics hold exactly the updates and evaluations the hub accepted."""
        for experiment_id in sorted(self.touched):
            for part in ("rounds", "metrics", "refusals"):
                response = answered(self.fed.scientist.get(f"/experiments/{experiment_id}/{part}"), 200)
                if response.status_code != 200:
                    check(response.status_code == 404, describe(response))
                    break
                if part == "rounds":
                    for r in response.json():
                        check(r["n_updates"] <= len(r["sites"]), r)
                if part == "metrics":
                    recorded = Counter((experiment_id, m["round"], m["site"], m["kind"]) for m in response.json())
                    expected = Counter({k: n for k, n in ACCEPTED_METRICS.items() if k[0] == experiment_id})
                    check(recorded == expected, f"experiment {experiment_id}: metrics {recorded} != {expected}")
        self.touched.clear()

    def teardown(self) -> None:
        """Cancel what this example left running, so the next one starts with idle sites."""
        for experiment_id in self.experiments:
            self.fed.operator.post(f"/experiments/{experiment_id}/cancel")


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    hub = start_tls_hub(
        Path(tmp_path_factory.mktemp("stateful-fuzz")),
        long_poll_max_s=0.1,
        # High enough that the fuzzer's bursts are never rate limited (the limits have their own tests).
        site_uploads_per_minute=100_000.0,
        site_upload_burst=10_000,
        requests_per_minute=1_000_000.0,
        request_burst=100_000,
    )
    operator = hub.operator()
    created = operator.post("/tokens", json={"name": "fuzz-scientist", "role": "scientist"})
    assert created.status_code == 201, created.text
    sites = {name: hub.site(name) for name in SITES}
    for client in sites.values():  # a site is known from its first verified request
        assert client.get("/tasks/next").status_code == 204
    scientist = hub.client(token=created.json()["token"])
    for client in [scientist, operator, *sites.values()]:
        client.event_hooks = {"request": [_record_request], "response": [_record_response]}
    for name in LOGGERS:
        logging.getLogger(name).addHandler(ERRORS)
    try:
        yield Federation(hub, scientist, operator, sites)
    finally:
        for name in LOGGERS:
            logging.getLogger(name).removeHandler(ERRORS)
        hub.stop()


def test_hostile_sites_and_scientists_never_make_the_hub_fail(federation: Federation) -> None:
    HubMachine.fed = federation
    try:
        run_state_machine_as_test(
            HubMachine,
            settings=settings(
                max_examples=MAX_EXAMPLES,
                stateful_step_count=STEPS_PER_EXAMPLE,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
                phases=[Phase.generate],  # no shrinking: the hub's state and clock are not replayed
            ),
        )
    except BaseException as exc:
        if FAILURES:
            exc.add_note(f"first failure: {FAILURES[0]}")
        exc.add_note("last requests to the hub:\n" + "\n".join(RECENT))
        raise
