"""The hub/site wire contract: route paths, keys and message schemas, defined once.

Both sides import these; nothing here performs I/O. Control messages are JSON validated
by pydantic; weights travel as safetensors bodies whose header metadata carries the keys
of :class:`MetaKey`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from laulima.core.bundle import MAX_ARCHIVE_BYTES
from laulima.core.cohort import CohortFilter
from laulima.core.metrics import checked_metrics
from laulima.core.privacy.messages import TaskPrivacy, TaskSecureAggregation

__all__ = [
    "API_PREFIX",
    "BlobCreated",
    "CrossSiteCell",
    "CrossSiteFailure",
    "CrossSiteMatrix",
    "ErrorBody",
    "EvaluationResult",
    "ExperimentCreate",
    "ExperimentPhase",
    "ExperimentPublic",
    "ExperimentStatus",
    "FailureKind",
    "FingerprintPublic",
    "Header",
    "MetaKey",
    "MetricRecord",
    "ModelLabel",
    "RefusalRecord",
    "RoundPublic",
    "Role",
    "RoundStatus",
    "SiteCreate",
    "SiteCreated",
    "ShareCreate",
    "N_SAMPLES_MAX",
    "SitePublic",
    "SiteReport",
    "SiteStatus",
    "TaskFailure",
    "TaskKind",
    "TaskPublic",
    "TaskStatus",
    "TaskWaiting",
    "TokenCreate",
    "TokenCreated",
    "TokenPublic",
    "UploadAccepted",
]

API_PREFIX = "/api/v1"

SiteName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
Digest = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class Header(StrEnum):
    """HTTP headers of the protocol."""

    UPLOAD_NONCE = "Laulima-Upload-Nonce"
    """One-time value from the task; binds an upload to the task it was issued for."""
    CONTENT_SHA256 = "Laulima-Content-Sha256"
    """sha256 of a blob body, sent by the hub on download and by the site on upload."""
    VERSION = "Laulima-Version"
    """The Laulima version of a site agent, sent with every request; operators see it in the site list."""


class MetaKey(StrEnum):
    """Keys of the safetensors ``__metadata__`` of an uploaded update."""

    N_SAMPLES = "laulima.n_samples"
    METRICS = "laulima.metrics"
    TASK = "laulima.task"


class Role(StrEnum):
    """Who may do what at the hub."""

    OPERATOR = "operator"
    """Runs the federation: sites, tokens, and everything a scientist may do."""
    SCIENTIST = "scientist"
    """Uploads initial weights, submits and follows experiments, downloads models."""
    SITE = "site"
    """A hospital's agent: its own tasks and the blobs they point to; identified by certificate."""


class TaskKind(StrEnum):
    TRAIN = "train"
    EVALUATE = "evaluate"
    FINGERPRINT = "fingerprint"
    """Summarise the site's cohort as a dataset fingerprint (``laulima.core.fingerprint``);
    the site answers with ``POST /tasks/{id}/fingerprint``. No model is trained or scored."""


class TaskStatus(StrEnum):
    PENDING = "pending"
    """Created; no site has fetched it yet."""
    DELIVERED = "delivered"
    """The site fetched it; a result is due before the deadline."""
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    """Its round closed without a result from the site."""
    CANCELLED = "cancelled"


class RoundStatus(StrEnum):
    OPEN = "open"
    AGGREGATED = "aggregated"
    FAILED = "failed"
    ABORTED = "aborted"
    """Secure aggregation could not unmask it (too many sites dropped): the global model is
    kept and the next round runs."""


