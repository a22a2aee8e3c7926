"""Secure aggregation (Bonawitz et al., CCS 2017), honest-but-curious hub: the protocol math only.

The hub learns the sum of the sites' quantised updates (``np.uint32``, modulo 2^32) and nothing
about any single one. Each site u adds to its vector x_u a self mask PRG(b_u) and, for every
other site v that shared, a pairwise mask ±PRG(s_uv) that v adds with the opposite sign; the
pairwise masks cancel in the sum, and the self masks are removed once the surviving sites
reveal Shamir shares of their b_u. A site that drops out after sharing leaves its pairwise
masks in the sum; the survivors then reveal shares of its masking key instead, which rebuilds
exactly those masks. No site ever reveals both kinds of share for the same site.

With many sites, SecAgg+ (Bell et al., CCS 2020) replaces "every other site" by the site's k
neighbours in a sparse k-regular graph that hub and sites derive from the roster and the
:class:`RoundContext` (:mod:`laulima.core.privacy.graph`): pairwise masks only with
neighbours, shares only among the neighbourhood N[u] (neighbours and u itself, k + 1 sites),
threshold t_N = k / 2 + 1 per neighbourhood. With ``neighbours = 0`` (or k >= n - 1) the graph
is complete, N[u] is the roster and t_N is t: exactly Bonawitz et al.

The rounds, for one :class:`RoundContext` (experiment, round, threshold t, degree k):

0. every selected site makes a :class:`SecAggClient` and publishes :meth:`~SecAggClient.advertise`
   (two X25519 public keys: c for encryption, s for masking); the advertisers are the roster.
1. :meth:`~SecAggClient.share`: each site Shamir-splits b_u and its private s key (threshold t_N,
   x = 1 + position in the whole roster sorted by name), one encrypted pair of shares per member
   of N[u]. The hub forwards them; the senders whose ciphertexts arrived form U2.
2. :meth:`~SecAggClient.mask`: each site sends y_u = x_u + PRG(b_u) + Σ_{v ∈ U2 ∩ N(u)} ±PRG(s_uv).
   The sites whose y_u is in the hub's sum are the survivors U3 ⊆ U2.
3. :meth:`~SecAggClient.reveal`: survivors answer with b-shares of every survivor and s-shares of
   every dropped site (U2 \\ U3) in their neighbourhood; :func:`unmask` rebuilds each site's seeds
   from t_N answers of that site's neighbourhood. A site refuses if fewer than t survivors in all,
   or fewer than t_N in its neighbourhood, or if the survivors fall apart into unconnected parts
   of the graph (the hub would learn each part's sum).

The hub must forward to every site the ciphertexts of one and the same set U2 and pass that set
to :func:`unmask` (:attr:`SecAggClient.senders` lets the transport check it).

Derivations (``info`` is :meth:`RoundContext.info`, e.g. ``b"laulima-secagg/v1/exp=3/round=2/t=2"``,
``.../t=11/k=10`` with a sparse graph):

* share-encryption key of u and v: HKDF-SHA256(X25519(c_u, c_v), salt none, 32 bytes,
  info = info + b"/share-encryption") — the same for both directions; sender and receiver are
  bound by the associated data.
* pairwise mask seed s_uv: HKDF-SHA256(X25519(s_u, s_v), salt none, 32 bytes, info = info + b"/pairwise-mask").
  The sign is +1 for u when u < v (Python string order, i.e. by Unicode code points), else -1.
* PRG: AES-256-CTR keystream under the seed (:func:`laulima.core.privacy.masks.expand`).
* sparse graph (k > 0 and k < n - 1): the roster sorted by SHA-256(seed || name(site)) with
  seed = SHA-256(info + b"/graph") is the ring; each site's neighbours are the k / 2 before and
  the k / 2 after it, cyclically (:func:`laulima.core.privacy.graph.communication_graph`).

Wire layouts (``name`` = u16 big-endian byte length, then the site name in UTF-8):

* public keys: raw X25519, 32 bytes each (:class:`Advertised`).
* share ciphertext: ``nonce (12 random bytes) || AES-256-GCM(plaintext) || tag (16 bytes)`` with
  plaintext ``name(sender) || name(receiver) || b-share (66 bytes) || s-share (66 bytes)`` and
  associated data ``info || name(sender) || name(receiver)``.
* Shamir shares: 66 bytes, big-endian field element of GF(2^521 - 1) (:mod:`laulima.core.privacy.shamir`);
  the secrets are b_u (32 random bytes) and the raw 32-byte X25519 private masking key.
* reveal answer: ``{"self_mask": {survivor: b-share}, "masking_key": {dropped site: s-share}}``.

What is protected, and what is not:

* Against an honest-but-curious hub (it follows the protocol, but reads everything it sees),
  and against fewer than t_N of a site's neighbourhood colluding with it (t sites with the
  complete graph), every individual update stays hidden: the hub sees uniformly random masked
  vectors, and shares it cannot decrypt.
* t_N sites of a site's neighbourhood colluding with the hub can rebuild its self-mask seed and
  masking key and so reveal its individual update (t of all sites with the complete graph).
  Choose t (n_selected - max_dropouts) and k with that in mind; with a sparse graph the hub
  does not choose the neighbourhoods (they come from the round's hash) but needs only t_N
  colluders in the right place.
* With a sparse graph, sites that collude with the hub (all of a group's neighbours outside
  it) can cut the survivors into parts whose separate sums the hub then learns; the survivors
  alone never do: the sites check that they form one connected part.
* An active hub is out of scope: it could substitute public keys in the roster (no PKI signs
  them here) and so read shares, or tell different sites different survivor lists. The checks in
  :meth:`SecAggClient.reveal` stop the simple version of the latter, not every attack.
* There is no range proof: a site may submit any vector within the modulus, and so skew the sum
  arbitrarily. Robust aggregation of individual updates is impossible by design under secure
  aggregation; clipping is each site's own duty.
* Every key, seed and ciphertext is bound to (experiment, round, threshold, degree) by ``info``:
  nothing replays into another round. Keys and b are fresh per :class:`SecAggClient`, i.e. per round.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from laulima.core.privacy import shamir
from laulima.core.privacy.graph import (
    communication_graph,
    connected,
    is_complete,
    neighbourhood_threshold,
    validate_neighbours,
)
from laulima.core.privacy.masks import expand
from laulima.errors import ConfigurationError, DataError, SecureAggregationError

__all__ = [
    "KEY_BYTES",
    "NONCE_BYTES",
    "Advertised",
    "RoundContext",
    "SecAggClient",
    "unmask",
]

KEY_BYTES = 32
NONCE_BYTES = 12
_TAG_BYTES = 16
_MAX_NAME_BYTES = 0xFFFF
_SELF_MASK = "self_mask"
_MASKING_KEY = "masking_key"


@dataclass(frozen=True)
class RoundContext:
    """Binds every key, seed and ciphertext to one round, so nothing is replayable elsewhere.

    ``neighbours`` is the degree k of the round's communication graph
    (:mod:`laulima.core.privacy.graph`): 0 or None for the complete graph, else an even k >= 2."""

    experiment: int
    round: int
    threshold: int
    neighbours: int | None = 0

    def __post_init__(self) -> None:
        for name in ("experiment", "round", "threshold"):
            value = getattr(self, name)
            low = 1 if name == "threshold" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigurationError(
                    f"RoundContext.{name} must be an integer >= {low}, got {value!r}",
                    field=name,
                )
        object.__setattr__(self, "neighbours", validate_neighbours(0 if self.neighbours is None else self.neighbours))

    def info(self) -> bytes:
        """The label every derivation of this round includes (the degree only for a sparse graph,
        so the complete graph's label is Bonawitz et al.'s as before)."""
        label = f"laulima-secagg/v1/exp={self.experiment}/round={self.round}/t={self.threshold}"
        if self.neighbours:
            label += f"/k={self.neighbours}"
        return label.encode()


@dataclass(frozen=True)
class Advertised:
    """What a site publishes in the first phase: its two raw 32-byte X25519 public keys."""

    site: str
    encryption_key: bytes
    masking_key: bytes

    def __post_init__(self) -> None:
        _name_bytes(self.site)
        for name in ("encryption_key", "masking_key"):
            key = getattr(self, name)
            if not isinstance(key, bytes) or len(key) != KEY_BYTES:
                raise DataError(
                    f"site {self.site!r} advertised a {name} that is not {KEY_BYTES} raw bytes; "
                    "it must be an X25519 public key",
                    site=self.site,
                    field=name,
                )


def _name_bytes(site: object) -> bytes:
    if not isinstance(site, str) or not site:
        raise DataError(f"a secure-aggregation site name must be a non-empty string, got {site!r}")
    encoded = site.encode()
    if len(encoded) > _MAX_NAME_BYTES:
        raise DataError(f"site name {site[:40]!r}... is longer than {_MAX_NAME_BYTES} bytes")
    return encoded


def _name_field(site: str) -> bytes:
    encoded = _name_bytes(site)
    return struct.pack(">H", len(encoded)) + encoded


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def _agree(private: X25519PrivateKey, public: bytes, site: str) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:
        raise DataError(
            f"the public key of site {site!r} is not a usable X25519 key ({exc}); that site must advertise again",
            site=site,
        ) from exc


def _pairwise_seed(private: X25519PrivateKey, public: bytes, site: str, context: RoundContext) -> bytes:
    return _hkdf(_agree(private, public, site), context.info() + b"/pairwise-mask")


def _sorted_roster(roster: Sequence[Advertised]) -> dict[str, Advertised]:
    """The roster by name, sorted (the Shamir x of a site is 1 + its position); duplicates refused."""
    by_name: dict[str, Advertised] = {}
    for entry in roster:
        if not isinstance(entry, Advertised):
            raise DataError(f"a roster holds Advertised entries, got {type(entry).__name__}")
        if entry.site in by_name:
            raise DataError(
                f"site {entry.site!r} appears twice in the secure-aggregation roster; each site advertises once",
                site=entry.site,
            )
        by_name[entry.site] = entry
    return {name: by_name[name] for name in sorted(by_name)}


def _xs(names: Sequence[str]) -> dict[str, int]:
    return {name: position + 1 for position, name in enumerate(names)}


def _unique(names: Sequence[str], what: str) -> list[str]:
    listed = list(names)
    if len(set(listed)) != len(listed):
        raise DataError(f"the {what} list names a site twice; give each site once")
    return listed


def _check_vector(vector: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(vector)
    if array.dtype != np.uint32 or array.ndim != 1:
        raise DataError(
            f"{what} must be a 1-D np.uint32 vector, got {array.dtype} of shape {array.shape}; "
            "quantise the update first (laulima.core.privacy.quantize)"
        )
    return array


class SecAggClient:
    """One site in one round. Private keys and the self-mask seed live only in this object's memory."""

    def __init__(self, site: str, context: RoundContext) -> None:
        _name_bytes(site)
        if not isinstance(context, RoundContext):
            raise ConfigurationError(f"SecAggClient needs a RoundContext, got {type(context).__name__}")
        self._site = site
        self._context = context
        self._c = X25519PrivateKey.generate()
        self._s = X25519PrivateKey.generate()
        self._b = secrets.token_bytes(KEY_BYTES)
        self._roster: dict[str, Advertised] | None = None
        self._graph: dict[str, frozenset[str]] = {}
        self._neighbourhood: frozenset[str] = frozenset()
        self._local_threshold = context.threshold
        self._x: dict[str, int] = {}
        self._own_shares: tuple[bytes, bytes] | None = None
        self._received: dict[str, tuple[bytes, bytes]] = {}
        self._masked = False
        self._revealed: tuple[frozenset[str], frozenset[str], dict[str, dict[str, bytes]]] | None = None

    @property
    def site(self) -> str:
        return self._site

    @property
    def senders(self) -> tuple[str, ...]:
        """U2 as this site sees it: the sites whose shares it holds (itself included), sorted."""
        return tuple(sorted(self._received))

    def advertise(self) -> Advertised:
        """The two public keys to publish."""
        return Advertised(self._site, self._c.public_key().public_bytes_raw(), self._s.public_key().public_bytes_raw())

    @property
    def neighbourhood(self) -> tuple[str, ...]:
        """This site and its neighbours in the round's graph (known once it shared), sorted."""
        return tuple(sorted(self._neighbourhood))

    def share(self, roster: Sequence[Advertised]) -> dict[str, bytes]:
        """Encrypted Shamir shares of b and of the private masking key, receiver -> ciphertext (one per
        member of this site's neighbourhood in the round's graph, this site included: with the
        complete graph, the whole roster)."""
        if self._roster is not None:
            raise DataError(f"site {self._site!r} already shared in this round; share once per round")
        by_name = _sorted_roster(roster)
        mine = by_name.get(self._site)
        if mine is None:
            raise DataError(
                f"the roster does not include this site {self._site!r}; only advertised sites can take part",
                site=self._site,
            )
        if mine != self.advertise():
            raise DataError(
                f"the roster carries other public keys for this site {self._site!r} than it advertised; "
                "the round's roster is not this site's, refusing to share",
                site=self._site,
            )
        threshold = self._context.threshold
        if len(by_name) < threshold:
            raise DataError(
                f"the roster holds {len(by_name)} site(s), fewer than the threshold {threshold}; "
                "the round cannot be unmasked, so this site does not share",
                site=self._site,
            )
        graph = communication_graph(by_name, self._context)
        neighbourhood = graph[self._site] | {self._site}
        local = neighbourhood_threshold(len(by_name), self._context)
        xs = _xs(list(by_name))
        holders = [xs[name] for name in by_name if name in neighbourhood]
        b_shares = shamir.split(self._b, local, holders)
        s_shares = shamir.split(self._s.private_bytes_raw(), local, holders)
        info = self._context.info()
        out: dict[str, bytes] = {}
        for receiver, entry in by_name.items():
            if receiver not in neighbourhood:
                continue
            x = xs[receiver]
            key = _hkdf(_agree(self._c, entry.encryption_key, receiver), info + b"/share-encryption")
            header = _name_field(self._site) + _name_field(receiver)
            nonce = secrets.token_bytes(NONCE_BYTES)
            out[receiver] = nonce + AESGCM(key).encrypt(nonce, header + b_shares[x] + s_shares[x], info + header)
        self._roster = by_name
        self._graph = graph
        self._neighbourhood = neighbourhood
        self._local_threshold = local
        self._x = xs
        self._own_shares = (b_shares[xs[self._site]], s_shares[xs[self._site]])
        self._received[self._site] = self._own_shares
        return out

    def receive(self, ciphertexts: Mapping[str, bytes]) -> None:
        """Decrypt and keep the shares addressed to this site, sender -> ciphertext; may be called
        more than once, before :meth:`mask`."""
        if self._roster is None:
            raise DataError(f"site {self._site!r} must share before it receives; call share() first")
        if self._masked:
            raise DataError(f"site {self._site!r} already masked its vector; shares arriving now are too late")
        info = self._context.info()
        for sender, ciphertext in ciphertexts.items():
            entry = self._roster.get(sender)
            if entry is None:
                raise DataError(
                    f"shares from {sender!r}, which is not in this round's roster; refusing them",
                    site=sender,
                )
            if sender not in self._neighbourhood:
                raise DataError(
                    f"shares from {sender!r}, which is not a neighbour of {self._site!r} in this round's graph; "
                    "refusing them",
                    site=sender,
                )
            header = _name_field(sender) + _name_field(self._site)
            expected = NONCE_BYTES + len(header) + 2 * shamir.SHARE_BYTES + _TAG_BYTES
            if not isinstance(ciphertext, bytes) or len(ciphertext) != expected:
                raise DataError(
                    f"the shares from {sender!r} have the wrong length; they were damaged in transit",
                    site=sender,
                )
            key = _hkdf(_agree(self._c, entry.encryption_key, sender), info + b"/share-encryption")
            try:
                plain = AESGCM(key).decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:], info + header)
            except InvalidTag as exc:
                raise DataError(
                    f"the shares from {sender!r} fail authentication (tampered, or for another round or site); "
                    "refusing them",
                    site=sender,
                ) from exc
            if plain[: len(header)] != header:
                raise DataError(
                    f"the shares from {sender!r} name another sender or receiver inside; refusing them",
                    site=sender,
                )
            body = plain[len(header) :]
            shares = (body[: shamir.SHARE_BYTES], body[shamir.SHARE_BYTES :])
            held = self._received.get(sender)
            if held is not None and held != shares:
                raise DataError(
                    f"site {sender!r} sent this site two different sets of shares; refusing the second",
                    site=sender,
                )
            self._received[sender] = shares

    def _pairwise(self) -> list[tuple[str, bytes]]:
        assert self._roster is not None
        return [
            (v, _pairwise_seed(self._s, self._roster[v].masking_key, v, self._context))
            for v in sorted(self._received)
            if v != self._site
        ]

    def mask(self, vector: np.ndarray) -> np.ndarray:
        """y = x + PRG(b) + Σ_{v ∈ U2 ∩ N(self)} ±PRG(s_{self,v}) mod 2^32; once per round."""
        if self._roster is None:
            raise DataError(f"site {self._site!r} must share and receive before it masks")
        if self._masked:
            raise DataError(
                f"site {self._site!r} already masked a vector in this round; masking twice would let the "
                "hub subtract the two and learn their difference"
            )
        if len(self._received) < self._local_threshold:
            raise SecureAggregationError(
                f"secure aggregation: {len(self._received)} site(s) shared with {self._site!r}, "
                f"{self._local_threshold} needed; the round cannot be unmasked, so this site sends nothing",
                site=self._site,
            )
        x = _check_vector(vector, "the vector to mask")
        self._masked = True
        y = x.copy()
        y += expand(self._b, y.size)
        for v, seed in self._pairwise():
            if self._site < v:
                y += expand(seed, y.size)
            else:
                y -= expand(seed, y.size)
        return y

    def reveal(self, survivors: Sequence[str], dropped: Sequence[str]) -> dict[str, dict[str, bytes]]:
        """The shares the hub needs to unmask: b-shares of the survivors, s-shares of the dropped sites,
        each for those in this site's neighbourhood (the lists name the whole round's sites)."""
        alive = frozenset(_unique(survivors, "survivors"))
        gone = frozenset(_unique(dropped, "dropped"))
        if self._revealed is not None:
            previous_alive, previous_gone, answer = self._revealed
            if (alive, gone) != (previous_alive, previous_gone):
                raise DataError(
                    f"site {self._site!r} already revealed shares for other survivor and dropout lists; "
                    "revealing again could expose both masks of one site",
                    site=self._site,
                )
            return {kind: dict(shares) for kind, shares in answer.items()}
        if not self._masked:
            raise DataError(
                f"site {self._site!r} has not masked a vector in this round, so it has no part in the unmasking"
            )
        both = sorted(alive & gone)
        if both:
            raise DataError(
                f"site {both[0]!r} is listed both as survivor and as dropped; revealing both of its shares "
                "would expose its update, refusing",
                site=both[0],
            )
        if self._site not in alive:
            raise DataError(
                f"this site {self._site!r} sent its masked vector but is not listed as a survivor; refusing to reveal",
                site=self._site,
            )
        assert self._roster is not None  # masked, so shared
        u2 = frozenset(self._received)
        roster = frozenset(self._roster)
        listed = alive | gone
        near = listed & self._neighbourhood
        if near != u2 or not listed <= roster:
            extra = sorted((near - u2) | (listed - roster))
            missing = sorted(u2 - near)
            raise DataError(
                f"survivors and dropped sites must together be the {len(u2)} site(s) that shared with "
                f"{self._site!r}{'' if self._neighbourhood == roster else ' among its neighbours'}"
                f"; not among them: {extra}, left out: {missing}",
                site=self._site,
            )
        if len(alive) < self._context.threshold:
            raise SecureAggregationError(
                f"secure aggregation: {len(alive)} survivor(s), {self._context.threshold} needed; the round "
                "cannot be unmasked, so this site reveals nothing",
                site=self._site,
            )
        if len(alive & self._neighbourhood) < self._local_threshold:
            raise SecureAggregationError(
                f"secure aggregation: {len(alive & self._neighbourhood)} survivor(s) in the neighbourhood of "
                f"{self._site!r}, {self._local_threshold} needed; the round cannot be unmasked, so this site "
                "reveals nothing",
                site=self._site,
            )
        parts = connected(alive, self._graph)
        if len(parts) > 1:
            raise SecureAggregationError(
                f"secure aggregation: the survivors split into {len(parts)} unconnected groups in the round's "
                f"graph (sizes {[len(p) for p in parts]}); unmasking would reveal each group's sum, so "
                f"{self._site!r} reveals nothing",
                site=self._site,
            )
        answer = {
            _SELF_MASK: {u: self._received[u][0] for u in sorted(alive & u2)},
            _MASKING_KEY: {v: self._received[v][1] for v in sorted(gone & u2)},
        }
        self._revealed = (alive, gone, answer)
        return {kind: dict(shares) for kind, shares in answer.items()}


