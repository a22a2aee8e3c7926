"""Per-caller limits, so one site's or one person's flood cannot starve the others.

Every caller (a site, or a person by token name) has a token bucket for requests of any
kind (``requests_per_minute``, burst ``request_burst``): polls, evaluations and failure
reports included. Each site also has a bucket for uploads (``site_uploads_per_minute``,
burst ``site_upload_burst``), a cap on concurrent transfers (uploads plus downloads,
``site_max_transfers``) and on concurrent long polls (``site_max_polls``). Over any limit
the hub answers 429 with ``Retry-After``, which the site agent honours. State is in memory:
a restarted hub starts with full buckets.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from laulima.errors import TooManyRequests

__all__ = ["SiteLimits", "Slot"]


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class Slot:
    """One unit of a per-site counter (a running transfer, a waiting long poll), given back
    on ``__exit__`` (once)."""

    def __init__(self, lock: threading.Lock, counts: dict[str, int], key: str) -> None:
        self._lock, self._counts, self._key, self._held = lock, counts, key, True

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            if self._held:
                self._held = False
                self._counts[self._key] = max(0, self._counts.get(self._key, 0) - 1)


class SiteLimits:
    def __init__(
        self,
        uploads_per_minute: float,
        burst: int,
        max_transfers: int,
        clock: Callable[[], float] = time.monotonic,
        *,
        requests_per_minute: float = 1200.0,
        request_burst: int = 120,
        max_polls: int = 2,
    ) -> None:
        self.rate = uploads_per_minute / 60.0
        self.burst = burst
        self.max_transfers = max_transfers
        self.request_rate = requests_per_minute / 60.0
        self.request_burst = request_burst
        self.max_polls = max_polls
        self.clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, _Bucket] = {}
        self._requests: dict[str, _Bucket] = {}
        self._running: dict[str, int] = {}
        self._polling: dict[str, int] = {}

    def take_upload(self, site: str) -> None:
        """Spend one upload token of ``site`` or refuse with 429."""
        wait = self._take(self._buckets, site, self.rate, self.burst)
        if wait is not None:
            raise TooManyRequests(
                f"site {site!r} is uploading faster than {self.rate * 60:g} uploads per minute; retry in {wait:.1f} s",
                site=site,
                retry_after=math.ceil(wait),
            )

    def take_request(self, caller: str) -> None:
        """Spend one request token of ``caller`` (``site:NAME`` or ``person:NAME``) or refuse with 429."""
        wait = self._take(self._requests, caller, self.request_rate, self.request_burst)
        if wait is not None:
            raise TooManyRequests(
                f"{caller.replace(':', ' ', 1)} sends more than {self.request_rate * 60:g} requests per minute; "
                f"retry in {wait:.1f} s",
                retry_after=math.ceil(wait),
            )

    def poll(self, site: str) -> Slot:
        """Hold one of ``site``'s long polls (an agent needs one), or refuse with 429."""
        slot, running = self._hold(self._polling, site, self.max_polls)
        if slot is None:
            raise TooManyRequests(
                f"site {site!r} already waits in {running} long polls (the limit per site); one agent needs one",
                site=site,
                retry_after=1,
            )
        return slot

    def _take(self, buckets: dict[str, _Bucket], key: str, rate: float, burst: int) -> float | None:
        """Spend a token of ``key``'s bucket; None if done, else the seconds until one is back."""
        now = self.clock()
        with self._lock:
            if len(buckets) > 100_000:  # names are authenticated, but keep memory bounded anyway
                buckets.clear()
            b = buckets.setdefault(key, _Bucket(float(burst), now))
            b.tokens = min(float(burst), b.tokens + (now - b.stamp) * rate)
            b.stamp = now
            if b.tokens >= 1.0:
                b.tokens -= 1.0
                return None
            return (1.0 - b.tokens) / rate

    def transfer(self, site: str) -> Slot:
        """Hold one of ``site``'s transfer slots, or refuse with 429."""
        slot, running = self._hold(self._running, site, self.max_transfers)
        if slot is None:
            raise TooManyRequests(
                f"site {site!r} already runs {running} transfers (the limit per site); retry when one has finished",
                site=site,
                retry_after=1,
            )
        return slot

    def _hold(self, counts: dict[str, int], site: str, limit: int) -> tuple[Slot | None, int]:
        """A slot of ``counts[site]`` if fewer than ``limit`` are held, and how many were."""
        with self._lock:
            running = counts.get(site, 0)
            if running >= limit:
                return None, running
            counts[site] = running + 1
            return Slot(self._lock, counts, site), running
