"""Privacy accounting: ε of composed Gaussian releases, from an established accountant.

No ε in Laulima is computed by hand-written formulas: every number comes from Google's
``dp_accounting`` (Rényi-DP accountant, Mironov 2017; Poisson-subsampled Gaussian of Mironov,
Talwar and Zhang 2019), whose conversions to (ε, δ) are reviewed and tested upstream. This
module only describes what was released (:class:`GaussianRelease`) and asks the accountant.

The neighbouring relation is add-or-remove-one (dp_accounting's default): with site-level DP
a "record" is one site's whole contribution, with DP-SGD one training example.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from types import ModuleType
from typing import TYPE_CHECKING, Any

from laulima.errors import ConfigurationError

if TYPE_CHECKING:  # dp_accounting (with scipy and mpmath) costs most of a second to import: only when ε is asked
    import dp_accounting

__all__ = [
    "RDP_ORDERS",
    "GaussianRelease",
    "epsilon",
    "noise_multiplier_for",
]

RDP_ORDERS: tuple[float, ...]
"""Rényi orders the accountant evaluates: dp_accounting's defaults (1.1 ... 1024), which cover
the ε range from well below 1 to a few hundred; ε is the minimum over them. Read on first use
(module ``__getattr__``), so importing this module — every site agent does — stays cheap."""


@cache
def _dp() -> ModuleType:
    return importlib.import_module("dp_accounting")


@cache
def _orders() -> tuple[float, ...]:
    rdp = importlib.import_module("dp_accounting.rdp.rdp_privacy_accountant")
    return tuple(float(order) for order in rdp.DEFAULT_RDP_ORDERS)


def __getattr__(name: str) -> Any:
    if name == "RDP_ORDERS":
        return _orders()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

_MAX_NOISE_MULTIPLIER = 2.0**40
"""Upper end of the search in :func:`noise_multiplier_for`: beyond it no target is reachable."""


@dataclass(frozen=True)
class GaussianRelease:
    """`count` repetitions of the Gaussian mechanism with `noise_multiplier` (noise std / L2 sensitivity),
    each on a Poisson sample of rate `sampling_rate` (1.0: the whole dataset, e.g. one site-level DP round)."""

    noise_multiplier: float
    count: int = 1
    sampling_rate: float = 1.0

    def __post_init__(self) -> None:
        nm = self.noise_multiplier
        if isinstance(nm, bool) or not isinstance(nm, int | float) or not math.isfinite(nm) or nm < 0:
            raise ConfigurationError(
                f"GaussianRelease.noise_multiplier must be a finite number >= 0, got {nm!r}; "
                "give the noise standard deviation divided by the L2 sensitivity (clipping bound)",
                field="noise_multiplier",
            )
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 0:
            raise ConfigurationError(
                f"GaussianRelease.count must be an integer >= 0, got {self.count!r}; "
                "give how many times the mechanism was applied (rounds or steps)",
                field="count",
            )
        q = self.sampling_rate
        if isinstance(q, bool) or not isinstance(q, int | float) or not math.isfinite(q) or not 0 < q <= 1:
            raise ConfigurationError(
                f"GaussianRelease.sampling_rate must be in (0, 1], got {q!r}; "
                "give the Poisson sampling probability, or 1.0 when every record takes part",
                field="sampling_rate",
            )

    def event(self) -> dp_accounting.DpEvent:
        """This release as a dp_accounting event (callers check ``noise_multiplier > 0`` first)."""
        dp = _dp()
        single: dp_accounting.DpEvent = dp.GaussianDpEvent(float(self.noise_multiplier))
        if self.sampling_rate < 1:
            single = dp.PoissonSampledDpEvent(float(self.sampling_rate), single)
        return dp.SelfComposedDpEvent(single, self.count)


def _check_delta(delta: float) -> None:
    if isinstance(delta, bool) or not isinstance(delta, int | float) or not math.isfinite(delta) or not 0 < delta < 1:
        raise ConfigurationError(
            f"delta must be in (0, 1), got {delta!r}; use a value well below 1 / (number of records), e.g. 1e-5",
            field="delta",
        )


def _composed(releases: Sequence[GaussianRelease]) -> dp_accounting.DpEvent | None:
    """The composition of the releases that count, or None when nothing was released."""
    events = [release.event() for release in releases if release.count > 0]
    if not events:
        return None
    return events[0] if len(events) == 1 else _dp().ComposedDpEvent(events)


def _rdp_epsilon(event: dp_accounting.DpEvent, delta: float) -> float:
    accountant = _dp().rdp.RdpAccountant(list(_orders()))
    accountant.compose(event)
    return float(accountant.get_epsilon(delta))


def epsilon(releases: Sequence[GaussianRelease], delta: float) -> float:
    """ε at `delta` of all `releases` composed: 0.0 when nothing was released, ``math.inf`` when any
    release without noise was made."""
    _check_delta(delta)
    for release in releases:
        if not isinstance(release, GaussianRelease):
            raise ConfigurationError(
                f"epsilon() takes GaussianRelease objects, got {type(release).__name__}; "
                "describe each release with GaussianRelease(noise_multiplier, count, sampling_rate)",
                field="releases",
            )
        if release.count > 0 and release.noise_multiplier == 0:
            return math.inf
    event = _composed(releases)
    if event is None:
        return 0.0
    return _rdp_epsilon(event, delta)


def noise_multiplier_for(
    target_epsilon: float,
    delta: float,
    count: int,
    sampling_rate: float = 1.0,
    already: Sequence[GaussianRelease] = (),
) -> float:
    """The smallest noise multiplier σ (to dp_accounting's calibration tolerance, on the safe side) with
    ``epsilon([*already, GaussianRelease(σ, count, sampling_rate)], delta) <= target_epsilon``."""
    _check_delta(delta)
    te = target_epsilon
    if isinstance(te, bool) or not isinstance(te, int | float) or not math.isfinite(te) or te <= 0:
        raise ConfigurationError(
            f"target_epsilon must be a finite number > 0, got {te!r}; give the privacy budget ε to stay within",
            field="target_epsilon",
        )
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigurationError(
            f"count must be an integer >= 1, got {count!r}; give how many releases the noise is calibrated for",
            field="count",
        )
    GaussianRelease(1.0, count, sampling_rate)  # validates sampling_rate with its field name
    spent = epsilon(already, delta)
    if spent >= te:
        raise ConfigurationError(
            f"the earlier releases alone already spend ε = {spent:.4g} at δ = {delta:g}, "
            f"at or above the target ε = {te:g}; no noise can make {count} more release(s) fit — "
            "raise the budget or release nothing more",
            field="target_epsilon",
        )
    previous = [release.event() for release in already if release.count > 0]

    def make_event(sigma: float) -> dp_accounting.DpEvent:
        new = GaussianRelease(float(sigma), count, sampling_rate).event()
        return _dp().ComposedDpEvent([*previous, new]) if previous else new

    def gap(sigma: float) -> float:
        return _rdp_epsilon(make_event(sigma), delta) - te

    # Bracket the root ourselves: σ = 0 gives ε = ∞, which the root finder cannot evaluate.
    high = 1.0
    while gap(high) > 0:
        high *= 2.0
        if high > _MAX_NOISE_MULTIPLIER:
            raise ConfigurationError(
                f"no noise multiplier up to {_MAX_NOISE_MULTIPLIER:g} keeps ε <= {te:g} at δ = {delta:g} "
                f"(the earlier releases spend ε = {spent:.4g}, leaving too little for {count} more); "
                "raise the budget or release less",
                field="target_epsilon",
            )
    low = high / 2.0
    while low > 1e-6 and gap(low) <= 0:
        high, low = low, low / 2.0
    if gap(low) <= 0:  # even a vanishing noise multiplier fits: the target is far above anything spent
        return low
    dp = _dp()
    sigma = dp.calibrate_dp_mechanism(
        lambda: dp.rdp.RdpAccountant(list(_orders())),
        make_event,
        te,
        delta,
        bracket_interval=dp.ExplicitBracketInterval(low, high),
        tol=max(1e-9, 1e-7 * high),
    )
    return float(sigma)
