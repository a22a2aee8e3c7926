"""SecAgg+ (Bell et al., CCS 2020): secure aggregation over a sparse k-regular graph, in-process."""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import pytest

from laulima.core.privacy.graph import (
    communication_graph,
    connected,
    default_neighbours,
    neighbourhood_threshold,
)
from laulima.core.privacy.messages import TaskSecureAggregation
from laulima.core.privacy.secagg import RoundContext, SecAggClient, unmask
from laulima.core.privacy.tasks import secure_neighbours, secure_threshold, task_secure_aggregation
from laulima.core.spec import parse_spec
from laulima.errors import ConfigurationError, DataError, SecureAggregationError, SpecError

SITES = [f"site-{i:02d}" for i in range(20)]
THRESHOLD = secure_threshold(len(SITES), None)  # 11 of 20
LENGTH = 2_000


class Round:
    """One round among in-process clients; the test plays the hub."""

    def __init__(self, context: RoundContext, sites: Sequence[str] = SITES) -> None:
        self.context = context
        self.sites = list(sites)
        self.clients = {site: SecAggClient(site, context) for site in sites}
        self.roster = [client.advertise() for client in self.clients.values()]
        self.outgoing = {}
        for site, client in self.clients.items():
            roster = list(self.roster)
            random.Random(site).shuffle(roster)
            self.outgoing[site] = client.share(roster)
        self.graph = communication_graph(self.sites, context)

    def deliver(self, shared: Sequence[str]) -> None:
        """Forward, as the hub does, to each sender's addressees the ciphertexts of the senders in `shared`."""
        for receiver in shared:
            inbox = {s: self.outgoing[s][receiver] for s in shared if receiver in self.outgoing[s]}
            self.clients[receiver].receive(inbox)

    def closed(self, site: str) -> frozenset[str]:
        return self.graph[site] | {site}


def _sum(vectors: Sequence[np.ndarray]) -> np.ndarray:
    total = np.zeros(LENGTH, dtype=np.uint32)
    for vector in vectors:
        total += vector
    return total


