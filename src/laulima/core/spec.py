"""The experiment spec: what a data scientist submits, validated before anything runs."""

from __future__ import annotations

import datetime as dt
import json
import math
import tomllib
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from laulima.core.bundle import MAX_REQUIREMENT_CHARS, MAX_REQUIREMENTS, is_builtin_name
from laulima.core.cohort import CohortFilter
from laulima.core.protocol import N_SAMPLES_MAX, Digest
from laulima.errors import SpecError

__all__ = [
    "APPROVAL_TIMEOUT_S",
    "CONFIG_MAX_BYTES",
    "CONFIG_MAX_DEPTH",
    "MAX_LOCAL_MODELS",
    "MAX_SIGNATURES",
    "MAX_SITES",
    "MAX_TIMEOUT_S",
    "TRAINING_ONLY_FIELDS",
    "UNTRAINED_MODES",
    "INDIVIDUAL_UPDATE_STRATEGIES",
    "DpSgdSpec",
    "EvaluationSpec",
    "ExperimentSpec",
    "PrivacySpec",
    "SecureAggregationSpec",
    "StrategySpec",
    "as_fingerprint_spec",
    "fingerprint_data",
    "fingerprint_name",
    "load_spec",
    "parse_spec",
    "with_calibrated_noise",
]

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"

MAX_SITES = 1000
"""Most sites one spec may list (and the largest quorum it may ask for)."""

MAX_TIMEOUT_S = 7 * 24 * 3600.0
"""Longest round or task time limit: a week. Longer is a typo, and a deadline that far out
keeps the round's tasks and blobs alive for nothing."""

APPROVAL_TIMEOUT_S = 24 * 3600.0
"""Default time the sites' administrators have to approve an experiment: a working day and a
night, so a job submitted in the evening is decided the next morning."""

MAX_SIGNATURES = 16
"""Most signatures one spec may carry for its bundle (one per co-signing scientist)."""

CONFIG_MAX_DEPTH = 32
"""Deepest nesting of tables and lists in ``config``: deeper data only exercises recursion
in every reader (the JSON encoder, pydantic's serializer, the algorithm)."""

CONFIG_MAX_BYTES = 64 * 1024
"""Largest ``config`` as JSON: it is copied into every task the hub hands out."""

_INT64 = 2**63 - 1


