"""The site's policy: what a hospital lets run on its data, and without whom asking.

Read from ``home/policy.toml`` (written by the site's administrator; a commented example is
:func:`default_policy_text`). A site without that file runs under :class:`SitePolicy`'s
defaults: built-in ``laulima.algorithms.*`` run without asking, every other algorithm waits
for an administrator's approval, any registered dataset may be named, no minimum cohort
(``min_cohort = 1``), no site caps on rounds or time, sandbox on (no network, refuse to run
where the sandbox is unsupported).

:func:`decide` is pure: it turns a policy, what the job asks for (:class:`JobFacts`) and a
recorded approval or rejection (from :mod:`laulima.site.approvals`) into RUN, ASK or REFUSE
with the reason why. A REFUSE reason may be sent to the hub: it names datasets, numbers and
policy fields, never a path or a file name.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import re
import stat
import tomllib
from dataclasses import dataclass
from enum import StrEnum
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Annotated, Any, Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from laulima.core.bundle import is_builtin_name
from laulima.core.privacy.messages import TaskPrivacy
from laulima.core.spec import MAX_TIMEOUT_S
from laulima.errors import ConfigurationError, ProtocolError

__all__ = [
    "BUILTIN_PREFIX",
    "DEFAULT_PRIVACY_DELTA",
    "MAX_POLICY_BYTES",
    "POLICY_FILE",
    "AlgorithmPolicy",
    "AlgorithmSigner",
    "DatasetPolicy",
    "DatasetRule",
    "Decision",
    "JobFacts",
    "PrivacyPolicy",
    "SandboxPolicy",
    "SitePolicy",
    "Verdict",
    "decide",
    "default_policy_text",
    "is_builtin",
    "load_policy",
    "parse_policy",
    "privacy_refusal",
]

POLICY_FILE = "policy.toml"
MAX_POLICY_BYTES = 1024 * 1024
"""Largest policy file read: a policy is a page of settings, not data."""
BUILTIN_PREFIX = "laulima.algorithms."
"""Entry points under this package are the algorithms shipped with Laulima itself."""

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_PATTERN = r"^[A-Za-z0-9._*?-]{1,64}$"
"""A name or an fnmatch pattern over names (``*`` any run of characters, ``?`` one)."""
_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_ENTRY_POINT = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_MAX_LIST = 10_000
_INT64 = 2**63 - 1
_MAX_ROUNDS = 100_000
_MAX_CASES = 10**9


class _Strict(BaseModel):
    # strict: "yes" is not a boolean and "10" is not a number; allow_inf_nan=False: TOML
    # has inf and nan, and no limit of a policy may be either.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


def _unique(values: list[str], what: str) -> list[str]:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"{what} {value!r} is listed twice")
        seen.add(value)
    return values


class AlgorithmSigner(_Strict):
    """A data scientist whose signed bundles (``laulima algorithm sign``) run without asking."""

    name: Annotated[str, Field(pattern=_NAME)]
    """Who this key belongs to; decisions say "signed by NAME"."""
    public_key: str
    """Ed25519 public key: PEM (``-----BEGIN PUBLIC KEY-----``) or its 32 raw bytes in base64.
    Stored as the raw bytes in base64, whichever form was given."""

    @field_validator("public_key")
    @classmethod
    def _ed25519(cls, text: str) -> str:
        raw = _ed25519_raw(text)
        if raw is None:
            raise PydanticCustomError(
                "ed25519_key",
                "not an Ed25519 public key; give the PEM block (-----BEGIN PUBLIC KEY-----) "
                "or the key's 32 raw bytes in base64, as `laulima algorithm sign` prints them",
            )
        return base64.b64encode(raw).decode("ascii")

    def key(self) -> Ed25519PublicKey:
        """The key itself, to verify a bundle's signature with."""
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(self.public_key))

    def raw_key(self) -> bytes:
        """The key's 32 raw bytes (what ``laulima.algorithms.bundle.verify_signature`` takes)."""
        return base64.b64decode(self.public_key)


def _ed25519_raw(text: str) -> bytes | None:
    text = text.strip()
    if len(text) > 4096:
        return None
    if text.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(text.encode("ascii"))
        except (ValueError, UnicodeEncodeError, UnsupportedAlgorithm):
            return None
        if not isinstance(key, Ed25519PublicKey):
            return None
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) != 32:
        return None
    try:
        Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        return None
    return raw


