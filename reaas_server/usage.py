"""UsageBook: queries and bytes served, per API key and per RPC (one image = one query)."""

from __future__ import annotations

import threading
from collections import defaultdict

from reaas.v1 import encoder_service_pb2 as pb


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

    def report(self, api_key: str) -> list[pb.RpcUsage]:
        """What ``api_key`` was served, one entry per RPC, as the wire message GetUsage returns."""
        with self._lock:
            items = sorted((rpc, counts) for (key, rpc), counts in self._counts.items() if key == api_key)
        return [
            pb.RpcUsage(rpc=rpc, calls=c, queries=q, request_bytes=up, response_bytes=down)
            for rpc, (c, q, up, down) in items
        ]
