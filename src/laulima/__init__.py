"""Laulima: federated learning for medical imaging.

Images stay in their hospital; a hub coordinates rounds, site agents pull tasks, train
locally and send back only model updates.
"""

from __future__ import annotations

from laulima.algorithms.base import Algorithm, Evaluation, SiteContext, TrainConfig, Update
from laulima.errors import LaulimaError

__all__ = ["Algorithm", "Evaluation", "LaulimaError", "SiteContext", "TrainConfig", "Update", "__version__"]

__version__ = "0.1.0"
