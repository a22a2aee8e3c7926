"""The strategy interface: how a round's updates become the next global model.

Strategies know nothing of HTTP, sites' addresses, databases or time: the hub's
orchestrator owns the round loop and hands a strategy the global model and the round's
results. ``FitResult.weights`` may be a lazy mapping (the hub passes memory-mapped files),
so a strategy that folds results one by one keeps only the aggregate plus one update in
memory.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from laulima.core.weights import Weights
from laulima.errors import DataError

__all__ = ["FitResult", "NotEnoughResults", "Strategy"]


@dataclass(frozen=True)
class FitResult:
    """One site's training result for a round."""

    site: str
    weights: Mapping[str, np.ndarray]
    n_samples: int


class Strategy(ABC):
    """Turns a round's results into the next global model.

    Subclasses implement :meth:`aggregate`; stateful ones (server-side optimizers) also
    :meth:`state_dict` / :meth:`load_state_dict`, which the hub checkpoints with every
    round so a restarted hub continues exactly where it stopped.
    """

    name: ClassVar[str]

    def fit_config(self, round_index: int) -> dict[str, Any]:
        """Extra parameters sent to every site with its training task."""
        return {}

    @abstractmethod
    def aggregate(self, global_weights: Mapping[str, np.ndarray], results: Sequence[FitResult]) -> Weights:
        """Return the new global model. ``results`` are ordered by site name."""

    def handoff(self, round_index: int, sites: Sequence[str]) -> Mapping[str, str] | None:
        """Which model each site continues from after round ``round_index``.

        ``sites`` are those with an accepted update this round, in name order. Return
        ``receiver -> sender`` (both among ``sites``): the receiver's next training task
        starts from the sender's update of this round instead of the new global model.
        None (the default, and every strategy but FedDC): everyone continues from the new
        global model. Sites the mapping leaves out, or that sent no update, get the global
        model. Pure: the hub calls it again after a restart and must get the same answer.
        """
        return None

    def state_dict(self) -> Weights:
        """Arrays that must survive a hub restart (empty for stateless strategies)."""
        return {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:  # noqa: B027 - stateless default
        """Restore what :meth:`state_dict` returned."""


class NotEnoughResults(DataError):
    """The round's results are too few for the strategy's guarantee (Krum needs ``2f + 3``).

    The orchestrator fails the round with this message and keeps the previous global model:
    aggregating anyway would silently void the robustness the experiment asked for."""