class AlgorithmPolicy(_Strict):
    """Which algorithms are *admitted*: they run without an administrator being asked
    (unless ``approval = "manual"``). Anything else waits for approval."""

    builtin: bool = True
    """The algorithms shipped with Laulima (``laulima.algorithms.*``) are admitted."""
    digests: Annotated[list[str], Field(max_length=_MAX_LIST)] = []
    """Bundle digests (sha256, 64 lowercase hex digits, as ``laulima algorithm pack`` prints)
    admitted by name: exactly that code, byte for byte."""
    signers: Annotated[list[AlgorithmSigner], Field(max_length=1000)] = []
    """Bundles carrying a valid signature by one of these keys are admitted."""

    @field_validator("digests")
    @classmethod
    def _digests(cls, digests: list[str]) -> list[str]:
        for i, digest in enumerate(digests):
            if not _DIGEST.fullmatch(digest):
                raise PydanticCustomError(
                    "bundle_digest",
                    "entry {index} ({value}) is not a bundle digest: expected 64 lowercase hex digits "
                    "(the sha256 that `laulima algorithm pack` prints)",
                    {"index": i, "value": repr(digest[:80])},
                )
        return _unique(digests, "digest")

    @field_validator("signers")
    @classmethod
    def _signer_names(cls, signers: list[AlgorithmSigner]) -> list[AlgorithmSigner]:
        _unique([s.name for s in signers], "signer")
        return signers


class DatasetRule(_Strict):
    """The datasets experiments with matching names may touch (instead of ``allowed``)."""

    experiment: Annotated[str, Field(pattern=_PATTERN)]
    """Experiment name or fnmatch pattern (``brats-*``); case-sensitive."""
    allowed: Annotated[list[Annotated[str, Field(pattern=_PATTERN)]], Field(max_length=_MAX_LIST)]
    """Dataset names or patterns; ``[]`` lets matching experiments touch no dataset."""


class DatasetPolicy(_Strict):
    """Which registered datasets an experiment may name.

    The first rule in ``experiments`` whose pattern matches the experiment's name decides;
    an experiment no rule matches may touch the datasets in ``allowed``.
    """

    allowed: Annotated[list[Annotated[str, Field(pattern=_PATTERN)]], Field(max_length=_MAX_LIST)] = ["*"]
    """Dataset names or patterns any experiment may touch; ``["*"]``: every registered dataset,
    ``[]``: none (only what a rule grants)."""
    experiments: Annotated[list[DatasetRule], Field(max_length=_MAX_LIST)] = []
    """Per-experiment rules, in order; the first match replaces ``allowed`` for that experiment."""

    def allowed_for(self, experiment_name: str) -> list[str]:
        """The dataset patterns an experiment called ``experiment_name`` may touch."""
        for rule in self.experiments:
            if fnmatchcase(experiment_name, rule.experiment):
                return rule.allowed
        return self.allowed

    def allows(self, experiment_name: str, dataset: str) -> bool:
        return any(fnmatchcase(dataset, pattern) for pattern in self.allowed_for(experiment_name))


_MAX_SANDBOX_PATHS = 100


class SandboxPolicy(_Strict):
    """How a task's process is confined (enforced by the sandbox, not by :func:`decide`).

    A task may read its dataset, its bundle and the installed software, and write its own
    task folder; ``readable`` and ``writable`` add folders beyond that (a shared model
    cache, say). Whether they exist is checked when a task is set up, not here: a policy
    stays valid while a disk is unmounted.
    """

    network: bool = False
    """Whether an algorithm may use the network. False: its own empty network namespace."""
    on_unsupported: Literal["refuse", "warn"] = "refuse"
    """Where the kernel cannot isolate the process: refuse the task, or run it and warn."""
    readable: Annotated[list[str], Field(max_length=_MAX_SANDBOX_PATHS)] = []
    """Further absolute folders (or files) every task may read, beside its dataset."""
    writable: Annotated[list[str], Field(max_length=_MAX_SANDBOX_PATHS)] = []
    """Further absolute folders every task may write, beside its task folder. Shared by
    every task and every experiment: what one algorithm leaves there the next can read."""

    @field_validator("readable", "writable")
    @classmethod
    def _folders(cls, paths: list[str]) -> list[str]:
        normalized = []
        for i, path in enumerate(paths):
            problem = _sandbox_path_problem(path)
            if problem:
                raise PydanticCustomError(
                    "sandbox_path",
                    "entry {index} ({value}) {problem}",
                    {"index": i + 1, "value": repr(path[:200]), "problem": problem},
                )
            normalized.append(os.path.normpath(path))
        return _unique(normalized, "folder")


