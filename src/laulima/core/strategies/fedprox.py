"""FedProx: FedAvg on the hub, a proximal term in every site's local objective.

Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, "Federated Optimization in Heterogeneous
Networks", MLSys 2020 (arXiv:1812.06127). Sites minimise
``F_k(w) + (mu / 2) * ||w - w_global||^2``; the server step is FedAvg's. The hub sends
``proximal_mu`` with each training task and the site's algorithm applies it.
"""

from __future__ import annotations

from typing import Any, ClassVar

from laulima.core.strategies.fedavg import FedAvg
from laulima.errors import ConfigurationError

__all__ = ["FedProx"]


class FedProx(FedAvg):
    """FedAvg aggregation; ``fit_config`` carries ``proximal_mu`` to the sites."""

    name: ClassVar[str] = "fedprox"

    def __init__(self, proximal_mu: float = 0.01) -> None:
        if not proximal_mu >= 0:  # also refuses NaN
            raise ConfigurationError(f"fedprox: proximal_mu must be >= 0, got {proximal_mu}", field="proximal_mu")
        self.proximal_mu = float(proximal_mu)

    def fit_config(self, round_index: int) -> dict[str, Any]:
        return {"proximal_mu": self.proximal_mu}