class ExperimentStatus(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ExperimentPhase(StrEnum):
    """What a running experiment is doing (``ExperimentPublic.phase``)."""

    TRAINING = "training"
    """Rounds are open (or about to open)."""
    FINAL_EVALUATION = "final evaluation"
    """Training is done; the last round's evaluation is still out."""
    LOCAL_MODELS = "local models"
    """Cross-site evaluation, first step: sites train their local-only models."""
    CROSS_SITE = "cross-site evaluation"
    """The final global (and local-only) models are evaluated at every participating site."""
    EVALUATION = "evaluation"
    """An evaluate-mode experiment: the given model is evaluated at its sites."""
    FINGERPRINT = "fingerprint"
    """A fingerprint-mode experiment: the sites summarise their cohorts."""


ModelLabel = Annotated[str, Field(pattern=r"^(global|model|local:[A-Za-z0-9][A-Za-z0-9._-]{0,63})$")]
"""Which model a task after training runs on, kept at the hub (never sent to a site): ``global``
(the final global model), ``local:<site>`` (that site's local-only model), ``model`` (the model
an evaluate-mode experiment scores)."""


class FailureKind(StrEnum):
    ERROR = "error"
    TIMEOUT = "timeout"
    REJECTED = "rejected"
    """The site's policy or admin refused to run the task."""
    REFUSED = "refused"
    """The hub refused the site's result (invalid weights, over max_update_norm, ...)."""


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data: Any) -> Any:
        """No text anywhere in a message may hold a NUL character: nothing legitimate sends
        one, and PostgreSQL cannot store it (the hub would fail where it must refuse)."""
        where = _nul_at(data, ())
        if where is not None:
            raise ValueError(f"text at {'.'.join(where) or 'the top level'} contains a NUL character (\\x00)")
        return data


def _nul_at(value: Any, path: tuple[str, ...]) -> tuple[str, ...] | None:
    """The path of the first string (key or value) in ``value`` that holds a NUL, if any."""
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and "\x00" in key:
                return (*path, repr(key))
            found = _nul_at(item, (*path, str(key)))
            if found is not None:
                return found
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = _nul_at(item, (*path, str(index)))
            if found is not None:
                return found
    return None


class ErrorBody(BaseModel):
    """The hub's answer to a refused request. Not a :class:`_Msg`: it may quote what was
    refused, NUL characters included (JSON escapes them)."""

    model_config = ConfigDict(extra="forbid")

    error: str
    detail: str
    context: dict[str, Any] = {}


class SiteCreate(_Msg):
    name: SiteName


class SiteCreated(_Msg):
    name: str
    token: str | None = None
    """Token mode only (a loopback hub): shown once, the hub keeps only its hash. A hub with
    a CA identifies sites by certificate (``laulima site enroll``) and issues no token."""


TokenName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")]


class TokenCreate(_Msg):
    name: TokenName
    """Whose token it is (a person or a service), e.g. ``alice`` or ``ci-bot``."""
    role: Literal[Role.OPERATOR, Role.SCIENTIST]
    """People's roles only: sites are identified by certificate."""


class TokenPublic(_Msg):
    id: int
    name: str
    role: Role
    created_at: float
    revoked_at: float | None


class TokenCreated(TokenPublic):
    token: str
    """Shown once; the hub keeps only its sha256."""


N_SAMPLES_MAX = 10**9
"""Upper bound of any sample count the hub accepts (updates, evaluations, catalog reports)."""

DatasetName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]


class SiteStatus(StrEnum):
    """Whether the orchestrator may select a site for a new round."""

    ONLINE = "online"
    """Seen within the hub's ``site_offline_after_s``, or working on one of its tasks."""
    OFFLINE = "offline"
    REVOKED = "revoked"
    """Its certificate was revoked (``laulima ca revoke``)."""
    REMOVED = "removed"
    """Deregistered by an operator (``laulima site remove``)."""


class SiteReport(_Msg):
    """What an agent tells the hub about itself: its version and the datasets it holds,
    with the number of cases each (None where the layout gives no count). The hub bounds a
    site's reported ``n_samples`` by these counts."""

    version: Annotated[str, Field(max_length=64, pattern=r"^[\w.+-]*$")]
    datasets: Annotated[dict[DatasetName, Annotated[int, Field(ge=0, le=N_SAMPLES_MAX)] | None], Field(max_length=256)]


class SitePublic(_Msg):
    name: str
    created_at: float
    last_seen: float | None
    status: SiteStatus = SiteStatus.OFFLINE
    version: str | None = None
    datasets: dict[str, int | None] = {}
    """Cohort sizes the site reported, by dataset name."""


