"""The hub/site wire contract: route paths, keys and message schemas, defined once.

Both sides import these; nothing here performs I/O. Control messages are JSON validated
by pydantic; weights travel as safetensors bodies whose header metadata carries the keys
of :class:`MetaKey`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "API_PREFIX",
    "BlobCreated",
    "ErrorBody",
    "EvaluationResult",
    "ExperimentCreate",
    "ExperimentPublic",
    "ExperimentStatus",
    "FailureKind",
    "Header",
    "MetaKey",
    "MetricRecord",
    "RefusalRecord",
    "RoundPublic",
    "Role",
    "RoundStatus",
    "SiteCreate",
    "SiteCreated",
    "SitePublic",
    "TaskFailure",
    "TaskKind",
    "TaskPublic",
    "TaskStatus",
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


class ExperimentStatus(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class FailureKind(StrEnum):
    ERROR = "error"
    TIMEOUT = "timeout"
    REJECTED = "rejected"
    """The site's policy or admin refused to run the task."""


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(_Msg):
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


class SitePublic(_Msg):
    name: str
    created_at: float
    last_seen: float | None


class TaskPublic(_Msg):
    id: str
    experiment_id: int
    experiment_name: str
    round: int
    kind: TaskKind
    algorithm: str
    dataset: str
    config: dict[str, Any]
    weights_digest: Digest
    weights_size: int
    deadline: float
    """Unix time after which the hub no longer accepts the result."""
    time_limit_s: float
    upload_nonce: str


class EvaluationResult(_Msg):
    n_samples: Annotated[int, Field(ge=0)]
    metrics: dict[str, float]


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


class MetricRecord(_Msg):
    round: int
    site: str
    kind: TaskKind
    n_samples: int
    metrics: dict[str, float]


class RefusalRecord(_Msg):
    """A result the hub refused; recorded so operators can see who sent what."""

    at: float
    site: str | None
    task_id: str | None
    status: int
    reason: str
