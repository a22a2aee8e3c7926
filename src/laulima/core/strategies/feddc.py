"""FedDC: federated daisy-chaining — models travel from site to site between aggregations.

Kamp, Fischer, Vreeken, "Federated Learning from Small Datasets", ICLR 2023
(arXiv:2110.03469), Algorithm 1. With many sites that each hold little data, a local model
overfits its site before it is averaged. FedDC lets each model visit several sites between
aggregations, so it sees more data. In Laulima one hub round is one local training period
(``local_steps`` / ``local_epochs``); after round ``r``:

* ``r % aggregation_period == 0`` (``b``): every site continues from the aggregate (FedAvg,
  weighted by ``n_samples``);
* else ``r % daisy_period == 0`` (``d``): every site continues from *another* site's model,
  a random permutation of the round's sites drawn from the experiment's seed and ``r``
  (a derangement when there are two or more sites, so every model moves);
* else every site continues from its own model.

*Changed from the paper:* the hub computes and stores the FedAvg aggregate **every** round as
the experiment's global model, not only every ``b`` rounds. It costs one fold per round and
gives evaluation a model each round, and the final model is always an aggregate, whatever
``rounds`` is; the sites' local models still follow the schedule above.

*Privacy.* A daisy-chained model has been trained on one other site's data only since the
last aggregation (for ``d = 1`` and one hop: on exactly one other hospital's data), and it
is sent to another site as it is. That site can therefore probe a model of a single other
hospital — a stronger exposure than an average over many sites (membership inference,
model inversion). The hub sends the model without the sender's metadata (sample count,
metrics) and never names the sender, but the weights themselves are what they are. Site
policies and consortium agreements should weigh this before admitting a FedDC experiment.

Pure: :meth:`FedDC.handoff` depends only on the seed, the round and the site names, so a
restarted hub derives the same permutation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np

from laulima.core.strategies.fedavg import FedAvg
from laulima.errors import ConfigurationError

__all__ = ["FedDC", "derangement"]

#: Domain separation of FedDC's random stream from anything else drawn from the seed.
_STREAM = 0xFEDDC


class FedDC(FedAvg):
    """FedAvg aggregation every round; :meth:`handoff` passes models between sites."""

    name: ClassVar[str] = "feddc"

    def __init__(self, daisy_period: int = 1, aggregation_period: int = 4, *, seed: int = 0) -> None:
        for field, value in (("daisy_period", daisy_period), ("aggregation_period", aggregation_period)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"feddc: {field} must be a whole number >= 1, got {value!r}", field=field)
        if seed < 0:
            raise ConfigurationError(f"feddc: seed must be >= 0, got {seed}", field="seed")
        self.daisy_period = daisy_period
        self.aggregation_period = aggregation_period
        self.seed = int(seed)

    def handoff(self, round_index: int, sites: Sequence[str]) -> Mapping[str, str] | None:
        if round_index % self.aggregation_period == 0:
            return None  # aggregation round: everyone continues from the average
        ordered = sorted(sites)
        if round_index % self.daisy_period != 0 or len(ordered) < 2:
            return {site: site for site in ordered}  # keep training one's own model
        rng = np.random.default_rng([_STREAM, self.seed, round_index])
        perm = derangement(len(ordered), rng)
        return {receiver: ordered[perm[i]] for i, receiver in enumerate(ordered)}


def derangement(n: int, rng: np.random.Generator) -> list[int]:
    """A uniformly random permutation of ``range(n)`` with no fixed point (``n >= 2``).

    Rejection sampling: about e ~ 2.7 draws on average whatever ``n``, and uniform over
    derangements (Sattolo's algorithm would only produce single cycles)."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 elements, got {n}")
    while True:
        perm = [int(i) for i in rng.permutation(n)]
        if all(p != i for i, p in enumerate(perm)):
            return perm
