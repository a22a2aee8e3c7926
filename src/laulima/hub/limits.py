"""Per-site limits, so one site's flood cannot starve the others.

Each site has a token bucket for uploads (``site_uploads_per_minute``, burst
``site_upload_burst``) and a cap on concurrent transfers (uploads plus downloads,
``site_max_transfers``). Over either limit the hub answers 429 with ``Retry-After``, which
the site agent already honours. State is in memory: a restarted hub starts with full buckets.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from laulima.errors import TooManyRequests

__all__ = ["SiteLimits", "TransferSlot"]


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class TransferSlot:
    """One running transfer of a site; released on ``__exit__`` (once)."""

    def __init__(self, limits: SiteLimits, site: str) -> None:
        self._limits, self._site, self._held = limits, site, True

    def __enter__(self) -> TransferSlot:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._held:
            self._held = False
            self._limits._release(self._site)


class SiteLimits:
    def __init__(
        self,
        uploads_per_minute: float,
        burst: int,
        max_transfers: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = uploads_per_minute / 60.0
        self.burst = burst
        self.max_transfers = max_transfers
        self.clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, _Bucket] = {}
        self._running: dict[str, int] = {}

    def take_upload(self, site: str) -> None:
        """Spend one upload token of ``site`` or refuse with 429."""
        now = self.clock()
        with self._lock:
            b = self._buckets.setdefault(site, _Bucket(float(self.burst), now))
            b.tokens = min(float(self.burst), b.tokens + (now - b.stamp) * self.rate)
            b.stamp = now
            if b.tokens >= 1.0:
                b.tokens -= 1.0
                return
            wait = (1.0 - b.tokens) / self.rate
        raise TooManyRequests(
            f"site {site!r} is uploading faster than {self.rate * 60:g} uploads per minute; retry in {wait:.1f} s",
            site=site,
            retry_after=math.ceil(wait),
        )

    def transfer(self, site: str) -> TransferSlot:
        """Hold one of ``site``'s transfer slots, or refuse with 429."""
        with self._lock:
            running = self._running.get(site, 0)
            if running < self.max_transfers:
                self._running[site] = running + 1
                return TransferSlot(self, site)
        raise TooManyRequests(
            f"site {site!r} already runs {running} transfers (the limit per site); retry when one has finished",
            site=site,
            retry_after=1,
        )

    def _release(self, site: str) -> None:
        with self._lock:
            self._running[site] = max(0, self._running.get(site, 0) - 1)