def _sandbox_path_problem(path: str) -> str | None:
    """Why ``path`` cannot be an extra sandbox folder, or None."""
    if not path or "\0" in path or len(path) > 4096:
        return "is not a path"
    if not path.startswith("/"):
        return "is not an absolute path; give the full path, starting with /"
    if ".." in path.split("/"):
        return "contains '..'; give the folder's own path"
    if os.path.normpath(path).strip("/") == "":
        return "is the root folder '/', which would open the whole machine; name the folders tasks need"
    return None


DEFAULT_PRIVACY_DELTA = 1e-5


class PrivacyPolicy(_Strict):
    """Differential privacy the site asks of the updates that leave it (``[privacy]``).

    Each round a site takes part in, its update leaves clipped to ``clip`` with Gaussian
    noise of std ``noise_multiplier x clip``; the site accounts ε per dataset itself
    (:mod:`laulima.site.privacy_ledger`), never trusting the hub's numbers. Evaluation and
    fingerprint jobs are not charged: they release metrics or aggregates, not updates.
    """

    max_epsilon: Annotated[float, Field(gt=0, le=1e6)] | None = None
    """The budget: ε each dataset may spend over every experiment, at ``delta``. Unset: no
    budget (spending is still recorded for tasks that carry DP parameters)."""
    delta: Annotated[float, Field(gt=0, le=0.01)] = DEFAULT_PRIVACY_DELTA
    """The δ the budget is stated at and every ε is computed at. With a budget, tasks may
    not ask for a larger δ."""
    min_noise_multiplier: Annotated[float, Field(ge=0, le=1000)] = 0.0
    """Refuse training whose noise std is less than this many times its clip bound."""
    require: bool = False
    """True: refuse training tasks that carry no DP parameters (their updates leave
    unnoised). False: such tasks run, and are not charged."""
    max_clip: Annotated[float, Field(gt=0, le=1e6)] | None = None
    """Refuse training whose clip bound is larger: the larger the clip, the further one
    site's update may move the model. Unset: no ceiling."""


class SitePolicy(_Strict):
    """The whole ``policy.toml``. Every field has a default; see :func:`default_policy_text`."""

    approval: Literal["auto", "manual"] = "auto"
    """``auto``: admitted algorithms run without asking; ``manual``: every job waits for an
    administrator (``laulima site approve``), admitted or not."""
    approval_scope: Literal["experiment", "round"] = "experiment"
    """What one approval covers: the whole experiment (its rounds and its evaluations), or
    one round (its training and evaluation)."""
    evaluation_auto: bool = True
    """True: evaluation-only jobs of an admitted algorithm run without asking, even under
    ``manual``. False: every evaluation job needs an approval (one for its experiment or
    round counts), even under ``auto``. Never admits an algorithm the policy does not."""
    min_cohort: Annotated[int, Field(ge=1, le=_MAX_CASES)] = 1
    """Refuse jobs on a dataset with fewer cases (and on one whose cases cannot be counted,
    when above 1): small cohorts leak more about each patient."""
    max_rounds: Annotated[int, Field(ge=1, le=_MAX_ROUNDS)] | None = None
    """Refuse experiments that ask for more rounds; unset: no site cap."""
    max_task_seconds: Annotated[float, Field(gt=0, le=MAX_TIMEOUT_S)] | None = None
    """Refuse tasks whose time limit is longer; unset: no site cap."""
    local_models: Literal["allow", "refuse"] = "allow"
    """Whether the site trains a *local-only* model for an experiment's cross-site evaluation
    (``[evaluation] local_models = true``): a model trained on this site's data alone, which
    leaves the site and is evaluated at the other sites. ``refuse``: such tasks are refused
    (the experiment goes on; its matrix lacks this site's local model)."""
    max_memory_mb: Annotated[int, Field(ge=64, le=16 * 1024 * 1024)] | None = None
    """Address-space limit of a task's process, MiB (enforced by the sandbox); unset: none.
    Address space, not resident memory: it counts the interpreter and libraries already
    mapped (several GiB once torch is loaded), and CUDA reserves far more than it uses, so
    leave it unset on GPU sites."""
    max_cpu_seconds: Annotated[float, Field(gt=0, le=10 * MAX_TIMEOUT_S)] | None = None
    """CPU-time limit of a task's process (enforced by the sandbox); unset: none."""
    algorithms: AlgorithmPolicy = AlgorithmPolicy()
    datasets: DatasetPolicy = DatasetPolicy()
    sandbox: SandboxPolicy = SandboxPolicy()
    privacy: PrivacyPolicy = PrivacyPolicy()

    def signer_keys(self) -> dict[str, Ed25519PublicKey]:
        """Signer name → public key, for the code that verifies a bundle's signature."""
        return {signer.name: signer.key() for signer in self.algorithms.signers}


