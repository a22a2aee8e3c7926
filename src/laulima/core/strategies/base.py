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

__all__ = ["FitResult", "Strategy"]


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

    def state_dict(self) -> Weights:
        """Arrays that must survive a hub restart (empty for stateless strategies)."""
        return {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:  # noqa: B027 - stateless default
        """Restore what :meth:`state_dict` returned."""
