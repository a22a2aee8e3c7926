"""ε from laulima's accountant against references built directly with dp_accounting."""

from __future__ import annotations

import math

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from laulima.core.privacy.accountant import RDP_ORDERS, GaussianRelease, epsilon, noise_multiplier_for
from laulima.errors import ConfigurationError

DELTA = 1e-5

SETTINGS = [
    (1.1, 6000, 0.01),  # DP-SGD-like
    (1.0, 10, 1.0),  # site-level DP, few rounds
    (5.0, 100, 1.0),
    (2.0, 1, 1.0),
    (0.9, 500, 0.2),
]


def _single(noise: float, count: int, rate: float) -> dp_accounting.DpEvent:
    event: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(noise)
    if rate < 1:
        event = dp_accounting.PoissonSampledDpEvent(rate, event)
    return dp_accounting.SelfComposedDpEvent(event, count)


def _reference_rdp(*settings: tuple[float, int, float]) -> float:
    accountant = RdpAccountant(list(RDP_ORDERS))
    for noise, count, rate in settings:
        accountant.compose(_single(noise, count, rate))
    return float(accountant.get_epsilon(DELTA))


def _reference_pld(noise: float, count: int, rate: float) -> float:
    accountant = PLDAccountant(value_discretization_interval=1e-3)
    accountant.compose(_single(noise, count, rate))
    return float(accountant.get_epsilon(DELTA))


@pytest.mark.parametrize(("noise", "count", "rate"), SETTINGS)
def test_epsilon_matches_direct_rdp_reference(noise: float, count: int, rate: float) -> None:
    got = epsilon([GaussianRelease(noise, count, rate)], DELTA)
    assert got == pytest.approx(_reference_rdp((noise, count, rate)), abs=1e-6)


def test_orders_are_dp_accounting_defaults() -> None:
    from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS

    assert RDP_ORDERS == tuple(float(order) for order in DEFAULT_RDP_ORDERS)


def test_composition_of_two_releases_matches_reference() -> None:
    a, b = (1.1, 3000, 0.01), (3.0, 20, 1.0)
    got = epsilon([GaussianRelease(*a), GaussianRelease(*b)], DELTA)
    assert got == pytest.approx(_reference_rdp(a, b), abs=1e-6)
    # and composing costs more than either alone
    assert got > epsilon([GaussianRelease(*a)], DELTA)
    assert got > epsilon([GaussianRelease(*b)], DELTA)


@pytest.mark.parametrize(("noise", "count", "rate"), SETTINGS[:3])
def test_epsilon_close_to_independent_pld_accountant(noise: float, count: int, rate: float) -> None:
    # PLD is (nearly) tight, RDP an upper bound: RDP above PLD, by less than 15 % here (7-10 % seen).
    rdp = epsilon([GaussianRelease(noise, count, rate)], DELTA)
    pld = _reference_pld(noise, count, rate)
    assert pld * 0.999 <= rdp <= pld * 1.15


def test_epsilon_monotone_in_noise_and_count() -> None:
    by_noise = [epsilon([GaussianRelease(s, 50)], DELTA) for s in (0.8, 1.0, 2.0, 4.0, 8.0)]
    assert all(x > y for x, y in zip(by_noise, by_noise[1:], strict=False))
    by_count = [epsilon([GaussianRelease(1.1, n, 0.01)], DELTA) for n in (10, 100, 1000, 5000)]
    assert all(x < y for x, y in zip(by_count, by_count[1:], strict=False))


def test_edge_cases() -> None:
    assert epsilon([], DELTA) == 0.0
    assert epsilon([GaussianRelease(1.0, 0), GaussianRelease(0.0, 0)], DELTA) == 0.0
    assert epsilon([GaussianRelease(0.0, 1)], DELTA) == math.inf
    assert epsilon([GaussianRelease(2.0, 5), GaussianRelease(0.0, 1, 0.01)], DELTA) == math.inf


@pytest.mark.parametrize(
    ("target", "count", "rate", "already"),
    [
        (3.0, 6000, 0.01, ()),
        (1.0, 1, 1.0, ()),
        (8.0, 20, 1.0, (GaussianRelease(5.0, 30),)),
    ],
)
def test_noise_multiplier_for_round_trips(
    target: float, count: int, rate: float, already: tuple[GaussianRelease, ...]
) -> None:
    sigma = noise_multiplier_for(target, DELTA, count, rate, already=already)
    assert epsilon([*already, GaussianRelease(sigma, count, rate)], DELTA) <= target
    assert epsilon([*already, GaussianRelease(0.99 * sigma, count, rate)], DELTA) > target


def test_noise_multiplier_for_refuses_a_spent_budget() -> None:
    with pytest.raises(ConfigurationError, match="already spend"):
        noise_multiplier_for(8.0, DELTA, 20, already=[GaussianRelease(2.0, 30)])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"noise_multiplier": math.nan}, "noise_multiplier"),
        ({"noise_multiplier": math.inf}, "noise_multiplier"),
        ({"noise_multiplier": 1.0, "count": -1}, "count"),
        ({"noise_multiplier": 1.0, "count": 1.5}, "count"),
        ({"noise_multiplier": 1.0, "sampling_rate": 0.0}, "sampling_rate"),
        ({"noise_multiplier": 1.0, "sampling_rate": 1.5}, "sampling_rate"),
        ({"noise_multiplier": 1.0, "sampling_rate": math.nan}, "sampling_rate"),
    ],
)
def test_bad_release_raises_naming_field(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ConfigurationError, match=field) as info:
        GaussianRelease(**kwargs)  # type: ignore[arg-type]
    assert info.value.context["field"] == field


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, math.nan])
def test_bad_delta_raises(delta: float) -> None:
    with pytest.raises(ConfigurationError, match="delta"):
        epsilon([GaussianRelease(1.0)], delta)
    with pytest.raises(ConfigurationError, match="delta"):
        noise_multiplier_for(1.0, delta, 1)


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ((0.0, DELTA, 1), "target_epsilon"),
        ((math.inf, DELTA, 1), "target_epsilon"),
        ((-1.0, DELTA, 1), "target_epsilon"),
        ((1.0, DELTA, 0), "count"),
        ((1.0, DELTA, 1, 0.0), "sampling_rate"),
    ],
)
def test_bad_calibration_inputs_raise(args: tuple[float, ...], field: str) -> None:
    with pytest.raises(ConfigurationError, match=field):
        noise_multiplier_for(*args)  # type: ignore[arg-type]


def test_the_site_agent_starts_without_importing_the_accountant_library():
    """dp_accounting (scipy, mpmath) takes most of a second to import: only a DP task pays it."""
    import subprocess
    import sys

    code = "import sys, laulima.site.agent; sys.exit('dp_accounting' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