def parse_policy(data: dict[str, Any], *, source: str = "<policy>") -> SitePolicy:
    """Validate a policy mapping; the first error names ``source`` and the field."""
    try:
        return SitePolicy.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = _field_name(err["loc"])
        reason = err["msg"]
        if err["type"] == "extra_forbidden":
            reason = "unknown field; check its spelling against default_policy_text() (`laulima site policy show`)"
        elif err["type"] == "finite_number":
            reason = "must be a finite number (inf and nan are not limits)"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ConfigurationError(f"{source}: field '{field}': {reason}{more}", file=source, field=field) from exc


def _field_name(loc: tuple[int | str, ...]) -> str:
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        else:
            name += f".{part}" if name else str(part)
    return name or "(top level)"


def load_policy(home: str | Path) -> SitePolicy:
    """Read ``home/policy.toml``; a missing file means the defaults of :class:`SitePolicy`.

    Refuses a file other users may write: whoever can edit the policy decides what code
    runs on the hospital's data.
    """
    path = Path(home) / POLICY_FILE
    source = str(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        return SitePolicy()
    except OSError as exc:
        raise ConfigurationError(f"{source}: cannot read the site policy ({exc})", file=source) from exc
    if not stat.S_ISREG(st.st_mode):
        raise ConfigurationError(f"{source}: the site policy must be a regular file", file=source)
    if os.name == "posix" and st.st_mode & 0o022:
        raise ConfigurationError(
            f"{source}: other users may edit the site policy (mode {st.st_mode & 0o777:o}); run `chmod 600 {path}`",
            file=source,
        )
    if st.st_size > MAX_POLICY_BYTES:
        raise ConfigurationError(
            f"{source}: the site policy is larger than {MAX_POLICY_BYTES // 1024} KiB; it holds settings, not data",
            file=source,
        )
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_POLICY_BYTES + 1)
        data = tomllib.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"{source}: cannot read the site policy ({exc})", file=source) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{source}: not valid TOML: {exc}", file=source) from exc
    except RecursionError:
        raise ConfigurationError(f"{source}: tables or arrays nested too deeply to read", file=source) from None
    return parse_policy(data, source=source)


def default_policy_text() -> str:
    """A commented ``policy.toml`` that parses to the defaults, for ``laulima site init``."""
    return _DEFAULT_POLICY_TEXT


