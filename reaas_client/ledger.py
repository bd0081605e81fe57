"""QueryLedger: what each input cost, in the paper's unit (one image sent = one query) and in bytes.

The ledger is the client's own record, independent of the server's usage report, so a client can check the
bill and the REaaS-vs-SEaaS comparison can state queries per input exactly. A request's bytes are shared
among its images in proportion to their count (each image of one request carries the same payload size).
"""

from __future__ import annotations

import csv
import threading
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

UNLABELLED = "<unlabelled>"


@dataclass(frozen=True)
class LedgerRow:
    input_id: str
    rpc: str
    queries: int
    request_bytes: int
    response_bytes: int


@dataclass
class _Cost:
    queries: int = 0
    request_bytes: float = 0.0
    response_bytes: float = 0.0


class QueryLedger:
    """Per input id and per RPC: queries, request bytes, response bytes. Thread-safe."""

    def __init__(self) -> None:
        self._costs: dict[tuple[str, str], _Cost] = defaultdict(_Cost)
        self._lock = threading.Lock()

    def record(self, rpc: str, input_ids: Sequence[str], request_bytes: int, response_bytes: int) -> None:
        """Charge one query per entry of ``input_ids`` (ids may repeat) and split the bytes evenly."""
        if not input_ids:
            return
        share = 1.0 / len(input_ids)
        with self._lock:
            for input_id in input_ids:
                cost = self._costs[(input_id, rpc)]
                cost.queries += 1
                cost.request_bytes += request_bytes * share
                cost.response_bytes += response_bytes * share

    def queries(self, input_id: str, rpc: str | None = None) -> int:
        with self._lock:
            return sum(c.queries for (i, r), c in self._costs.items() if i == input_id and rpc in (None, r))

    def bytes(self, input_id: str) -> tuple[int, int]:
        """(bytes sent, bytes received) attributed to ``input_id`` over all RPCs, rounded."""
        with self._lock:
            costs = [c for (i, _), c in self._costs.items() if i == input_id]
        return round(sum(c.request_bytes for c in costs)), round(sum(c.response_bytes for c in costs))

    def input_ids(self) -> list[str]:
        with self._lock:
            return sorted({i for i, _ in self._costs})

    def rows(self) -> list[LedgerRow]:
        with self._lock:
            items = sorted(self._costs.items())
        return [
            LedgerRow(i, r, c.queries, round(c.request_bytes), round(c.response_bytes)) for (i, r), c in items
        ]

    def totals_by_rpc(self) -> dict[str, LedgerRow]:
        """One row per RPC summed over inputs (``input_id`` is "*")."""
        totals: dict[str, _Cost] = defaultdict(_Cost)
        with self._lock:
            for (_, rpc), cost in self._costs.items():
                total = totals[rpc]
                total.queries += cost.queries
                total.request_bytes += cost.request_bytes
                total.response_bytes += cost.response_bytes
        return {
            rpc: LedgerRow("*", rpc, c.queries, round(c.request_bytes), round(c.response_bytes))
            for rpc, c in sorted(totals.items())
        }

    def to_csv(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["input_id", "rpc", "queries", "request_bytes", "response_bytes"])
            for row in self.rows():
                writer.writerow([row.input_id, row.rpc, row.queries, row.request_bytes, row.response_bytes])
        return path

    def table(self) -> str:
        """A plain-text table of the per-RPC totals, for terminals and logs."""
        lines = [f"{'rpc':<18}{'queries':>12}{'bytes up':>16}{'bytes down':>16}"]
        for row in self.totals_by_rpc().values():
            lines.append(f"{row.rpc:<18}{row.queries:>12}{row.request_bytes:>16}{row.response_bytes:>16}")
        return "\n".join(lines)
