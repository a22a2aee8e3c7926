"""Aggregation strategies: pure objects, one file per algorithm, built from a StrategySpec."""

from __future__ import annotations

from laulima.core.spec import StrategySpec
from laulima.core.strategies.base import FitResult, NotEnoughResults, Strategy
from laulima.core.strategies.fedavg import FedAvg
from laulima.core.strategies.feddc import FedDC
from laulima.core.strategies.fedmedian import FedMedian
from laulima.core.strategies.fedopt import FedAdam, FedYogi
from laulima.core.strategies.fedprox import FedProx
from laulima.core.strategies.krum import Krum
from laulima.core.strategies.trimmed_mean import TrimmedMean
from laulima.errors import ConfigurationError

__all__ = [
    "FedAdam",
    "FedAvg",
    "FedDC",
    "FedMedian",
    "FedProx",
    "FedYogi",
    "FitResult",
    "Krum",
    "NotEnoughResults",
    "Strategy",
    "TrimmedMean",
    "build_strategy",
]


def build_strategy(spec: StrategySpec, *, seed: int = 0) -> Strategy:
    """The strategy an experiment spec names, with the spec's parameters.

    ``seed``: the experiment's seed, for strategies that draw at random (FedDC's
    permutations), so every hub — and a restarted one — draws the same."""
    match spec.name:
        case "fedavg":
            return FedAvg()
        case "fedprox":
            return FedProx(proximal_mu=spec.proximal_mu)
        case "fedadam" | "fedyogi":
            cls = FedAdam if spec.name == "fedadam" else FedYogi
            return cls(server_lr=spec.server_lr, beta_1=spec.beta_1, beta_2=spec.beta_2, tau=spec.tau)
        case "fedmedian":
            return FedMedian()
        case "trimmed_mean":
            return TrimmedMean(trim_fraction=spec.trim_fraction)
        case "feddc":
            return FedDC(daisy_period=spec.daisy_period, aggregation_period=spec.aggregation_period, seed=seed)
        case "krum":
            return Krum(f=spec.krum_f, m=spec.krum_m)
    raise ConfigurationError(  # unreachable while StrategySpec.name is a Literal of the above
        f"strategy {spec.name!r} is unknown; choose one of fedavg, fedprox, fedadam, fedyogi, fedmedian, "
        "trimmed_mean, feddc, krum",
        field="strategy.name",
    )
