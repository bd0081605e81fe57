"""UsageBook: queries and bytes served, per API key and per RPC (one image = one query)."""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass


@dataclass(frozen=True)
class RpcUsage:
    rpc: str
    calls: int
    queries: int
    request_bytes: int
    response_bytes: int


class UsageBook:
    """Thread-safe counters; the usage interceptor writes them, GetUsage reads them."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        self._lock = threading.Lock()

    def charge(
        self, api_key: str, rpc: str, *, queries: int, request_bytes: int, response_bytes: int
    ) -> None:
        with self._lock:
            counts = self._counts[(api_key, rpc)]
            counts[0] += 1
            counts[1] += queries
            counts[2] += request_bytes
            counts[3] += response_bytes

    def report(self, api_key: str) -> list[RpcUsage]:
        with self._lock:
            return [
                RpcUsage(rpc, *counts)
                for (key, rpc), counts in sorted(self._counts.items())
                if key == api_key
            ]