class TaskPublic(_Msg):
    id: str
    experiment_id: int
    experiment_name: str
    round: int
    kind: TaskKind
    algorithm: str
    dataset: str
    """A dataset name, or ``tag:NAME`` (see laulima.core.cohort)."""
    config: dict[str, Any]
    weights_digest: Digest
    weights_size: int
    deadline: float
    """Unix time after which the hub no longer accepts the result (informational: clocks differ)."""
    seconds_left: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    """Seconds from this answer to ``deadline``, by the hub's clock. Sites time tasks with
    this duration and their own monotonic clock, so a site whose clock is off still meets it."""
    time_limit_s: float
    upload_nonce: str
    bundle_digest: Digest | None = None
    """sha256 of the algorithm's bundle (a blob the site may download); None for a built-in."""
    bundle_size: Annotated[int, Field(ge=0, le=MAX_ARCHIVE_BYTES)] | None = None
    """The bundle's size in bytes, so the site refuses a longer download at once."""
    signatures: Annotated[list[Annotated[str, Field(pattern=r"^[0-9a-f]{128}$")]], Field(max_length=16)] = []
    """Ed25519 signatures of ``bundle_digest`` the scientist attached; a site policy may admit
    a bundle signed by a key it trusts."""
    requester: Annotated[str, Field(max_length=64)] = ""
    """Who submitted the experiment (the owner's name), for the site's policy and its administrator."""
    rounds: Annotated[int, Field(ge=1, le=100_000)] = 1
    """The experiment's number of rounds: what an administrator approves covers them all."""
    cohort: CohortFilter | None = None
    """Which of the dataset's cases the site uses (the spec's ``[cohort]``); None: all."""
    approval_seconds_left: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    """Seconds from this answer to the experiment's approval deadline (submission +
    ``approval_timeout_s``): how long the site's administrator has to decide."""
    privacy: TaskPrivacy | None = None
    """TRAIN tasks of a spec with ``[privacy]``: the site clips and noises its update itself,
    after checking these against its policy and its privacy budget."""
    secure_aggregation: TaskSecureAggregation | None = None
    """TRAIN tasks of a spec with ``[secure_aggregation]``: the site masks its update."""


class TaskWaiting(_Msg):
    """A site holds a task for its administrator's approval and says why (shown to the
    scientist); the round waits for it until the experiment's approval deadline."""

    reason: Annotated[str, Field(min_length=1, max_length=500, pattern=r"^[^\x00-\x1f\x7f]+$")]
    """One line for the scientist, e.g. "held for the administrator: unknown requester"."""


Metrics = Annotated[dict[str, float], BeforeValidator(checked_metrics)]
"""Reported metrics, under the rules of :func:`laulima.core.metrics.checked_metrics`."""


class EvaluationResult(_Msg):
    """What a site reports for an EVALUATE task. Counts and metrics are bounded and finite
    (see :mod:`laulima.core.metrics`): the hub stores, tabulates and plots them."""

    n_samples: Annotated[int, Field(ge=0, le=N_SAMPLES_MAX)]
    metrics: Metrics


class TaskFailure(_Msg):
    kind: FailureKind = FailureKind.ERROR
    reason: Annotated[str, Field(max_length=4000)]


class UploadAccepted(_Msg):
    task_id: str
    digest: Digest
    n_samples: int


class BlobCreated(_Msg):
    digest: Digest
    size: int


class ExperimentCreate(_Msg):
    spec: dict[str, Any]
    initial_weights: Digest
    """Digest of a blob uploaded before, holding the model the first round starts from."""


class RoundPublic(_Msg):
    index: int
    status: RoundStatus
    sites: list[str]
    n_updates: int
    started_at: float
    closed_at: float | None
    global_digest: str | None
    """The model this round produced (None while open)."""
    left_out: dict[str, str] = {}
    """Sites the experiment names (or every enrolled site, for ``sites = []``) that this round
    did not select, with why: offline, revoked or removed."""
    note: str = ""
    """Why an aborted round was abandoned."""


