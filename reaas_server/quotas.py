"""Query quotas per API key: at most N queries (images) per period, never overshot by concurrent calls or by
replicas sharing a ledger.

Periods are aligned to the Unix epoch, so a daily quota resets at 00:00 UTC and every replica agrees on when. A
call *reserves* its images before it runs (a hold in the ledger's database) and settles when it ends: answered,
its charge turns the hold into usage in one transaction; refused or abandoned, the hold is given back. The
counting lives in the ledger (``SqlLedger.reserve_quota``), so two calls on two replicas cannot both squeeze under
the limit.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from reaas_server.ledger import (
    QUOTA_HOLD_TTL_S,
    ApiKey,
    LedgerUnavailable,
    QuotaExceeded,
    QuotaHold,
    SqlLedger,
    describe_period,
)

log = logging.getLogger(__name__)

__all__ = ["QuotaBook", "QuotaExceeded", "QuotaHold", "QuotaStatus", "describe_period"]


@dataclass(frozen=True)
class QuotaStatus:
    """A key's quota as GetUsage reports it."""

    limit: int
    period_s: int
    used: int  # answered queries this period
    remaining: int
    resets_at: float  # Unix time the period ends


class QuotaBook:
    """The quota side of a ledger: what a key may still use, and the holds of the calls that run."""

    def __init__(self, ledger: SqlLedger) -> None:
        self._ledger = ledger

    @staticmethod
    def applies(key: ApiKey | None) -> bool:
        """Whether calls of `key` are counted against a quota (otherwise nothing is held or asked of the ledger)."""
        return key is not None and key.quota_queries is not None

    def status(self, key: ApiKey | None, now: float | None = None) -> QuotaStatus | None:
        if not self.applies(key):
            return None
        start, used = self._ledger.quota_used(key, time.time() if now is None else now)
        return QuotaStatus(key.quota_queries, key.quota_period_s, used, max(0, key.quota_queries - used),
                           start + key.quota_period_s)

    def reserve(self, key: ApiKey | None, queries: int) -> QuotaHold | None:
        """Hold `queries` of `key`'s quota or raise QuotaExceeded; None when the key has no quota (nothing to
        hold). Pass the hold to ``charge`` when the call is answered, else to ``release``."""
        if not self.applies(key) or queries == 0:
            return None
        return self._ledger.reserve_quota(key, queries)

    def release(self, hold: QuotaHold | None) -> None:
        """Give a hold back; if the ledger cannot be reached, the hold expires by itself (QUOTA_HOLD_TTL_S)."""
        if hold is None:
            return
        try:
            self._ledger.release_quota(hold)
        except LedgerUnavailable as error:
            log.warning("quota hold %d of key %r not given back (it expires in %.0f s): %s", hold.id,
                        hold.key.name, QUOTA_HOLD_TTL_S, error)