def unmask(
    masked_sum: np.ndarray,
    context: RoundContext,
    roster: Sequence[Advertised],
    shared: Sequence[str],
    survivors: Sequence[str],
    reveals: Mapping[str, Mapping[str, Mapping[str, bytes]]],
) -> np.ndarray:
    """The sum mod 2^32 of the survivors' vectors, from the sum of their masked vectors and the reveal
    answers (responder -> answer): a site's secrets are rebuilt from the answers of its neighbourhood
    in the round's graph, of which at least the neighbourhood threshold are needed (with the
    complete graph: `threshold` answers of any survivors)."""
    total = _check_vector(masked_sum, "the masked sum").copy()
    by_name = _sorted_roster(roster)
    xs = _xs(list(by_name))
    u2 = _unique(shared, "shared")
    u3 = _unique(survivors, "survivors")
    outside = sorted(set(u2) - set(by_name))
    if outside:
        raise DataError(f"site {outside[0]!r} shared but is not in the roster", site=outside[0])
    not_shared = sorted(set(u3) - set(u2))
    if not_shared:
        raise DataError(
            f"site {not_shared[0]!r} is listed as survivor but did not share; its vector cannot be unmasked",
            site=not_shared[0],
        )
    threshold = context.threshold
    if len(u3) < threshold:
        raise SecureAggregationError(
            f"secure aggregation: {len(u3)} of {len(u2)} sites that shared sent a masked vector, "
            f"{threshold} needed; the round cannot be unmasked"
        )
    strangers = sorted(set(reveals) - set(u3))
    if strangers:
        raise DataError(
            f"site {strangers[0]!r} answered the unmasking but is not a survivor; only survivors reveal",
            site=strangers[0],
        )
    graph = communication_graph(by_name, context)
    complete = is_complete(len(by_name), context.neighbours or 0)
    local = neighbourhood_threshold(len(by_name), context)
    if complete and len(reveals) < threshold:
        raise SecureAggregationError(
            f"secure aggregation: {len(reveals)} of {len(u3)} sites answered the unmasking, "
            f"{threshold} needed; the round cannot be unmasked"
        )
    parts = connected(u3, graph)
    if len(parts) > 1:
        raise SecureAggregationError(
            f"secure aggregation: the survivors split into {len(parts)} unconnected groups in the round's graph "
            f"(sizes {[len(p) for p in parts]}); the sites refuse to reveal, the round cannot be unmasked"
        )
    dropped = sorted(set(u2) - set(u3))

    def closed(site: str) -> frozenset[str]:
        return graph[site] | {site}

    holders: dict[str, list[str]] = {}
    for owner in [*sorted(u3), *dropped]:
        near = closed(owner)
        answered = sorted(r for r in reveals if r in near)
        if len(answered) < local:
            raise SecureAggregationError(
                f"secure aggregation: the neighbourhood of {owner!r} ({len(near)} sites) gave {len(answered)} "
                f"unmasking answer(s), {local} needed; the round cannot be unmasked",
                site=owner,
            )
        holders[owner] = answered[:local]
    for responder in sorted({r for used in holders.values() for r in used}):
        answer = reveals[responder]
        near = closed(responder)
        if set(answer) != {_SELF_MASK, _MASKING_KEY} or set(answer[_SELF_MASK]) != set(u3) & near:
            raise DataError(
                f"the unmasking answer of {responder!r} does not hold a share for exactly the survivors; "
                "it answered other lists",
                site=responder,
            )
        if set(answer[_MASKING_KEY]) != set(dropped) & near:
            raise DataError(
                f"the unmasking answer of {responder!r} does not hold a share for exactly the dropped sites; "
                "it answered other lists",
                site=responder,
            )

    def secret(kind: str, owner: str) -> bytes:
        try:
            return shamir.combine({xs[r]: reveals[r][kind][owner] for r in holders[owner]}, local)
        except DataError as exc:
            raise SecureAggregationError(
                f"secure aggregation: the shares of {owner!r} ({kind}) do not reconstruct ({exc}); "
                "the round cannot be unmasked",
                site=owner,
            ) from exc

    for u in sorted(u3):
        total -= expand(secret(_SELF_MASK, u), total.size)
    for v in dropped:
        try:
            private = X25519PrivateKey.from_private_bytes(secret(_MASKING_KEY, v))
        except ValueError as exc:
            raise SecureAggregationError(f"secure aggregation: the masking key of {v!r} does not reconstruct") from exc
        if private.public_key().public_bytes_raw() != by_name[v].masking_key:
            raise SecureAggregationError(
                f"secure aggregation: the shares of {v!r}'s masking key rebuild another key than it advertised; "
                "the round cannot be unmasked",
                site=v,
            )
        for u in sorted(set(u3) & graph[v]):
            pairwise = expand(_pairwise_seed(private, by_name[u].masking_key, u, context), total.size)
            # u added +PRG(s_uv) when u < v, -PRG otherwise: take that back
            if u < v:
                total -= pairwise
            else:
                total += pairwise
    return total