def _inputs(sites: Sequence[str], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {site: rng.integers(0, 2**32, LENGTH, dtype=np.uint32) for site in sites}


def _ring(graph: dict[str, frozenset[str]]) -> list[str]:
    """The ring order of a 2-regular graph (a cycle)."""
    start = min(graph)
    order, previous = [start], None
    while True:
        current = order[-1]
        step = sorted(graph[current] - {previous} if previous else graph[current])[0]
        if step == start:
            return order
        previous = current
        order.append(step)


# -- the graph --------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 4, 6, 10])
def test_the_graph_is_k_regular_symmetric_and_deterministic_per_round(k: int) -> None:
    context = RoundContext(3, 1, THRESHOLD, neighbours=k)
    graph = communication_graph(SITES, context)
    assert sorted(graph) == SITES
    for site, neighbours in graph.items():
        assert len(neighbours) == k and site not in neighbours
        for other in neighbours:
            assert site in graph[other], "symmetric"
    assert len(connected(SITES, graph)) == 1
    shuffled = list(reversed(SITES))
    assert communication_graph(shuffled, RoundContext(3, 1, THRESHOLD, neighbours=k)) == graph
    # the next round (or another experiment) draws another graph
    assert communication_graph(SITES, RoundContext(3, 2, THRESHOLD, neighbours=k)) != graph
    assert communication_graph(SITES, RoundContext(4, 1, THRESHOLD, neighbours=k)) != graph
    # positions are not the order of the names
    by_name = {s: frozenset(SITES[(i + d) % 20] for d in range(-k // 2, k // 2 + 1) if d) for i, s in enumerate(SITES)}
    assert graph != by_name


@pytest.mark.parametrize(("n", "k"), [(5, 0), (5, 4), (5, 6), (3, 2), (20, 0), (20, 20), (20, 1000)])
def test_a_degree_that_reaches_everyone_is_the_complete_graph(n: int, k: int) -> None:
    sites = SITES[:n]
    graph = communication_graph(sites, RoundContext(1, 1, 2, neighbours=k))
    assert graph == {site: frozenset(sites) - {site} for site in sites}
    assert neighbourhood_threshold(n, RoundContext(1, 1, 2, neighbours=k)) == 2


def test_round_context_carries_the_degree() -> None:
    assert RoundContext(3, 2, 2).info() == b"laulima-secagg/v1/exp=3/round=2/t=2"
    assert RoundContext(3, 2, 2, neighbours=None) == RoundContext(3, 2, 2, neighbours=0)
    assert RoundContext(3, 2, 2, neighbours=None).info() == RoundContext(3, 2, 2).info()
    assert RoundContext(3, 2, 2, neighbours=4).info() == b"laulima-secagg/v1/exp=3/round=2/t=2/k=4"
    for bad in (1, 3, -2, True, 2.0):
        with pytest.raises(ConfigurationError, match="neighbours"):
            RoundContext(3, 2, 2, neighbours=bad)  # type: ignore[arg-type]
    assert neighbourhood_threshold(20, RoundContext(3, 2, 11, neighbours=6)) == 4
    assert neighbourhood_threshold(20, RoundContext(3, 2, 11, neighbours=4)) == 3


def test_the_default_degree_is_logarithmic_and_small_rounds_stay_complete() -> None:
    assert [default_neighbours(n) for n in (17, 20, 64, 65, 100, 1000)] == [10, 10, 12, 14, 14, 20]
    assert secure_neighbours(2, None) == 0
    assert secure_neighbours(16, None) == 0, "up to 16 sites: the complete graph, as before"
    assert secure_neighbours(17, None) == 10
    assert secure_neighbours(1000, None) == 20
    assert secure_neighbours(20, 4) == 4, "a given degree is used as given"
    assert secure_neighbours(8, 2) == 2
    assert secure_neighbours(5, 4) == 0 and secure_neighbours(5, 8) == 0, "k >= n - 1 is sent as complete"


def test_the_spec_takes_an_even_bounded_degree() -> None:
    base = {"name": "p", "algorithm": "laulima.algorithms.identity:Identity", "dataset": "d", "rounds": 3}
    spec = parse_spec({**base, "min_sites": 2, "secure_aggregation": {"clip": 1.0, "neighbours": 4}})
    assert spec.secure_aggregation is not None and spec.secure_aggregation.neighbours == 4
    config = task_secure_aggregation(spec, n_sites=30, max_weight=10)
    assert config is not None and config.neighbours == 4
    config = task_secure_aggregation(spec, n_sites=4, max_weight=10)
    assert config is not None and config.neighbours == 0
    default = parse_spec({**base, "min_sites": 2, "secure_aggregation": {"clip": 1.0}})
    assert default.secure_aggregation is not None and default.secure_aggregation.neighbours is None
    config = task_secure_aggregation(default, n_sites=40, max_weight=10)
    assert config is not None and config.neighbours == 12
    for bad, words in ((3, "odd"), (0, ""), (1, ""), (5000, "")):
        with pytest.raises(SpecError, match="field 'secure_aggregation.neighbours'") as err:
            parse_spec({**base, "min_sites": 2, "secure_aggregation": {"clip": 1.0, "neighbours": bad}})
        assert words in str(err.value)
    task = dict(clip=1.0, sites=20, threshold=11, max_weight=1, bound=1.0, phase_timeout_s=5)
    assert TaskSecureAggregation(**task).neighbours == 0  # tasks stored before the field: the complete graph
    with pytest.raises(ValueError, match="even"):
        TaskSecureAggregation(**task, neighbours=3)


# -- the protocol over the sparse graph -------------------------------------------------------


@pytest.mark.parametrize("k", [4, 6])
def test_a_full_round_sums_exactly_with_k_neighbours_each(k: int) -> None:
    context = RoundContext(7, 3, THRESHOLD, neighbours=k)
    run = Round(context)
    for site, outbox in run.outgoing.items():
        assert len(outbox) == k + 1 and set(outbox) == run.closed(site)
        assert run.clients[site].neighbourhood == tuple(sorted(run.closed(site)))
    run.deliver(SITES)
    for client in run.clients.values():
        # the pairwise masks are one per other sender: k
        assert len(client.senders) == k + 1 and set(client.senders) == run.closed(client.site)
    inputs = _inputs(SITES, 1)
    masked = {site: run.clients[site].mask(x) for site, x in inputs.items()}
    reveals = {site: client.reveal(SITES, []) for site, client in run.clients.items()}
    for site, answer in reveals.items():
        assert set(answer["self_mask"]) == run.closed(site) and answer["masking_key"] == {}
    got = unmask(_sum(list(masked.values())), context, run.roster, SITES, SITES, reveals)
    assert np.array_equal(got, _sum(list(inputs.values())))
    assert not np.array_equal(_sum(list(masked.values())), got), "the masks were there"


def test_a_site_that_did_not_share_and_sites_that_drop_within_each_neighbourhoods_tolerance() -> None:
    k = 6
    context = RoundContext(8, 1, THRESHOLD, neighbours=k)
    run = Round(context)
    local = neighbourhood_threshold(len(SITES), context)
    # pick a site that never shares, then dropouts and silent survivors while every
    # neighbourhood keeps `local` answering sites
    lost: set[str] = set()
    roles: dict[str, list[str]] = {"unshared": [], "dropped": [], "silent": []}
    for role, count in (("unshared", 1), ("dropped", 3), ("silent", 2)):
        for candidate in SITES:
            if len(roles[role]) == count:
                break
            if candidate in lost:
                continue
            if all(len(run.closed(o) - lost - {candidate}) >= local for o in SITES if candidate in run.closed(o)):
                roles[role].append(candidate)
                lost.add(candidate)
    assert [len(roles[r]) for r in ("unshared", "dropped", "silent")] == [1, 3, 2]
    shared = [s for s in SITES if s not in roles["unshared"]]
    survivors = [s for s in shared if s not in roles["dropped"]]
    run.deliver(shared)
    for site in shared:
        assert set(run.clients[site].senders) == run.closed(site) - set(roles["unshared"])
    inputs = _inputs(survivors, 2)
    masked = {site: run.clients[site].mask(x) for site, x in inputs.items()}
    responders = [s for s in survivors if s not in roles["silent"]]
    reveals = {site: run.clients[site].reveal(survivors, roles["dropped"]) for site in responders}
    for site, answer in reveals.items():
        assert set(answer["masking_key"]) == set(roles["dropped"]) & run.closed(site)
    got = unmask(_sum(list(masked.values())), context, run.roster, shared, survivors, reveals)
    assert np.array_equal(got, _sum(list(inputs.values())))


def test_a_neighbourhood_without_enough_answers_names_the_site() -> None:
    k = 4
    context = RoundContext(8, 2, THRESHOLD, neighbours=k)
    run = Round(context)
    run.deliver(SITES)
    inputs = _inputs(SITES, 3)
    masked = {site: run.clients[site].mask(x) for site, x in inputs.items()}
    target = SITES[5]
    silent = sorted(run.closed(target))[: k // 2 + 1]  # a strict majority of its neighbourhood stays silent
    reveals = {site: run.clients[site].reveal(SITES, []) for site in SITES if site not in silent}
    assert len(reveals) >= THRESHOLD, "enough answers over the round: only the neighbourhood lacks them"
    with pytest.raises(SecureAggregationError) as err:
        unmask(_sum(list(masked.values())), context, run.roster, SITES, SITES, reveals)
    lacking = {o: len(run.closed(o) - set(silent)) for o in SITES if len(run.closed(o) - set(silent)) < k // 2 + 1}
    assert target in lacking
    named = err.value.context["site"]
    assert named in lacking
    assert f"the neighbourhood of {named!r} (5 sites) gave {lacking[named]} unmasking answer(s), 3 needed" in str(
        err.value
    )


def test_a_site_whose_neighbourhood_lost_too_many_refuses_to_reveal() -> None:
    k = 4
    context = RoundContext(8, 3, THRESHOLD, neighbours=k)
    run = Round(context)
    run.deliver(SITES)
    target = SITES[7]
    dropped = sorted(run.graph[target])[: k // 2 + 1]  # k/2 + 1 of its k neighbours drop
    survivors = [s for s in SITES if s not in dropped]
    for site in survivors:
        run.clients[site].mask(np.zeros(LENGTH, dtype=np.uint32))
    with pytest.raises(SecureAggregationError, match=f"2 survivor\\(s\\) in the neighbourhood of {target!r}, 3 needed"):
        run.clients[target].reveal(survivors, dropped)


def test_survivors_that_fall_apart_in_the_graph_are_not_unmasked() -> None:
    """Two dropouts cut a ring (k = 2) in two arcs: unmasking would give the hub each arc's sum."""
    context = RoundContext(8, 4, THRESHOLD, neighbours=2)
    run = Round(context)
    ring = _ring(run.graph)
    assert len(ring) == 20
    run.deliver(SITES)
    dropped = [ring[0], ring[10]]
    survivors = [s for s in SITES if s not in dropped]
    masked = {site: run.clients[site].mask(np.zeros(LENGTH, dtype=np.uint32)) for site in survivors}
    for site in survivors:
        with pytest.raises(SecureAggregationError, match="split into 2 unconnected groups"):
            run.clients[site].reveal(survivors, dropped)
    split = "split into 2 unconnected groups in the round's graph \\(sizes \\[9, 9\\]\\)"
    with pytest.raises(SecureAggregationError, match=split):
        unmask(_sum(list(masked.values())), context, run.roster, SITES, survivors, {})
    # one dropout leaves a path: connected, and unmasked exactly
    again = Round(RoundContext(8, 5, THRESHOLD, neighbours=2))
    again.deliver(SITES)
    gone = _ring(again.graph)[3]
    alive = [s for s in SITES if s != gone]
    inputs = _inputs(alive, 4)
    masked = {site: again.clients[site].mask(x) for site, x in inputs.items()}
    reveals = {site: again.clients[site].reveal(alive, [gone]) for site in alive}
    got = unmask(_sum(list(masked.values())), again.context, again.roster, SITES, alive, reveals)
    assert np.array_equal(got, _sum(list(inputs.values())))


def test_shares_from_a_non_neighbour_are_refused() -> None:
    context = RoundContext(8, 6, THRESHOLD, neighbours=4)
    run = Round(context)
    receiver = SITES[0]
    stranger = next(s for s in SITES if s not in run.closed(receiver))
    any_ciphertext = next(iter(run.outgoing[stranger].values()))
    with pytest.raises(DataError, match=f"{stranger!r}, which is not a neighbour"):
        run.clients[receiver].receive({stranger: any_ciphertext})


def test_reveal_checks_the_lists_within_its_neighbourhood() -> None:
    context = RoundContext(8, 7, THRESHOLD, neighbours=4)
    run = Round(context)
    run.deliver(SITES)
    site = SITES[0]
    client = run.clients[site]
    client.mask(np.zeros(LENGTH, dtype=np.uint32))
    neighbour = sorted(run.graph[site])[0]
    left_out = [s for s in SITES if s != neighbour]
    with pytest.raises(DataError, match=f"among its neighbours; not among them: \\[\\], left out: \\[{neighbour!r}\\]"):
        client.reveal(left_out, [])
    with pytest.raises(DataError, match="not among them: \\['site-zz'\\]"):
        client.reveal(SITES, ["site-zz"])
    # a non-neighbour left out of both lists is none of this site's business
    stranger = next(s for s in SITES if s not in run.closed(site))
    answer = client.reveal([s for s in SITES if s != stranger], [])
    assert set(answer["self_mask"]) == run.closed(site)


def test_a_degree_of_at_least_n_minus_1_is_bonawitz_exactly() -> None:
    sites = SITES[:5]
    inputs = _inputs(sites, 5)
    for k in (0, 4, 8):
        context = RoundContext(9, 1, 3, neighbours=k)
        run = Round(context, sites)
        assert all(len(outbox) == 5 for outbox in run.outgoing.values())
        run.deliver(sites)
        survivors = sites[:4]
        masked = {site: run.clients[site].mask(inputs[site]) for site in survivors}
        reveals = {site: run.clients[site].reveal(survivors, [sites[4]]) for site in survivors[:3]}
        got = unmask(_sum(list(masked.values())), context, run.roster, sites, survivors, reveals)
        assert np.array_equal(got, _sum([inputs[s] for s in survivors]))
        with pytest.raises(SecureAggregationError, match="2 of 4 sites answered the unmasking, 3 needed"):
            unmask(_sum(list(masked.values())), context, run.roster, sites, survivors, dict(list(reveals.items())[:2]))
