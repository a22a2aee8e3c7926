"""The communication graph of secure aggregation: complete (Bonawitz et al. 2017) or sparse (SecAgg+).

SecAgg+ (Bell, Bonawitz, Gascón, Lepoint, Raykova, CCS 2020) replaces the complete graph of
Bonawitz et al. by a sparse k-regular one: each site masks pairwise only with its k neighbours
and Shamir-shares its secrets only among its neighbourhood (its neighbours and itself, k + 1
sites) with a per-neighbourhood threshold — O(k) keys, shares and PRG expansions per site
instead of O(n).

The graph of a round is a Harary graph H(k, n): the roster (the sites that advertised) is put
on a ring in a pseudo-random order, and every site is linked to the k/2 nearest sites on each
side. The order sorts the sites by SHA-256(seed || u16 length || name), seed =
SHA-256(``context.info()`` || ``b"/graph"``), so it changes every
round and no site picks its place by choosing its name (names are registered long before the
round's ``info`` exists). Hub and sites compute it from the same roster and
:class:`~laulima.core.privacy.secagg.RoundContext`, so no message carries it. An *active* hub
could bias it (it chooses which advertisers make the roster, and so the order of the
others); active hubs are out of scope, as for the rest of the protocol.

``k`` is even and at least 2; ``k = 0`` (or ``k >= n - 1``) is the complete graph: every site
is every other's neighbour and the protocol is exactly Bonawitz et al.'s.

The default degree (:func:`default_neighbours`) follows Bell et al.'s guidance that a degree
logarithmic in n suffices: ``k = 2 * ceil(log2 n)`` (20 sites: 10; 100: 14; 1000: 20).
What it protects, against the honest-but-curious hub:

* a site's update stays hidden unless the hub colludes with at least the neighbourhood
  threshold ``k / 2 + 1`` of that site's own neighbours (with the complete graph: ``t`` of all
  sites). Which sites are a site's neighbours is decided by the round's hash, not by the hub;
* each neighbourhood tolerates ``k / 2`` sites that drop out after sharing (a strict majority
  of its ``k + 1`` sites must answer the unmasking); the round's global threshold still
  applies to the phases;
* if the sites that survive do not form a connected part of the graph, the hub could learn
  the sums of the separate parts: the sites then refuse to reveal and the round is aborted
  (:func:`connected`). Colluding sites can cut the ring as well (k of them, k/2 on either side
  of an arc, give the hub that arc's sum): like Bell et al.'s, the guarantee is about sums
  over large groups, which is why k grows with n.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from laulima.errors import ConfigurationError

if TYPE_CHECKING:
    from laulima.core.privacy.secagg import RoundContext

__all__ = [
    "COMPLETE_UP_TO",
    "communication_graph",
    "connected",
    "default_neighbours",
    "is_complete",
    "neighbourhood_threshold",
    "validate_neighbours",
]

COMPLETE_UP_TO = 16
"""Rounds of at most this many sites use the complete graph unless the spec names a degree."""


def validate_neighbours(k: object) -> int:
    """``k`` as an int: 0 (the complete graph) or an even integer >= 2."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0 or (k != 0 and (k < 2 or k % 2)):
        raise ConfigurationError(
            f"the number of neighbours in the secure-aggregation graph must be 0 (the complete graph) or an even "
            f"integer >= 2, got {k!r}",
            field="neighbours",
        )
    return k


def default_neighbours(n_sites: int) -> int:
    """SecAgg+'s logarithmic degree: ``2 * ceil(log2 n)`` (0, the complete graph, when that is
    not below ``n - 1``)."""
    if n_sites <= 2:
        return 0
    k = 2 * math.ceil(math.log2(n_sites))
    return 0 if k >= n_sites - 1 else k


def is_complete(n_sites: int, k: int) -> bool:
    """Whether degree ``k`` over ``n_sites`` sites is the complete graph."""
    return k == 0 or k >= n_sites - 1


def neighbourhood_threshold(n_sites: int, context: RoundContext) -> int:
    """Shares needed to rebuild one site's secrets: the round's threshold ``t`` with the complete
    graph (exactly Bonawitz et al.), a strict majority ``k / 2 + 1`` of the ``k + 1`` sites of a
    neighbourhood with a sparse one."""
    k = context.neighbours or 0
    if is_complete(n_sites, k):
        return context.threshold
    return k // 2 + 1


def _position_key(seed: bytes, site: str) -> bytes:
    encoded = site.encode()
    return hashlib.sha256(seed + struct.pack(">H", len(encoded)) + encoded).digest()


def communication_graph(sites: Iterable[str], context: RoundContext) -> dict[str, frozenset[str]]:
    """Every site's neighbours (itself excluded), by name: the Harary ring over the round's
    pseudo-random order, or the complete graph. Symmetric, k-regular, deterministic per
    (roster, context)."""
    names = sorted(set(sites))
    n = len(names)
    k = validate_neighbours(context.neighbours or 0)
    if is_complete(n, k):
        everyone = frozenset(names)
        return {name: everyone - {name} for name in names}
    seed = hashlib.sha256(context.info() + b"/graph").digest()
    ring = sorted(names, key=lambda name: (_position_key(seed, name), name))
    half = k // 2
    graph: dict[str, frozenset[str]] = {}
    for position, name in enumerate(ring):
        # k < n - 1, so the k/2 sites on either side are k distinct sites
        graph[name] = frozenset(ring[(position + step) % n] for step in range(-half, half + 1) if step != 0)
    return dict(sorted(graph.items()))


def connected(members: Iterable[str], graph: Mapping[str, frozenset[str]]) -> list[frozenset[str]]:
    """The connected parts of the graph restricted to ``members``, largest first (one part: connected)."""
    left = set(members)
    parts: list[frozenset[str]] = []
    while left:
        start = min(left)
        part = {start}
        frontier = [start]
        while frontier:
            for neighbour in graph.get(frontier.pop(), frozenset()):
                if neighbour in left and neighbour not in part:
                    part.add(neighbour)
                    frontier.append(neighbour)
        left -= part
        parts.append(frozenset(part))
    return sorted(parts, key=lambda p: (-len(p), min(p)))