class ExperimentPublic(_Msg):
    id: int
    name: str
    status: ExperimentStatus
    rounds_done: int
    rounds: int
    created_at: float
    finished_at: float | None
    global_digest: str
    """The newest checkpointed global model."""
    error: str | None
    spec: dict[str, Any]
    waiting: str | None = None
    """Why the next round has not opened (e.g. too few sites online), while that is so."""
    owner: str
    """The name of the person who submitted it; they (and operators) may cancel and share it."""
    shared_with: list[str] = []
    """People its owner shared it with: they may read it (status, rounds, metrics, models)."""
    algorithm_digest: str = ""
    """What the sites run: the bundle's sha256, or the well-known digest of a built-in (empty
    for an experiment older than bundles whose algorithm is neither)."""
    site_notes: dict[str, str] = {}
    """What sites of the open round (or of the last evaluation) are doing, when it is news:
    waiting for approval, refused, failed — so the scientist learns it before the round ends."""
    mode: Literal["train", "evaluate", "fingerprint"] = "train"
    """The spec's ``mode``: a training run, the evaluation of a given model, or the sites'
    dataset fingerprint."""
    phase: ExperimentPhase | None = None
    """What a running experiment is doing; None once it has finished."""


class FingerprintPublic(_Msg):
    """The merged dataset fingerprint of a completed fingerprint-mode experiment
    (``GET /experiments/{id}/fingerprint``), in nnU-Net v2's own formats."""

    experiment_id: int
    fingerprint: dict[str, Any]
    """nnU-Net's ``dataset_fingerprint.json`` over every site in ``sites``."""
    dataset_json: dict[str, Any]
    """The ``dataset.json`` it goes with (channel names, labels, numTraining, file ending)."""
    n_cases: int
    """Cases over all of ``sites``."""
    sites: list[str]
    """The sites whose fingerprint is in the merge, in name order."""
    failures: dict[str, str] = {}
    """Sites that were asked but whose fingerprint is missing, with why (refused by the
    site's policy, failed, expired)."""


class ShareCreate(_Msg):
    """Share an experiment with the person of this name (the name of their API token)."""

    name: TokenName


class MetricRecord(_Msg):
    round: int
    site: str
    kind: TaskKind
    n_samples: int
    metrics: dict[str, float]
    model: str | None = None
    """Which model the record is about, for tasks after training (round ``rounds + 1``):
    ``global``, ``local:<site>`` or ``model`` (see :data:`ModelLabel`). None for the records
    of ordinary rounds (the global model of that round, or a site's update)."""


class CrossSiteCell(_Msg):
    """One model's evaluation at one site (or pooled over sites)."""

    n_samples: int
    metrics: dict[str, float]


class CrossSiteFailure(_Msg):
    """A task of the cross-site evaluation that gave no result, and why: the cell (or, for
    a local model's training, the whole row) is missing from the matrix."""

    model: str
    site: str
    kind: TaskKind
    """``train``: the site did not produce its local model; ``evaluate``: one cell is missing."""
    reason: str


class CrossSiteMatrix(_Msg):
    """Models x sites: each model's evaluation at each site, and pooled over the sites.

    ``pooled[model]``: per metric, the mean over the sites that reported it, weighted by their
    ``n_samples`` (unweighted if all counted zero), and the total ``n_samples``."""

    experiment_id: int
    round: int
    """The round index of these tasks (the experiment's ``rounds + 1``)."""
    models: list[str]
    """``global`` first, then ``local:<site>`` in site order (``model`` for evaluate mode)."""
    sites: list[str]
    cells: dict[str, dict[str, CrossSiteCell]]
    """model -> site -> result; a missing entry had no result (see ``failures``)."""
    pooled: dict[str, CrossSiteCell]
    failures: list[CrossSiteFailure] = []
    complete: bool = False
    """Whether every task is settled (the experiment has moved on or finished)."""


class RefusalRecord(_Msg):
    """A result the hub refused; recorded so operators can see who sent what."""

    at: float
    site: str | None
    task_id: str | None
    status: int
    reason: str
