"""Query quotas per API key: at most N queries (images) per period, never overshot by concurrent calls.

Periods are aligned to the Unix epoch, so a daily quota resets at 00:00 UTC and every replica sharing a ledger
agrees on when. A call *reserves* its images before it runs and settles when it ends: answered, they count as
used (the ledger has the row); refused or abandoned, they are given back. Two concurrent calls therefore cannot
both squeeze under the limit. The used count is read from the ledger once per key and period, then kept here.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from reaas_server.ledger import ApiKey, UsageLedger


@dataclass(frozen=True)
class QuotaStatus:
    """A key's quota as GetUsage reports it."""

    limit: int
    period_s: int
    used: int  # answered queries this period
    remaining: int
    resets_at: float  # Unix time the period ends


class QuotaExceeded(Exception):
    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_ms = retry_after_ms  # until the quota resets


def _period_start(period_s: int, now: float) -> float:
    return math.floor(now / period_s) * period_s


def describe_period(seconds: int) -> str:
    names = {60: "minute", 3600: "hour", 86400: "day", 7 * 86400: "week"}
    return names.get(seconds, f"{seconds} s")


class QuotaBook:
    def __init__(self, ledger: UsageLedger) -> None:
        self._ledger = ledger
        self._lock = threading.Lock()
        self._used: dict[str, tuple[float, int]] = {}  # key name → (period start, answered queries)
        self._reserved: dict[str, int] = {}

    def _used_now(self, key: ApiKey, now: float) -> tuple[float, int]:
        start = _period_start(key.quota_period_s, now)
        known = self._used.get(key.name)
        if known is None or known[0] != start:
            known = (start, self._ledger.queries_since(key.name, start))
            self._used[key.name] = known
        return known

    def status(self, key: ApiKey | None, now: float | None = None) -> QuotaStatus | None:
        if key is None or key.quota_queries is None:
            return None
        now = time.time() if now is None else now
        with self._lock:
            start, used = self._used_now(key, now)
        return QuotaStatus(key.quota_queries, key.quota_period_s, used, max(0, key.quota_queries - used),
                           start + key.quota_period_s)

    def reserve(self, key: ApiKey | None, queries: int) -> Callable[[bool], None]:
        """Hold `queries` of `key`'s quota or raise QuotaExceeded; returns ``settle(answered)`` (call it once)."""
        if key is None or key.quota_queries is None or queries == 0:
            return lambda answered: None
        now = time.time()
        with self._lock:
            start, used = self._used_now(key, now)
            held = self._reserved.get(key.name, 0)
            if used + held + queries > key.quota_queries:
                resets_at = start + key.quota_period_s
                raise QuotaExceeded(
                    f"quota exceeded for key {key.name!r}: {key.quota_queries} queries per "
                    f"{describe_period(key.quota_period_s)}, {used} used, {held} in flight, this request needs "
                    f"{queries}; it resets at {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(resets_at))} UTC "
                    f"(in {resets_at - now:.0f} s)",
                    retry_after_ms=round(1000 * (resets_at - now)),
                )
            self._reserved[key.name] = held + queries

        def settle(answered: bool) -> None:
            with self._lock:
                self._reserved[key.name] -= queries
                if answered:
                    period, used_now = self._used.get(key.name, (start, 0))
                    if period == start:
                        self._used[key.name] = (period, used_now + queries)

        return settle