class _Strict(BaseModel):
    # allow_inf_nan=False: every float of a spec is finite (inf and nan are valid TOML and
    # Python's JSON parser reads Infinity/NaN; either would break JSON encoding of the tasks).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class StrategySpec(_Strict):
    """Which strategy aggregates the updates, and its parameters (see core.strategies)."""

    name: Literal["fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "trimmed_mean", "feddc", "krum"] = "fedavg"
    proximal_mu: Annotated[float, Field(ge=0, le=1e4)] = 0.01
    server_lr: Annotated[float, Field(gt=0, le=1e3)] = 0.1
    beta_1: Annotated[float, Field(ge=0, lt=1)] = 0.9
    beta_2: Annotated[float, Field(ge=0, lt=1)] = 0.99
    tau: Annotated[float, Field(ge=1e-12, le=1e3)] = 1e-3
    """Adaptivity floor; at least 1e-12 so ``tau**2`` stays a normal float64."""
    trim_fraction: Annotated[float, Field(ge=0, lt=0.5)] = 0.2
    daisy_period: Annotated[int, Field(ge=1, le=1000)] = 1
    """FedDC: after every ``daisy_period``-th round (that is not an aggregation round) each site
    continues from another site's model, drawn from the experiment's seed. *Privacy:* that
    model was trained since the last aggregation on one other hospital's data only, and the
    receiving site holds it: a stronger exposure than an average; weigh it before admitting."""
    aggregation_period: Annotated[int, Field(ge=2, le=1000)] = 4
    """FedDC: after every ``aggregation_period``-th round every site continues from the FedAvg
    aggregate (the hub stores that aggregate every round as the global model regardless).
    Greater than ``daisy_period``, or no model would ever be passed on."""
    krum_f: Annotated[int, Field(ge=0, le=(MAX_SITES - 3) // 2)] = 1
    """Krum: how many Byzantine sites to tolerate; needs ``min_sites >= 2 * krum_f + 3``."""
    krum_m: Annotated[int, Field(ge=1, le=MAX_SITES)] = 1
    """Krum: how many of the best-scored updates to average (1: Krum, more: multi-Krum, an
    unweighted mean); needs ``min_sites >= krum_m + krum_f``."""

    @model_validator(mode="after")
    def _daisy_before_aggregation(self) -> StrategySpec:
        if self.name == "feddc" and self.daisy_period >= self.aggregation_period:
            reason = (
                f"daisy_period = {self.daisy_period} is not below aggregation_period = {self.aggregation_period}: "
                "every model would be averaged before it is passed on; lower daisy_period or raise aggregation_period"
            )
            raise PydanticCustomError(
                "daisy_period_too_long", "{reason}", {"path": "strategy.daisy_period", "reason": reason}
            )
        return self


class EvaluationSpec(_Strict):
    """When the global model is evaluated on every site's validation split."""

    every: Annotated[int, Field(ge=0, le=100_000)] = 1
    """Evaluate after every N-th round; 0 evaluates only the final model."""
    final: bool = True
    cross_site: bool = False
    """After the last round, evaluate the final global model at every participating site (a
    site that contributed an update), as tasks of round ``rounds + 1`` labelled ``global``."""
    local_models: bool = False
    """With ``cross_site``: each participating site first trains a model on its own data only,
    from the initial weights, for the budget it spent in the federation (its rounds x
    ``local_steps``, or x ``local_epochs``); every such model (``local:<site>``) is then
    evaluated at every participating site. *Privacy:* a model trained on one hospital's data
    alone leaves that hospital and is evaluated at the others; a site's policy may refuse it
    (``local_models = "refuse"``)."""

    @model_validator(mode="after")
    def _local_needs_cross_site(self) -> EvaluationSpec:
        if self.local_models and not self.cross_site:
            reason = "local models are only evaluated in the cross-site matrix; set `cross_site = true` as well"
            raise PydanticCustomError(
                "local_models_without_cross_site", "{reason}", {"path": "evaluation.local_models", "reason": reason}
            )
        return self


class DpSgdSpec(_Strict):
    """Sample-level DP-SGD inside local training (Opacus; the built-in segmentation algorithm):
    every example's gradient clipped to ``max_grad_norm``, Gaussian noise of std
    ``noise_multiplier x max_grad_norm`` added to each batch's sum. It protects each case of a
    site, where the site-level noise of :class:`PrivacySpec` protects the site's whole dataset."""

    noise_multiplier: Annotated[float, Field(ge=0.1, le=100)]
    max_grad_norm: Annotated[float, Field(gt=0, le=1e6)] = 1.0


class PrivacySpec(_Strict):
    """Site-level differential privacy (DP-FedAvg, McMahan et al. 2018): each site's update
    (its model minus the model it was given) is clipped to ``clip`` in L2 and Gaussian noise of
    std ``noise_multiplier x clip`` is added — by the site agent, never by the algorithm.

    ``mode = "local"``: each site adds all of that noise to its own update (protects it even
    from the hub). ``"distributed"``: under secure aggregation each site adds a share of std
    ``noise_multiplier x clip / sqrt(threshold)``, so the sum of at least ``threshold`` sites
    the hub can unmask carries the full noise; the hub sees only that sum. Every site accounts
    ε itself (:mod:`laulima.core.privacy.accountant`) and refuses what its policy's budget
    cannot pay for."""

    mode: Literal["local", "distributed"] = "local"
    clip: Annotated[float, Field(gt=0, le=1e6)]
    noise_multiplier: Annotated[float, Field(ge=0, le=1000)] | None = None
    """Noise std over ``clip``. Give it, or ``target_epsilon`` (then it is calibrated at submission)."""
    target_epsilon: Annotated[float, Field(gt=0, le=1000)] | None = None
    """ε over all rounds to calibrate ``noise_multiplier`` for (with ``delta``); kept as a note once calibrated."""
    delta: Annotated[float, Field(gt=0, le=0.01)] = 1e-5
    dp_sgd: DpSgdSpec | None = None

    @model_validator(mode="after")
    def _noise_given(self) -> PrivacySpec:
        if self.noise_multiplier is None and self.target_epsilon is None:
            reason = "give `noise_multiplier` or `target_epsilon` (the noise is calibrated from it)"
            context = {"path": "privacy.noise_multiplier", "reason": reason}
            raise PydanticCustomError("privacy_noise", "{reason}", context)
        return self


INDIVIDUAL_UPDATE_STRATEGIES = ("fedmedian", "trimmed_mean", "krum", "feddc")
"""Strategies that need each site's update on its own: refused under secure aggregation,
where the hub only ever holds the sum."""


class SecureAggregationSpec(_Strict):
    """Secure aggregation (Bonawitz et al. 2017): the hub learns only the sum of the sites'
    updates. Sites agree pairwise masks (X25519), quantise their weighted, clipped update to
    integers modulo 2^32 and mask it; Shamir shares of the mask seeds let the hub remove the
    masks of up to ``max_dropouts`` sites that drop out after masking. With many sites the
    masks and shares run over a sparse graph (SecAgg+, ``neighbours``)."""

    clip: Annotated[float, Field(gt=0, le=1e6)] | None = None
    """L2 bound of each site's update (needed to quantise without overflow); defaults to ``privacy.clip``."""
    max_dropouts: Annotated[int, Field(ge=0, le=MAX_SITES)] | None = None
    """Sites that may drop out after masking with the round still unmasked. Default, and
    ceiling: fewer than half of the round's sites (the threshold stays a strict majority)."""
    phase_timeout_s: Annotated[float, Field(gt=0, le=MAX_TIMEOUT_S)] = 120.0
    """How long the hub waits for missing sites at each phase after training (keys are awaited
    until the round's deadline): after it, the round goes on with those that answered."""
    neighbours: Annotated[int, Field(ge=2, le=MAX_SITES)] | None = None
    """SecAgg+ (Bell et al. 2020): each site masks pairwise with, and shares its secrets among,
    only this many neighbours in a sparse graph drawn anew each round, instead of every other
    site (O(k) instead of O(n) work and messages per site). Even. Default: the complete graph
    (Bonawitz et al.) up to 16 sites, ``2 * ceil(log2 n)`` beyond. A site's update then stays
    hidden unless ``k / 2 + 1`` of its own neighbours collude with the hub, and each
    neighbourhood tolerates ``k / 2`` dropouts (besides ``max_dropouts`` over the round).
    A value of at least the round's sites minus one is the complete graph."""

    @field_validator("neighbours")
    @classmethod
    def _even_neighbours(cls, k: int | None) -> int | None:
        if k is not None and k % 2:
            reason = (
                f"neighbours = {k} is odd: every site links to k / 2 sites on each side of the ring; "
                f"give an even number such as {k + 1}"
            )
            raise PydanticCustomError(
                "neighbours_odd", "{reason}", {"path": "secure_aggregation.neighbours", "reason": reason}
            )
        return k


MAX_LOCAL_MODELS = 64
"""Most local-only models a cross-site evaluation trains: every one is evaluated at every
participating site, so the matrix costs sites squared tasks. Past this many participating
sites only the global model is evaluated (and the experiment says so)."""

_TRAINING_ONLY = (
    "local_epochs",
    "local_steps",
    "max_update_norm",
    "max_samples_per_site",
    "strategy",
    "evaluation",
    "privacy",
    "secure_aggregation",
)
"""Fields an evaluate- or fingerprint-mode spec must leave at their defaults: nothing is trained."""

TRAINING_ONLY_FIELDS = (*_TRAINING_ONLY, "rounds")
"""What a training spec carries that an untrained mode must not (``rounds`` included)."""

UNTRAINED_MODES = ("evaluate", "fingerprint")
"""Modes that train nothing: ``rounds`` is 0 and one step of tasks (round 1) follows."""

_WHAT_INSTEAD = {
    "evaluate": "or submit a training experiment, whose [evaluation] cross_site = true evaluates its final model "
    "everywhere",
    "fingerprint": "`laulima experiment fingerprint` drops them from a training spec for you",
}


class ExperimentSpec(_Strict):
    """A federated experiment. Loaded from TOML; every error names the field."""

    name: Annotated[str, Field(pattern=_NAME)]
    mode: Literal["train", "evaluate", "fingerprint"] = "train"
    """``train``: a federated training run of ``rounds`` rounds. ``evaluate``: no training; the
    initial weights (the model to score) are evaluated once at each selected site, as tasks
    of round 1 labelled ``model``. ``fingerprint``: no model at all; each selected site
    summarises its cohort as a dataset fingerprint (:mod:`laulima.core.fingerprint`), as tasks
    of round 1, and the hub merges them (the initial weights are the empty model). With
    ``evaluate`` and ``fingerprint``, ``rounds`` is 0 (or omitted) and training-only fields
    (``local_epochs``, ``local_steps``, ``strategy``, ``evaluation``, ``max_update_norm``,
    ``max_samples_per_site``) must be left out."""
    algorithm: Annotated[str, Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", max_length=200)]
    """Entry point ``package.module:Class`` of a ``laulima.Algorithm``: a built-in
    (``laulima.algorithms.*``), or the entry point of the bundle named by ``bundle`` (or packed
    from ``source``). Anything else is refused, so ``os:system`` never reaches a site."""
    bundle: Digest | None = None
    """sha256 of the algorithm bundle, uploaded before as a blob (``laulima experiment submit``
    packs and uploads it). Sites run exactly these bytes, after their policy admits them."""
    signatures: Annotated[
        list[Annotated[str, Field(pattern=r"^[0-9a-f]{128}$")]], Field(max_length=MAX_SIGNATURES)
    ] = []
    """Ed25519 signatures of ``bundle``'s digest (``laulima algorithm sign``), for site policies
    that admit what a known scientist signed. Only with ``bundle``."""
    source: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    """Client side only: the local package folder or ``.py`` file of the algorithm, packed into
    a bundle by ``laulima experiment submit``. The hub refuses a spec that still carries it: it
    is a path on the scientist's machine."""
    requirements: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=MAX_REQUIREMENT_CHARS)]], Field(max_length=MAX_REQUIREMENTS)
    ] = []
    """Client side only, with ``source``: PEP 508 requirements written into the bundle's manifest."""
    dataset: Annotated[str, Field(pattern=r"^(tag:)?[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    """Name under which each site registered its local dataset, or ``tag:NAME``: every dataset
    a site registered with that tag (``laulima site dataset add ... --tag NAME``)."""
    cohort: CohortFilter | None = None
    """Which of the dataset's cases each site uses (modality, spacing range, label presence,
    series description, a minimum size); resolved at each site (core/cohort.py)."""
    sites: Annotated[list[Annotated[str, Field(pattern=_NAME)]], Field(max_length=MAX_SITES)] = []
    """Sites that take part; empty means every site registered when the experiment starts."""
    rounds: Annotated[int, Field(ge=0, le=100_000)]
    """Training rounds: at least 1 with ``mode = "train"``, 0 (or omitted) with ``"evaluate"``
    and ``"fingerprint"``."""
    local_epochs: Annotated[int, Field(ge=0, le=100_000)] = 1
    local_steps: Annotated[int, Field(ge=0, le=100_000_000)] = 0
    """Optimizer steps per round; when > 0 it replaces local_epochs."""
    min_sites: Annotated[int, Field(ge=1, le=MAX_SITES)] = 1
    round_timeout_s: Annotated[float, Field(gt=0, le=MAX_TIMEOUT_S)] = 600.0
    task_timeout_s: Annotated[float, Field(gt=0, le=MAX_TIMEOUT_S)] | None = None
    """Time limit for one algorithm run at a site; defaults to round_timeout_s."""
    max_update_norm: Annotated[float, Field(gt=0, le=1e30)] | None = None
    """Refuse updates whose L2 distance to the weights their task was given (the global model;
    with FedDC, possibly another site's model) exceeds this."""
    max_samples_per_site: Annotated[int, Field(ge=1, le=N_SAMPLES_MAX)] | None = None
    """Cap on the ``n_samples`` one site may claim for one update (its weight in FedAvg);
    None: only the hub's own bounds apply (N_SAMPLES_MAX, the cases a site reported)."""
    seed: Annotated[int, Field(ge=0, le=_INT64)] = 0
    approval_timeout_s: Annotated[float, Field(gt=0, le=MAX_TIMEOUT_S)] = APPROVAL_TIMEOUT_S
    """How long after submission the sites' administrators may take to approve the experiment:
    a site holding a task for its administrator keeps the round open until then, and counts
    as failed after. Measured from submission, not per round."""
    strategy: StrategySpec = StrategySpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    privacy: PrivacySpec | None = None
    secure_aggregation: SecureAggregationSpec | None = None
    config: dict[str, Any] = {}
    """Free-form parameters handed to the algorithm (learning rate, batch size, ...)."""

    @model_validator(mode="before")
    @classmethod
    def _rounds_of_mode(cls, data: Any) -> Any:
        # Before the fields: an evaluate-mode spec may omit ``rounds`` (0), a training one
        # needs at least one round. Anything not a table is left to pydantic's own error.
        if not isinstance(data, dict):
            return data
        mode = data.get("mode")
        if mode in UNTRAINED_MODES:
            rounds = data.get("rounds", 0)
            if rounds != 0 or isinstance(rounds, bool):
                reason = (
                    f"is {rounds!r}, but mode = '{mode}' trains nothing; leave `rounds` out (or 0), or use "
                    "mode = 'train'"
                )
                raise PydanticCustomError(f"{mode}_rounds", "{reason}", {"path": "rounds", "reason": reason})
            return {**data, "rounds": 0}
        rounds = data.get("rounds")
        if isinstance(rounds, int) and not isinstance(rounds, bool) and rounds < 1:
            reason = (
                f"Input should be greater than or equal to 1 (is {rounds}); a training experiment runs at least one "
                "round (mode = 'evaluate' only scores a model)"
            )
            raise PydanticCustomError("greater_than_equal", "{reason}", {"path": "rounds", "reason": reason})
        return data

    @model_validator(mode="after")
    def _untrained_mode_trains_nothing(self) -> ExperimentSpec:
        if self.mode not in UNTRAINED_MODES:
            return self
        defaults = ExperimentSpec.model_fields
        for name in _TRAINING_ONLY:
            if getattr(self, name) != defaults[name].get_default(call_default_factory=True):
                reason = (
                    f"is a training setting, but mode = '{self.mode}' trains nothing; leave it out "
                    f"({_WHAT_INSTEAD[self.mode]})"
                )
                raise PydanticCustomError(f"{self.mode}_training_field", "{reason}", {"path": name, "reason": reason})
        return self

    @property
    def final_index(self) -> int:
        """The round index of the tasks that follow training: the cross-site evaluation (and
        its local-only models) of a training run, the one evaluation of an evaluate-mode run,
        the fingerprint tasks of a fingerprint-mode run."""
        return self.rounds + 1

    @property
    def has_finale(self) -> bool:
        """Whether labelled tasks (round ``final_index``) follow the rounds."""
        return self.mode in UNTRAINED_MODES or self.evaluation.cross_site

    @field_validator("sites")
    @classmethod
    def _unique_sites(cls, sites: list[str]) -> list[str]:
        dup = sorted(name for name, n in Counter(sites).items() if n > 1)
        if dup:
            raise ValueError(f"site(s) listed twice: {', '.join(dup)}")
        return sites

    @field_validator("config", mode="before")
    @classmethod
    def _bounded_config(cls, config: Any) -> Any:
        # mode="before": runs on the raw value, before anything walks it recursively.
        problem = config_problem(config)
        if problem is not None:
            path, reason = problem
            if len(path) > 200:  # 32 levels of long keys: keep the message readable
                path = f"{path[:100]}...{path[-80:]}"
            raise PydanticCustomError("config_invalid", "{reason}", {"path": path, "reason": reason})
        return config

    @field_validator("signatures")
    @classmethod
    def _unique_signatures(cls, signatures: list[str]) -> list[str]:
        if len(set(signatures)) != len(signatures):
            raise ValueError("a signature is listed twice; list each signature once")
        return signatures

    @model_validator(mode="after")
    def _algorithm_known(self, info: ValidationInfo) -> ExperimentSpec:
        # A spec the hub accepted before (re-read from its database) keeps running even if it
        # predates this rule; every new spec names a built-in or a bundle.
        if self.signatures and self.bundle is None and self.source is None:
            reason = "signatures sign a bundle's digest; give the `bundle` (or the `source` packed into it)"
            raise PydanticCustomError("signatures_without_bundle", "{reason}", {"path": "signatures", "reason": reason})
        accepted = bool(info.context and info.context.get("accepted"))
        if self.bundle is None and self.source is None and not accepted and not is_builtin_name(self.algorithm):
            reason = (
                f"{self.algorithm!r} is neither a built-in (laulima.algorithms.*, laulima.nnunet) nor packed: name a "
                "`source` folder or file to pack, or a `bundle` digest"
            )
            raise PydanticCustomError("algorithm_not_packed", "{reason}", {"path": "algorithm", "reason": reason})
        return self

    @model_validator(mode="after")
    def _quorum_possible(self) -> ExperimentSpec:
        if self.sites and self.min_sites > len(self.sites):
            raise ValueError(
                f"min_sites = {self.min_sites} but only {len(self.sites)} sites are listed; "
                "lower min_sites or list more sites"
            )
        return self

    @model_validator(mode="after")
    def _krum_quorum(self) -> ExperimentSpec:
        # Krum's guarantee needs n >= 2f + 3 results; min_sites is the only bound on n the hub
        # enforces, so it must promise that many (and krum_m + krum_f, so no Byzantine update
        # must be averaged).
        strategy = self.strategy
        if strategy.name == "krum":
            need = max(2 * strategy.krum_f + 3, strategy.krum_m + strategy.krum_f)
            if self.min_sites < need:
                reason = (
                    f"min_sites = {self.min_sites}, but strategy krum with krum_f = {strategy.krum_f} and krum_m = "
                    f"{strategy.krum_m} needs at least {need} results per round (2 * krum_f + 3, and krum_m + "
                    "krum_f); raise min_sites (and list that many sites) or lower krum_f / krum_m"
                )
                raise PydanticCustomError("krum_quorum", "{reason}", {"path": "min_sites", "reason": reason})
        return self

    @model_validator(mode="after")
    def _secure_aggregation_fits(self) -> ExperimentSpec:
        secagg, privacy = self.secure_aggregation, self.privacy
        problem: tuple[str, str] | None = None
        if privacy is not None and privacy.mode == "distributed" and secagg is None:
            problem = ("privacy.mode", "'distributed' noise needs secure aggregation: add a [secure_aggregation] table")
        elif secagg is not None and secagg.clip is None and privacy is None:
            problem = ("secure_aggregation.clip", "give the L2 bound of a site's update (or a [privacy] clip)")
        elif secagg is not None and self.strategy.name in INDIVIDUAL_UPDATE_STRATEGIES:
            problem = (
                "strategy.name",
                f"{self.strategy.name!r} needs each site's update, but under secure aggregation the hub only holds "
                "their sum; use fedavg, fedprox, fedadam or fedyogi, or drop [secure_aggregation]",
            )
        elif (privacy is not None or secagg is not None) and self.evaluation.local_models:
            problem = (
                "evaluation.local_models",
                "a local-only model leaves its site without clipping, noise or masking; drop local_models (the "
                "cross-site matrix of the global model stays) or drop [privacy] / [secure_aggregation]",
            )
        elif secagg is not None and self.min_sites < 2:
            problem = ("min_sites", "secure aggregation needs at least 2 sites per round (a sum of one is the update)")
        if problem is not None:
            path, reason = problem
            raise PydanticCustomError("secure_aggregation", "{reason}", {"path": path, "reason": reason})
        return self

    @property
    def update_clip(self) -> float | None:
        """The L2 bound the sites clip their update to, if any (secure aggregation's, else privacy's)."""
        if self.secure_aggregation is not None and self.secure_aggregation.clip is not None:
            return self.secure_aggregation.clip
        return self.privacy.clip if self.privacy is not None else None

    @property
    def effective_task_timeout_s(self) -> float:
        return self.task_timeout_s if self.task_timeout_s is not None else self.round_timeout_s


def with_calibrated_noise(spec: ExperimentSpec) -> ExperimentSpec:
    """``privacy.target_epsilon`` turned into ``noise_multiplier`` for the spec's rounds and
    ``delta`` (dp_accounting's RDP accountant), once, when the hub accepts the spec: every site
    then applies, and accounts, the same noise. A spec that gives the multiplier is unchanged."""
    privacy = spec.privacy
    if privacy is None or privacy.noise_multiplier is not None or privacy.target_epsilon is None:
        return spec
    from laulima.core.privacy.accountant import noise_multiplier_for  # dp_accounting: only when asked

    sigma = noise_multiplier_for(privacy.target_epsilon, privacy.delta, count=max(spec.rounds, 1))
    return spec.model_copy(update={"privacy": privacy.model_copy(update={"noise_multiplier": sigma})})


def config_problem(config: Any) -> tuple[str, str] | None:
    """``(path, reason)`` of the first thing wrong with a ``config`` table, or None.

    Iterative (an explicit stack, no recursion), so a table nested thousands deep is refused
    in O(size) instead of crashing whatever walks it first. Values must be what TOML and
    JSON carry: tables with string keys, lists, strings, booleans, finite floats, integers
    within int64 (and TOML's dates and times).
    """
    if not isinstance(config, dict):
        return "config", f"must be a table of parameters, got {type(config).__name__}"
    size = 0
    stack: list[tuple[str, Any, int]] = [("config", config, 1)]
    while stack:
        path, value, depth = stack.pop()
        if isinstance(value, dict | list | tuple):
            if depth > CONFIG_MAX_DEPTH:
                return path, f"nested deeper than {CONFIG_MAX_DEPTH} levels; flatten the parameters"
            if isinstance(value, dict):
                for key, item in value.items():
                    if not isinstance(key, str):
                        return path, f"has a key {key!r} that is not a string"
                    size += len(key) + 4
                    stack.append((f"{path}.{key}", item, depth + 1))
            else:
                stack.extend((f"{path}[{i}]", item, depth + 1) for i, item in enumerate(value))
            size += 2
        elif isinstance(value, float):
            if not math.isfinite(value):
                return path, f"is {value}; every number in a spec must be finite"
        elif isinstance(value, int):  # bool included
            if not -_INT64 - 1 <= value <= _INT64:
                return path, "is an integer outside the 64-bit range"
        elif isinstance(value, str):
            if len(value) > CONFIG_MAX_BYTES:
                return path, f"is a string longer than {CONFIG_MAX_BYTES // 1024} KiB; pass large data as a file"
            size += len(value)
        elif value is not None and not isinstance(value, dt.date | dt.time):  # datetime is a date
            return path, f"is a {type(value).__name__}; use numbers, strings, booleans, lists and tables"
        size += 1
        if size > CONFIG_MAX_BYTES:  # stop early; the exact size is measured below
            break
    encoded = size if size > CONFIG_MAX_BYTES else len(json.dumps(config, default=str).encode("utf-8"))
    if encoded > CONFIG_MAX_BYTES:
        return "config", f"is larger than {CONFIG_MAX_BYTES // 1024} KiB as JSON; pass large data as a file"
    return None


def fingerprint_name(name: str) -> str:
    """``<name>-fingerprint``, within a spec name's 64 characters (unchanged if it ends so)."""
    suffix = "-fingerprint"
    return name if name.endswith(suffix) else f"{name[: 64 - len(suffix)]}{suffix}"


def fingerprint_data(data: Mapping[str, Any], *, name: str | None = None) -> dict[str, Any]:
    """A (training) spec's table as a fingerprint-mode spec's: the same algorithm, dataset,
    cohort, sites, seed, time limits and ``config``, ``mode = "fingerprint"``, without what
    only training reads (:data:`TRAINING_ONLY_FIELDS`), named ``name`` (default
    ``<name>-fingerprint``). Not validated: :func:`parse_spec` does that."""
    out = {key: value for key, value in data.items() if key not in TRAINING_ONLY_FIELDS}
    out["mode"] = "fingerprint"
    if name is not None:
        out["name"] = name
    elif isinstance(out.get("name"), str) and out["name"]:
        out["name"] = fingerprint_name(out["name"])
    return out


def as_fingerprint_spec(spec: ExperimentSpec, *, name: str | None = None) -> ExperimentSpec:
    """The fingerprint-mode experiment of a (training) spec (see :func:`fingerprint_data`)."""
    data = fingerprint_data(spec.model_dump(mode="json"), name=name or None)
    return parse_spec(data, source=f"fingerprint of {spec.name}")


def parse_spec(data: dict[str, Any], *, source: str = "<spec>", accepted: bool = False) -> ExperimentSpec:
    """Validate a spec mapping; the first error names ``source`` and the field.

    ``accepted``: the hub re-reads a spec it accepted earlier; rules added since (an algorithm
    must be a built-in or a bundle) do not stop an experiment that is already running."""
    try:
        return ExperimentSpec.model_validate(data, context={"accepted": accepted})
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str((err.get("ctx") or {}).get("path") or ".".join(str(p) for p in err["loc"]) or "(top level)")
        reason = err["msg"]
        if err["type"] == "extra_forbidden":
            reason = "unknown field; check its spelling against docs/architecture.md"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise SpecError(f"{source}: field '{field}': {reason}{more}", file=source, field=field) from exc
    except RecursionError:
        raise SpecError(
            f"{source}: the spec is nested too deeply to read; config allows {CONFIG_MAX_DEPTH} levels",
            file=source,
        ) from None


def load_spec(path: str | Path) -> ExperimentSpec:
    """Read and validate a TOML spec file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise SpecError(f"{path}: no such spec file", file=str(path)) from exc
    except (OSError, UnicodeDecodeError) as exc:  # a directory, no permission, not UTF-8
        raise SpecError(f"{path}: cannot read the spec file ({exc})", file=str(path)) from exc
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: not valid TOML: {exc}", file=str(path)) from exc
    except RecursionError:  # tomllib reads inline tables and arrays recursively
        raise SpecError(
            f"{path}: tables or arrays nested too deeply to read; config allows {CONFIG_MAX_DEPTH} levels",
            file=str(path),
        ) from None
    return parse_spec(data, source=str(path))
