"""The algorithm API: what a data scientist writes, and what a site runs.

The lifecycle follows MONAI's ``monai.fl`` ClientAlgo (initialize, train, get_weights,
evaluate, abort, finalize) with precise types instead of loose dicts: ``setup`` is
``initialize``, ``train`` returns an :class:`Update` carrying the weights, so a separate
``get_weights`` is not needed.
"""

from __future__ import annotations

import importlib
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

from laulima.core.weights import Weights
from laulima.errors import ConfigurationError

if TYPE_CHECKING:  # pydantic: imported only where a fingerprint is computed (the worker stays lean)
    from laulima.core.fingerprint import SiteFingerprint

__all__ = ["Algorithm", "DpSgd", "Evaluation", "SiteContext", "TrainConfig", "Update", "load_algorithm"]


@dataclass(frozen=True)
class SiteContext:
    """Where an algorithm runs: the site, its local dataset and a private work folder."""

    site: str
    dataset: str
    dataset_path: Path
    work_dir: Path
    params: Mapping[str, Any] = field(default_factory=dict)
    """The experiment's free-form ``config`` table."""
    seed: int = 0
    cache_dir: Path | None = None
    """A private folder of this experiment at this site (``<site home>/cache/experiment-<id>``),
    kept across the experiment's tasks (and writable in the sandbox), e.g. for preprocessed
    data; ``work_dir`` is the task's own and goes with it. The agent removes a cache folder
    not modified for ``CACHE_MAX_AGE_S`` (a week) when it starts. None where the site gives
    none (a run outside an agent)."""


@dataclass(frozen=True)
class DpSgd:
    """Sample-level DP-SGD asked of local training (the task's ``privacy.dp_sgd``): each example's
    gradient clipped to ``max_grad_norm`` in L2, Gaussian noise of std ``noise_multiplier x
    max_grad_norm`` added to every step's sum. ``delta`` is the δ the algorithm reports its ε at
    (the experiment's ``privacy.delta``). Only algorithms with ``supports_dp_sgd`` get one."""

    noise_multiplier: float
    max_grad_norm: float
    delta: float

    def __post_init__(self) -> None:
        # Checked here too, not only by the hub: a zero or NaN here would silently train without privacy.
        for name, value, ok in (
            ("noise_multiplier", self.noise_multiplier, lambda v: v > 0),
            ("max_grad_norm", self.max_grad_norm, lambda v: v > 0),
            ("delta", self.delta, lambda v: 0 < v < 1),
        ):
            real = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
            if not (real and ok(float(value))):
                raise ConfigurationError(
                    f"DP-SGD: {name} = {value!r} is out of range (noise_multiplier and max_grad_norm must be "
                    "finite and > 0, delta in (0, 1)); fix the experiment's [privacy.dp_sgd] table",
                    field=f"privacy.dp_sgd.{name}",
                )


@dataclass(frozen=True)
class TrainConfig:
    """How much local work one round asks for, and strategy extras (FedProx's mu)."""

    round: int
    local_epochs: int = 1
    local_steps: int = 0
    """When > 0, the number of optimizer steps; it replaces local_epochs."""
    proximal_mu: float = 0.0
    seed: int = 0
    progress: tuple[float, float] = (0.0, 1.0)
    """The part of the model's whole training this task covers, as fractions: round r of R is
    ((r - 1) / R, r / R), a local-only model trained in one task (0, 1). Learning-rate
    schedules follow it, so a federated model decays over its rounds as a centrally trained
    one does over its steps."""
    dp_sgd: DpSgd | None = None
    """Train with sample-level DP-SGD (set only for an algorithm whose ``supports_dp_sgd`` is True;
    the worker refuses the task otherwise)."""


@dataclass(frozen=True)
class Update:
    """A site's training result: new weights, how many samples made them, and metrics."""

    weights: Weights
    n_samples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Evaluation:
    """Local validation metrics of a model, with the number of samples they cover."""

    n_samples: int
    metrics: dict[str, float]


class Algorithm(ABC):
    """Base class of every federated algorithm.

    An instance lives in one child process for one task: ``setup`` once, then ``train``
    or ``evaluate`` once, then ``finalize``; for a dataset fingerprint task, ``fingerprint``
    once (without ``setup``: there is no model yet), then ``finalize``. ``initial_weights``
    runs where the experiment is submitted and sees no data.
    """

    supports_dp_sgd: ClassVar[bool] = False
    """Whether ``train`` implements :attr:`TrainConfig.dp_sgd`. The worker refuses a DP-SGD task
    for an algorithm without it rather than train without the privacy the experiment promised."""

    @abstractmethod
    def initial_weights(self, params: Mapping[str, Any], seed: int) -> Weights:
        """The model the first round starts from."""

    @abstractmethod
    def setup(self, ctx: SiteContext) -> None:
        """Build model and data loaders from the site-local dataset."""

    @abstractmethod
    def train(self, weights: Weights, config: TrainConfig) -> Update:
        """Train from ``weights`` on local data."""

    @abstractmethod
    def evaluate(self, weights: Weights) -> Evaluation:
        """Validate ``weights`` on the local validation split."""

    def fingerprint(self, ctx: SiteContext) -> SiteFingerprint:
        """Summarise the site's cohort as a dataset fingerprint (``mode = "fingerprint"``
        experiments; see :mod:`laulima.core.fingerprint`). Called without ``setup``. Only
        aggregates leave the site: never per-case values beyond the geometry table.

        The default computes none: an algorithm that plans from a fingerprint overrides it."""
        raise ConfigurationError(
            f"algorithm {type(self).__module__}:{type(self).__qualname__} computes no dataset fingerprint; "
            "fingerprint-mode experiments need an algorithm that implements Algorithm.fingerprint "
            "(such as laulima.nnunet:NnUNet)",
            field="algorithm",
        )

    def abort(self) -> None:  # noqa: B027 - optional hook
        """Stop work early; called when the task is cancelled."""

    def finalize(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""


def load_algorithm(entry_point: str) -> type[Algorithm]:
    """Import ``package.module:Class`` and check that it is an :class:`Algorithm`."""
    module_name, sep, attr = entry_point.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigurationError(
            f"algorithm {entry_point!r}: expected an entry point 'package.module:Class'",
            field="algorithm",
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(
            f"algorithm {entry_point!r}: module {module_name!r} cannot be imported ({exc}); "
            "install the package that provides it",
            field="algorithm",
        ) from exc
    return algorithm_class(module, attr, entry_point)


def algorithm_class(module: ModuleType, attr: str, entry_point: str) -> type[Algorithm]:
    """``module.attr``, checked to be an :class:`Algorithm` subclass (whatever imported the module)."""
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
        raise ConfigurationError(
            f"algorithm {entry_point!r}: {attr!r} is not a laulima.Algorithm subclass in {module.__name__}",
            field="algorithm",
        )
    return cls