_DEFAULT_POLICY_TEXT = """\
# Site policy: what this hospital lets federated jobs do with its data.
# Read by the site agent at every job; check it with `laulima site policy check`.
# Every line below is optional: this file as written gives the defaults.

# "auto": admitted algorithms (see [algorithms]) run without asking; others wait for an
#         administrator (`laulima site jobs`, `laulima site approve JOB` / `reject JOB --reason`).
# "manual": every job waits for an administrator, admitted or not.
approval = "auto"

# What one approval covers: "experiment" (all its rounds and evaluations) or "round".
approval_scope = "experiment"

# true: evaluation-only jobs of an admitted algorithm run without asking, even under "manual".
# false: every evaluation job needs an approval (its experiment's or round's counts).
evaluation_auto = true

# Refuse jobs on a dataset with fewer cases than this.
min_cohort = 1

# Site caps (uncomment to set): refuse experiments asking for more rounds or longer tasks,
# and limit each task's process (memory in MiB, CPU time in seconds).
# max_rounds = 100
# max_task_seconds = 3600
# max_memory_mb = 16384   # address space, libraries included (torch: several GiB); unset on GPU sites
# max_cpu_seconds = 7200

# A cross-site evaluation may ask this site for a *local-only* model: trained on this site's
# data alone, then sent to the hub and evaluated at the other sites ("allow"), or refused.
local_models = "allow"

[algorithms]
# The algorithms shipped with Laulima (laulima.algorithms.*) run without asking.
builtin = true
# Bundle digests admitted byte for byte (64 hex digits, from `laulima algorithm pack`).
digests = []

# Bundles signed by these data scientists (`laulima algorithm sign`) run without asking.
# [[algorithms.signers]]
# name = "alice"
# public_key = "MCowBQYDK2VwAyEA..."   # Ed25519: PEM block or the 32 raw bytes in base64

[datasets]
# Registered datasets any experiment may touch: names or patterns; ["*"] = all, [] = none.
allowed = ["*"]

# Per-experiment rules: the first whose pattern matches the experiment's name replaces
# `allowed` for that experiment.
# [[datasets.experiments]]
# experiment = "brats-*"
# allowed = ["brain"]

[sandbox]
# Whether an algorithm may use the network (false: its own empty network namespace).
network = false
# Where the kernel cannot confine a task: "refuse" the task, or "warn" and run it.
on_unsupported = "refuse"
# A task reads only its dataset, its algorithm's bundle and the installed software, and
# writes only its own task folder. Further absolute folders every task may read or write
# (a shared model cache, say); they must exist when a task starts. What one task writes
# to a shared folder, every later task (of any experiment) can read.
readable = []
writable = []

[privacy]
# Differential privacy of the model updates that leave this site (`laulima site privacy`
# shows what each dataset has spent). Each experiment's whole cost is reserved at its first
# training task, so it is never cut off halfway; one that would overdraw is refused.
# max_epsilon = 8.0          # budget: ε per dataset over all experiments (unset: no budget)
delta = 1e-05                # the δ the budget is stated at (at most 0.01)
min_noise_multiplier = 0.0   # refuse training with less noise (std / clip bound)
require = false              # true: refuse training tasks without DP parameters
# max_clip = 10.0            # refuse training whose update clip bound is larger
"""


class Verdict(StrEnum):
    RUN = "run"
    ASK = "ask"
    """The job waits for an administrator's approval."""
    REFUSE = "refuse"


@dataclass(frozen=True)
class Decision:
    """What the site does with a job, and why (one short sentence, no paths)."""

    verdict: Verdict
    why: str

    @classmethod
    def run(cls, why: str) -> Decision:
        return cls(Verdict.RUN, why)

    @classmethod
    def ask(cls, why: str) -> Decision:
        return cls(Verdict.ASK, why)

    @classmethod
    def refuse(cls, why: str) -> Decision:
        return cls(Verdict.REFUSE, why)

    def __str__(self) -> str:
        return f"{self.verdict.value}: {self.why}"


