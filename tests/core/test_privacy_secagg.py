"""Secure aggregation (Bonawitz et al. 2017), run in-process: correctness, dropouts, what the hub sees."""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from scipy import stats

from laulima.core.privacy import shamir
from laulima.core.privacy.clipping import clip
from laulima.core.privacy.masks import expand
from laulima.core.privacy.quantize import dequantize, error_bound, quantize, scale_for
from laulima.core.privacy.secagg import Advertised, RoundContext, SecAggClient, unmask
from laulima.errors import ConfigurationError, DataError, SecureAggregationError

SITES = ["site-a", "site-b", "site-c", "site-d", "site-e"]
LENGTH = 100_000
THRESHOLD = 3  # 5 sites, at most 2 dropouts


class Round:
    """One round among in-process clients, with the hub's part done by the test."""

    def __init__(self, context: RoundContext, sites: Sequence[str] = SITES, shuffle_rosters: bool = False) -> None:
        self.context = context
        self.clients = {site: SecAggClient(site, context) for site in sites}
        self.roster = [client.advertise() for client in self.clients.values()]
        outgoing: dict[str, dict[str, bytes]] = {}
        for site, client in self.clients.items():
            roster = list(self.roster)
            if shuffle_rosters:
                random.shuffle(roster)  # every client sorts the roster itself
            outgoing[site] = client.share(roster)
        self.outgoing = outgoing

    def deliver(self, shared: Sequence[str]) -> None:
        for receiver in shared:
            self.clients[receiver].receive({sender: self.outgoing[sender][receiver] for sender in shared})

    def masked(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {site: self.clients[site].mask(vector) for site, vector in inputs.items()}


def _sum(vectors: Sequence[np.ndarray]) -> np.ndarray:
    total = np.zeros(vectors[0].size, dtype=np.uint32)
    for vector in vectors:
        total += vector
    return total


def _random_inputs(sites: Sequence[str], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {site: rng.integers(0, 2**32, LENGTH, dtype=np.uint32) for site in sites}


def _run(
    context: RoundContext, survivors: Sequence[str], responders: Sequence[str], seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A full round where every site shares, `survivors` send masked vectors, `responders` reveal.
    Returns (unmasked sum, expected sum)."""
    run = Round(context, shuffle_rosters=True)
    run.deliver(SITES)
    inputs = _random_inputs(SITES, seed)
    masked = run.masked({site: inputs[site] for site in survivors})
    dropped = [site for site in SITES if site not in survivors]
    reveals = {site: run.clients[site].reveal(list(survivors), dropped) for site in responders}
    got = unmask(_sum(list(masked.values())), context, run.roster, SITES, survivors, reveals)
    return got, _sum([inputs[site] for site in survivors])


def test_full_round_of_floats_equals_the_plain_sum_within_the_error_bound() -> None:
    context = RoundContext(experiment=3, round=2, threshold=THRESHOLD)
    bound = 1.0
    scale = scale_for(bound, len(SITES))
    data = np.random.default_rng(10)
    clipped = {site: clip(data.normal(0.0, 0.01 * (i + 1), LENGTH), bound)[0] for i, site in enumerate(SITES)}
    quantised = {site: quantize(vector, scale, data) for site, vector in clipped.items()}

    run = Round(context)
    run.deliver(SITES)
    masked = run.masked(quantised)
    reveals = {site: client.reveal(SITES, []) for site, client in run.clients.items()}
    total = unmask(_sum(list(masked.values())), context, run.roster, SITES, SITES, reveals)

    got = dequantize(total, scale)
    expected = np.sum(list(clipped.values()), axis=0)
    err = np.abs(got - expected)
    assert err.max() < error_bound(scale, len(SITES))
    assert np.abs(expected).max() > 1000 * error_bound(scale, len(SITES))  # the check is not vacuous
    # and the masked sum alone is garbage: the masks really were there
    assert np.abs(dequantize(_sum(list(masked.values())), scale) - expected).max() > 1.0


@pytest.mark.parametrize("kind", ["zeros", "constant", "random"])
def test_what_the_hub_sees_is_independent_of_the_input(kind: str) -> None:
    context = RoundContext(experiment=1, round=1, threshold=THRESHOLD)
    rng = np.random.default_rng(11)
    length = 200_000
    if kind == "zeros":
        x = np.zeros(length, dtype=np.uint32)
    elif kind == "constant":
        x = np.full(length, 123_456_789, dtype=np.uint32)
    else:
        x = quantize(rng.normal(0.0, 1.0, length), scale_for(10.0, 5), rng)
    run = Round(context)
    run.deliver(SITES)
    inputs = {site: x for site in SITES}
    y = run.masked(inputs)["site-c"]

    # uniform on [0, 2^32): Kolmogorov-Smirnov (false alarm 1e-6 per run; any real bias at 2e5 samples gives p ~ 0)
    assert stats.kstest(y.astype(np.float64), "uniform", args=(0.0, 2.0**32)).pvalue > 1e-6
    if kind == "random":
        # uncorrelated with the centred input (|r| < 0.01 is 4.5 standard errors at 2e5 elements)
        r = np.corrcoef(x.view(np.int32).astype(np.float64), y.astype(np.float64))[0, 1]
        assert abs(r) < 0.01
        r_raw = np.corrcoef(x.astype(np.float64), y.astype(np.float64))[0, 1]
        assert abs(r_raw) < 0.01

    # the hub learns site-c's self-mask seed in the unmasking; without the pairwise masks' seeds,
    # y minus the self mask is still uniform
    reveals = {site: run.clients[site].reveal(SITES, []) for site in SITES[:THRESHOLD]}
    xs = {site: position + 1 for position, site in enumerate(sorted(SITES))}
    b = shamir.combine({xs[r]: reveals[r]["self_mask"]["site-c"] for r in reveals}, THRESHOLD)
    stripped = y - expand(b, length)
    assert stats.kstest(stripped.astype(np.float64), "uniform", args=(0.0, 2.0**32)).pvalue > 1e-6


@pytest.mark.parametrize(
    ("survivors", "responders"),
    [
        (SITES, SITES),  # nobody drops
        (["site-a", "site-c", "site-d", "site-e"], ["site-a", "site-c", "site-d", "site-e"]),  # 1 dropout
        (["site-b", "site-d", "site-e"], ["site-b", "site-d", "site-e"]),  # the most dropouts: 2
        (SITES, ["site-b", "site-c", "site-e"]),  # 2 survivors do not answer the reveal
        (["site-a", "site-b", "site-d", "site-e"], ["site-a", "site-d", "site-e"]),  # dropout + silent survivor
    ],
)
def test_dropouts_and_silent_survivors_still_give_the_exact_sum(survivors: list[str], responders: list[str]) -> None:
    got, expected = _run(RoundContext(5, 7, THRESHOLD), survivors, responders)
    assert got.dtype == np.uint32
    assert np.array_equal(got, expected)


def test_too_many_dropouts_raise_a_clear_error() -> None:
    context = RoundContext(5, 8, THRESHOLD)
    run = Round(context)
    run.deliver(SITES)
    survivors = ["site-a", "site-e"]  # 3 dropouts, one more than the round tolerates
    masked = run.masked({site: np.zeros(10, dtype=np.uint32) for site in survivors})
    dropped = ["site-b", "site-c", "site-d"]
    for site in survivors:
        with pytest.raises(SecureAggregationError, match="2 survivor\\(s\\), 3 needed"):
            run.clients[site].reveal(survivors, dropped)
    with pytest.raises(
        SecureAggregationError, match="secure aggregation: 2 of 5 sites .* 3 needed; the round cannot be unmasked"
    ):
        unmask(_sum(list(masked.values())), context, run.roster, SITES, survivors, {})


def test_too_few_answers_raise_a_clear_error() -> None:
    context = RoundContext(5, 9, THRESHOLD)
    run = Round(context)
    run.deliver(SITES)
    survivors = ["site-a", "site-b", "site-c", "site-d"]
    masked = run.masked({site: np.ones(10, dtype=np.uint32) for site in survivors})
    reveals = {site: run.clients[site].reveal(survivors, ["site-e"]) for site in ("site-a", "site-d")}
    with pytest.raises(
        SecureAggregationError,
        match="secure aggregation: 2 of 4 sites answered the unmasking, 3 needed; the round cannot be unmasked",
    ):
        unmask(_sum(list(masked.values())), context, run.roster, SITES, survivors, reveals)


def test_a_site_that_did_not_share_is_left_out_entirely() -> None:
    context = RoundContext(2, 1, THRESHOLD)
    run = Round(context)
    shared = ["site-a", "site-b", "site-c", "site-e"]  # site-d's shares never arrived
    run.deliver(shared)
    assert run.clients["site-a"].senders == tuple(shared)
    inputs = _random_inputs(shared, 3)
    masked = run.masked(inputs)
    reveals = {site: run.clients[site].reveal(shared, []) for site in shared}
    got = unmask(_sum(list(masked.values())), context, run.roster, shared, shared, reveals)
    assert np.array_equal(got, _sum(list(inputs.values())))


def test_tampered_or_misaddressed_ciphertexts_are_refused_naming_the_sender() -> None:
    context = RoundContext(4, 1, THRESHOLD)
    run = Round(context)
    receiver = run.clients["site-a"]
    good = run.outgoing["site-b"]["site-a"]
    tampered = bytearray(good)
    tampered[40] ^= 0x01
    with pytest.raises(DataError, match="'site-b'.*authentication"):
        receiver.receive({"site-b": bytes(tampered)})
    with pytest.raises(DataError, match="'site-b'.*length"):
        receiver.receive({"site-b": good[:-1]})
    # site-c's ciphertext for site-a passed off as site-b's
    with pytest.raises(DataError, match="'site-b'"):
        receiver.receive({"site-b": run.outgoing["site-c"]["site-a"]})
    # site-b's ciphertext for site-c delivered to site-a
    with pytest.raises(DataError, match="'site-b'"):
        receiver.receive({"site-b": run.outgoing["site-b"]["site-c"]})
    with pytest.raises(DataError, match="'site-z'.*roster"):
        receiver.receive({"site-z": good})
    # the same sites in another round: the ciphertext does not replay
    other = Round(RoundContext(4, 2, THRESHOLD))
    with pytest.raises(DataError, match="'site-b'"):
        other.clients["site-a"].receive({"site-b": good})
    receiver.receive({"site-b": good})  # the genuine one still passes
    assert receiver.senders == ("site-a", "site-b")


def test_reveal_refuses_inconsistent_lists() -> None:
    context = RoundContext(6, 1, THRESHOLD)
    run = Round(context)
    run.deliver(SITES)
    client = run.clients["site-a"]
    with pytest.raises(DataError, match="not masked"):
        client.reveal(SITES, [])
    client.mask(np.zeros(5, dtype=np.uint32))
    with pytest.raises(DataError, match="'site-c' is listed both"):
        client.reveal(SITES, ["site-c"])
    with pytest.raises(DataError, match="left out: \\['site-e'\\]"):
        client.reveal(["site-a", "site-b", "site-c"], ["site-d"])
    with pytest.raises(DataError, match="not among them: \\['site-x'\\]"):
        client.reveal(SITES, ["site-x"])
    with pytest.raises(DataError, match="not listed as a survivor"):
        client.reveal(["site-b", "site-c", "site-d"], ["site-a", "site-e"])
    first = client.reveal(["site-a", "site-b", "site-c", "site-d"], ["site-e"])
    assert set(first) == {"self_mask", "masking_key"}
    assert sorted(first["self_mask"]) == ["site-a", "site-b", "site-c", "site-d"]
    assert sorted(first["masking_key"]) == ["site-e"]
    assert client.reveal(["site-d", "site-c", "site-b", "site-a"], ["site-e"]) == first  # a retry
    with pytest.raises(DataError, match="already revealed"):
        client.reveal(SITES, [])
    with pytest.raises(DataError, match="already masked"):
        client.mask(np.zeros(5, dtype=np.uint32))


def test_share_refuses_bad_rosters() -> None:
    context = RoundContext(1, 1, THRESHOLD)
    clients = [SecAggClient(site, context) for site in SITES]
    roster = [client.advertise() for client in clients]
    with pytest.raises(DataError, match="does not include this site"):
        clients[0].share(roster[1:])
    with pytest.raises(DataError, match="twice"):
        clients[0].share([*roster, roster[2]])
    with pytest.raises(DataError, match="fewer than the threshold 3"):
        clients[0].share(roster[:2])
    substituted = Advertised("site-a", roster[1].encryption_key, roster[0].masking_key)
    with pytest.raises(DataError, match="other public keys"):
        clients[0].share([substituted, *roster[1:]])
    with pytest.raises(DataError, match="32 raw bytes"):
        Advertised("site-a", b"short", roster[0].masking_key)
    with pytest.raises(DataError, match="share before"):
        clients[1].receive({})
    with pytest.raises(DataError, match="share and receive"):
        clients[1].mask(np.zeros(3, dtype=np.uint32))


def test_mask_refuses_wrong_vectors_and_too_few_senders() -> None:
    context = RoundContext(1, 2, THRESHOLD)
    run = Round(context)
    run.deliver(["site-a", "site-b"])
    with pytest.raises(SecureAggregationError, match="2 site\\(s\\) shared"):
        run.clients["site-a"].mask(np.zeros(3, dtype=np.uint32))
    run.clients["site-a"].receive({"site-c": run.outgoing["site-c"]["site-a"]})
    with pytest.raises(DataError, match="uint32"):
        run.clients["site-a"].mask(np.zeros(3, dtype=np.int64))


def test_two_rounds_with_the_same_input_mask_differently() -> None:
    x = np.zeros(1000, dtype=np.uint32)
    seen = []
    for round_ in (1, 2):
        run = Round(RoundContext(9, round_, THRESHOLD))
        run.deliver(SITES)
        seen.append(run.masked({"site-b": x})["site-b"])
    assert np.mean(seen[0] == seen[1]) < 0.01


def test_round_context() -> None:
    assert RoundContext(3, 2, 2).info() == b"laulima-secagg/v1/exp=3/round=2/t=2"
    with pytest.raises(ConfigurationError, match="threshold"):
        RoundContext(3, 2, 0)
    with pytest.raises(ConfigurationError, match="round"):
        RoundContext(3, -1, 2)


def test_prg_is_aes_ctr_deterministic_and_seed_dependent() -> None:
    seed = bytes(range(32))
    a = expand(seed, 1000)
    assert a.dtype == np.uint32 and a.shape == (1000,)
    assert np.array_equal(a, expand(seed, 1000))
    assert np.array_equal(a[:10], expand(seed, 10))
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    assert a.tobytes() == encryptor.update(bytes(4000))  # little-endian keystream words
    assert np.mean(a == expand(bytes(32), 1000)) < 0.01
    assert expand(seed, 0).size == 0
    with pytest.raises(DataError, match="32 bytes"):
        expand(bytes(16), 10)