@dataclass(frozen=True)
class JobFacts:
    """What a task asks of the site, as the policy needs it. Built by the agent from the
    hub's task and the site's own checks (bundle signature, cohort size)."""

    experiment_id: int
    experiment_name: str
    requester: str
    """The data scientist who submitted the experiment, as the hub names them."""
    round: int
    kind: Literal["train", "evaluate", "fingerprint"]
    """``fingerprint``: summarise the cohort as a dataset fingerprint (no model; see
    :mod:`laulima.core.fingerprint`). Decided like training, not like an evaluation: it sends
    each case's geometry (spacing and cropped shape, as a table) and intensity quantiles."""
    entry_point: str
    """``package.module:Class``: a built-in's, or the one in the bundle's manifest."""
    bundle_digest: str | None
    """sha256 of the algorithm bundle; None for a built-in ``laulima.algorithms.*``."""
    bundle_signer: str | None
    """Name of the policy signer whose signature on the bundle was verified, else None."""
    dataset: str
    n_cases: int | None
    """Cases in the site's dataset; None when they cannot be counted."""
    rounds: int
    """Rounds the experiment asks for."""
    task_time_limit_s: float | None
    local_model: bool = False
    """A training job whose model is trained on this site's data alone and leaves the site
    (a cross-site evaluation's local-only model), not a federated round's update."""
    privacy: TaskPrivacy | None = None
    """The DP parameters the site is to apply to a training job's update (the task's); None:
    the update leaves unnoised."""

    def __post_init__(self) -> None:
        # These come from the hub: refuse a malformed task before any rule reads it.
        checks: list[tuple[str, bool]] = [
            ("experiment_id", _is_int(self.experiment_id, 0, _INT64)),
            ("experiment_name", _is_text(self.experiment_name, 128)),
            ("requester", _is_text(self.requester, 256)),
            ("round", _is_int(self.round, 0, _MAX_ROUNDS)),
            ("kind", self.kind in ("train", "evaluate", "fingerprint")),
            ("entry_point", isinstance(self.entry_point, str) and bool(_ENTRY_POINT.fullmatch(self.entry_point))),
            ("bundle_digest", self.bundle_digest is None or _is_digest(self.bundle_digest)),
            ("bundle_signer", self.bundle_signer is None or _is_text(self.bundle_signer, 64)),
            ("dataset", _is_text(self.dataset, 80)),  # a name, or "tag:" and a name
            ("n_cases", self.n_cases is None or _is_int(self.n_cases, 0, _MAX_CASES)),
            ("rounds", _is_int(self.rounds, 0, _MAX_ROUNDS)),
            ("task_time_limit_s", self.task_time_limit_s is None or _is_seconds(self.task_time_limit_s)),
            ("local_model", isinstance(self.local_model, bool) and (not self.local_model or self.kind == "train")),
            ("privacy", self.privacy is None or isinstance(self.privacy, TaskPrivacy)),
        ]
        for field, ok in checks:
            if not ok:
                raise ProtocolError(
                    f"job of experiment {self.experiment_id!r}: field '{field}' is malformed "
                    f"({getattr(self, field)!r:.80}); the hub sent a task this site cannot check",
                    field=field,
                )

    @property
    def is_builtin(self) -> bool:
        return self.bundle_digest is None and is_builtin(self.entry_point)


def is_builtin(entry_point: str) -> bool:
    """Whether ``entry_point`` names an algorithm shipped with Laulima (``laulima.algorithms.*``,
    ``laulima.nnunet``)."""
    return is_builtin_name(entry_point)


def _is_int(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_text(value: object, limit: int) -> bool:
    return isinstance(value, str) and 0 < len(value) <= limit and value.isprintable()


def _is_digest(value: object) -> bool:
    return isinstance(value, str) and bool(_DIGEST.fullmatch(value))


def _is_seconds(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0 < value <= MAX_TIMEOUT_S
    )


def decide(policy: SitePolicy, job: JobFacts, *, approval: Decision | None = None) -> Decision:
    """Whether ``job`` runs now, waits for an administrator, or is refused.

    ``approval`` is the administrator's recorded decision for the job's experiment (or
    round), from :meth:`laulima.site.approvals.ApprovalStore.decision_for`: RUN (approved)
    or REFUSE (rejected). The order, first match wins:

    1. **Refusals** (no approval overrides them): an algorithm that is neither a built-in nor
       a bundle; a dataset the policy does not allow for this experiment; a cohort below
       ``min_cohort`` (or uncountable, when ``min_cohort`` > 1); more rounds than
       ``max_rounds``; a task time limit above ``max_task_seconds``. They apply to every kind
       of job: training, evaluation and dataset fingerprint alike. Then, for training only,
       the ``[privacy]`` rules (:func:`privacy_refusal`); the budget itself is the gate's, as
       it needs the site's ledger.
    2. **A recorded rejection** refuses, whatever the algorithm.
    3. **Admission** runs the job without asking — a built-in (``algorithms.builtin``), a
       listed digest, a bundle signed by a listed signer — under ``approval = "auto"``,
       except an evaluation job when ``evaluation_auto`` is false. An evaluation job of an
       admitted algorithm runs under ``manual`` too when ``evaluation_auto`` is true. A
       fingerprint job is decided as a training job is (``evaluation_auto`` does not cover
       it): it tells the hub the geometry of the site's cases and their intensity quantiles,
       more than a model's scores, so under ``manual`` an administrator approves it.
    4. **Manual mode** and unadmitted algorithms: a recorded approval runs the job;
       otherwise it waits (ASK) with the reason.
    """
    refusal = _refusal(policy, job)
    if refusal is not None:
        return Decision.refuse(refusal)
    if approval is not None and approval.verdict is Verdict.ASK:
        raise ValueError("approval must be a recorded decision (RUN or REFUSE), not ASK")
    if approval is not None and approval.verdict is Verdict.REFUSE:
        return approval
    admitted = _admission(policy, job)
    evaluating = job.kind == "evaluate"
    if admitted is not None:
        if evaluating and policy.evaluation_auto:
            return Decision.run(f"evaluation-only job; {admitted}")
        if policy.approval == "auto" and not evaluating:
            return Decision.run(admitted)
    if approval is not None:
        return approval
    if admitted is None:
        digest = job.bundle_digest[:12] if job.bundle_digest else job.entry_point
        return Decision.ask(
            f"algorithm bundle {digest} is not admitted by the site's policy "
            "(not a built-in, not a listed digest, not signed by a listed signer); it waits for approval"
        )
    if evaluating:
        return Decision.ask("the site's policy (evaluation_auto = false) has an administrator approve evaluations")
    return Decision.ask("the site's policy (approval = manual) has an administrator approve every experiment")


def _refusal(policy: SitePolicy, job: JobFacts) -> str | None:
    if job.bundle_digest is None and not is_builtin(job.entry_point):
        return (
            f"algorithm {job.entry_point!r} is neither a built-in (laulima.algorithms.*, laulima.nnunet) nor a "
            "bundle; the site runs only those"
        )
    if not policy.datasets.allows(job.experiment_name, job.dataset):
        return f"dataset {job.dataset!r} is not allowed by the site's policy"
    if job.n_cases is None:
        if policy.min_cohort > 1:
            return f"the cases of dataset {job.dataset!r} cannot be counted, policy min_cohort is {policy.min_cohort}"
    elif job.n_cases < policy.min_cohort:
        return f"dataset {job.dataset!r} has {job.n_cases} cases, policy min_cohort is {policy.min_cohort}"
    if policy.max_rounds is not None and job.rounds > policy.max_rounds:
        return f"the experiment asks for {job.rounds} rounds, policy max_rounds is {policy.max_rounds}"
    if job.local_model and policy.local_models == "refuse":
        return (
            'the site\'s policy (local_models = "refuse") does not let a model trained on its data alone leave it; '
            "the experiment's cross-site matrix goes on without it"
        )
    limit = policy.max_task_seconds
    if limit is not None and job.task_time_limit_s is not None and job.task_time_limit_s > limit:
        return f"the experiment's tasks may run {job.task_time_limit_s:g} s, policy max_task_seconds is {limit:g}"
    if job.kind == "train":
        return privacy_refusal(policy.privacy, job.privacy)
    return None


def privacy_refusal(rules: PrivacyPolicy, privacy: TaskPrivacy | None) -> str | None:
    """Why the ``[privacy]`` rules refuse a training job with these DP parameters, or None.

    Only training is checked: evaluation and fingerprint jobs release metrics or aggregates,
    not model updates. δ is bounded only under a budget (``max_epsilon``), as the budget is
    what it is stated at; the noise floor and clip ceiling apply with or without one.
    """
    if privacy is None:
        if rules.require:
            return (
                "the site's policy ([privacy] require = true) runs training only with differential privacy; "
                "add a [privacy] table (clip, noise_multiplier) to the experiment"
            )
        return None
    if privacy.noise_multiplier < rules.min_noise_multiplier:
        return (
            f"the experiment's noise multiplier {privacy.noise_multiplier:g} is below the site's "
            f"[privacy] min_noise_multiplier {rules.min_noise_multiplier:g}; ask for more noise"
        )
    if rules.max_clip is not None and privacy.clip > rules.max_clip:
        return (
            f"the experiment's clip bound {privacy.clip:g} is above the site's [privacy] max_clip "
            f"{rules.max_clip:g}; ask for a smaller clip"
        )
    if rules.max_epsilon is not None and privacy.delta > rules.delta:
        return (
            f"the experiment's δ = {privacy.delta:g} is above the δ = {rules.delta:g} the site's privacy budget "
            "is stated at ([privacy] delta); ask for a smaller delta"
        )
    return None


def _admission(policy: SitePolicy, job: JobFacts) -> str | None:
    """Why the policy admits the job's algorithm without asking, or None."""
    rules = policy.algorithms
    if job.bundle_digest is None:
        return "built-in algorithm admitted by policy" if rules.builtin and is_builtin(job.entry_point) else None
    if job.bundle_digest in rules.digests:
        return "digest admitted"
    if job.bundle_signer is not None and job.bundle_signer in {s.name for s in rules.signers}:
        return f"signed by {job.bundle_signer}"
    return None
