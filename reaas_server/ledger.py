"""UsageLedger: API keys and the bill, in one SQLite file that survives restarts and crashes.

* **Keys are stored hashed** (SHA-256 of the secret). The secrets are 256-bit random tokens made by
  ``add_key``, so a fast hash is enough (slow password hashes exist for low-entropy passwords); the ledger file
  can be read without revealing a usable key. A key has a name (what logs, usage reports and exports show), an
  optional quota (queries per period) and an optional limit on concurrent calls.
* **Every answered call is one row, committed before its reply is sent** (``charge``). WAL mode with
  ``synchronous=NORMAL``: a commit is in the operating system's hands when ``charge`` returns, so a SIGKILL or a
  restart of the server loses nothing that was answered (a power cut may lose the last commits; ``durable=True``
  syncs every commit to disk at a measured cost).
* Readers (GetUsage, ``reaas-keys``, the CSV export) run beside the writing server: WAL lets them.
"""

from __future__ import annotations

import csv
import hashlib
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

MEMORY_LEDGER = ":memory:"  # what the CLIs accept for "no file"
ANONYMOUS = "anonymous"  # the account every caller is billed to in open mode (no keys in the ledger)
KEY_PREFIX = "reaas_"  # makes a leaked key recognisable to secret scanners
OPEN_ACCESS_RECHECK_S = 1.0  # how stale "no key was ever issued" may be (another process may issue one)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    name TEXT PRIMARY KEY,
    key_sha256 TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    revoked_at REAL,
    quota_queries INTEGER,
    quota_period_s INTEGER,
    max_concurrent_calls INTEGER
);
CREATE TABLE IF NOT EXISTS usage (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    key_name TEXT NOT NULL,
    rpc TEXT NOT NULL,
    queries INTEGER NOT NULL,
    request_bytes INTEGER NOT NULL,
    response_bytes INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_by_key_time ON usage (key_name, at);
"""


_INSERT_USAGE = ("INSERT INTO usage (at, key_name, rpc, queries, request_bytes, response_bytes) "
                 "VALUES (?, ?, ?, ?, ?, ?)")


class LedgerError(ValueError):
    """A key operation that cannot be done (duplicate name, unknown key, bad quota)."""


@dataclass(frozen=True)
class ApiKey:
    """One key as the ledger knows it (never the secret)."""

    name: str
    created_at: float
    revoked_at: float | None
    quota_queries: int | None  # queries per quota period; None: unlimited
    quota_period_s: int | None
    max_concurrent_calls: int | None  # None: the server's --max-calls-per-key

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True)
class RpcTotals:
    """What one account was served on one RPC: calls (or streamed messages), queries (images) and bytes."""

    rpc: str
    calls: int
    queries: int
    request_bytes: int
    response_bytes: int


@dataclass(eq=False)
class _Batch:
    """Usage rows committed together (``charge``'s group commit); ``done`` once the commit was tried."""

    rows: list[tuple] = field(default_factory=list)
    done: bool = False
    error: sqlite3.Error | None = None


def default_ledger_path() -> Path:
    """$REAAS_LEDGER, else $XDG_STATE_HOME/reaas/ledger.sqlite3 (~/.local/state/...): outside any checkout, and
    the same file for the server and the reaas-keys admin CLI."""
    if os.environ.get("REAAS_LEDGER"):
        return Path(os.environ["REAAS_LEDGER"])
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return state / "reaas" / "ledger.sqlite3"


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class UsageLedger:
    """The SQLite store; thread-safe (one connection, one lock; every operation is a few microseconds)."""

    def __init__(self, path: Path | str | None = None, *, durable: bool = False) -> None:
        """`path` None keeps the ledger in memory (tests, embedding): it then ends with the process."""
        self.path = Path(path) if path is not None else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(":memory:" if self.path is None else str(self.path),
                                   check_same_thread=False, isolation_level=None, timeout=30)
        self._lock = threading.Lock()
        self._pending_lock = threading.Lock()  # guards _open_batch: the rows waiting for the next commit
        self._open_batch = _Batch()
        self._keys_issued = False
        self._open_access_until = 0.0  # monotonic time until which "no key issued" is trusted without asking
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- keys -----------------------------------------------------------------------------------------------
    def add_key(self, name: str, *, quota_queries: int | None = None, quota_period_s: int | None = None,
                max_concurrent_calls: int | None = None) -> str:
        """Create a key; returns its secret, which is shown this once and stored only as a hash."""
        if not name or name == ANONYMOUS or not name.isprintable():
            raise LedgerError(f"a key needs a printable name other than {ANONYMOUS!r}, got {name!r}")
        if (quota_queries is None) != (quota_period_s is None):
            raise LedgerError("a quota needs both a number of queries and a period")
        for label, value in (("quota queries", quota_queries), ("quota period", quota_period_s),
                             ("max concurrent calls", max_concurrent_calls)):
            if value is not None and value < 1:
                raise LedgerError(f"{label} must be >= 1, got {value}")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        try:
            with self._lock:
                self._db.execute(
                    "INSERT INTO api_keys VALUES (?, ?, ?, NULL, ?, ?, ?)",
                    (name, hash_key(secret), time.time(), quota_queries, quota_period_s, max_concurrent_calls),
                )
        except sqlite3.IntegrityError:
            raise LedgerError(f"a key named {name!r} exists already (revoked keys keep their names)") from None
        self._keys_issued = True
        return secret

    def revoke_key(self, name: str) -> None:
        with self._lock:
            changed = self._db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL", (time.time(), name)
            ).rowcount
        if not changed:
            raise LedgerError(f"no active key named {name!r}")

    def api_keys(self) -> list[ApiKey]:
        with self._lock:
            rows = self._db.execute(
                "SELECT name, created_at, revoked_at, quota_queries, quota_period_s, max_concurrent_calls "
                "FROM api_keys ORDER BY created_at"
            ).fetchall()
        return [ApiKey(*row) for row in rows]

    def authenticate(self, secret: str) -> ApiKey | None:
        """The active key whose secret this is, else None (unknown or revoked)."""
        with self._lock:
            row = self._db.execute(
                "SELECT name, created_at, revoked_at, quota_queries, quota_period_s, max_concurrent_calls "
                "FROM api_keys WHERE key_sha256 = ? AND revoked_at IS NULL", (hash_key(secret),)
            ).fetchone()
        return ApiKey(*row) if row else None

    def has_keys(self) -> bool:
        """False means open access: no key was ever issued, every caller is billed as ``anonymous``. Revoking every
        key does not reopen the server: once a key exists, calls need a valid one (so a True is kept, not asked
        again on every call). A False is asked again at most every ``OPEN_ACCESS_RECHECK_S``: a key issued by
        ``reaas-keys`` while the server runs closes open access within that time, and the many small calls of
        open access do not each pay an SQL query (12 % of the server's busy time under 64 clients,
        benchmarks/results/service_profile.md)."""
        if self._keys_issued:
            return True
        now = time.monotonic()
        if now < self._open_access_until:
            return False
        with self._lock:
            self._keys_issued = self._db.execute("SELECT 1 FROM api_keys LIMIT 1").fetchone() is not None
        self._open_access_until = now + OPEN_ACCESS_RECHECK_S
        return self._keys_issued

    # -- usage ----------------------------------------------------------------------------------------------
    def charge(self, key_name: str, rpc: str, *, queries: int, request_bytes: int, response_bytes: int) -> None:
        """Record one answered call; committed when this returns (raises, and records nothing, if it cannot be).

        Group commit: the rows of calls that charge while another commit runs wait for it, and the first of them
        to get the database then commits all of them in one transaction. Under many small calls that is one
        commit per burst instead of one per call, and still every row is committed before its reply leaves.
        """
        row = (time.time(), key_name, rpc, queries, request_bytes, response_bytes)
        with self._pending_lock:
            batch = self._open_batch
            batch.rows.append(row)
        with self._lock:
            if not batch.done:  # nobody committed it while this call waited: this call commits the whole batch
                with self._pending_lock:
                    self._open_batch = _Batch()
                try:
                    if len(batch.rows) == 1:  # alone: one autocommitted statement is its own transaction
                        self._db.execute(_INSERT_USAGE, batch.rows[0])
                    else:
                        self._db.execute("BEGIN")
                        self._db.executemany(_INSERT_USAGE, batch.rows)
                        self._db.execute("COMMIT")
                except sqlite3.Error as error:
                    if self._db.in_transaction:
                        self._db.rollback()
                    batch.error = error
                batch.done = True
        if batch.error is not None:
            raise batch.error

    def totals(self, key_name: str) -> list[RpcTotals]:
        """Everything `key_name` was served, per RPC, since the ledger began."""
        with self._lock:
            rows = self._db.execute(
                "SELECT rpc, COUNT(*), SUM(queries), SUM(request_bytes), SUM(response_bytes) FROM usage "
                "WHERE key_name = ? GROUP BY rpc ORDER BY rpc", (key_name,)
            ).fetchall()
        return [RpcTotals(*row) for row in rows]

    def queries_since(self, key_name: str, since: float) -> int:
        with self._lock:
            (total,) = self._db.execute(
                "SELECT COALESCE(SUM(queries), 0) FROM usage WHERE key_name = ? AND at >= ?", (key_name, since)
            ).fetchone()
        return int(total)

    def rows(self, since: float | None = None) -> Iterator[tuple]:
        """Usage rows (at, key_name, rpc, queries, request_bytes, response_bytes), oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT at, key_name, rpc, queries, request_bytes, response_bytes FROM usage WHERE at >= ? "
                "ORDER BY id", (since or 0.0,)
            ).fetchall()
        yield from rows

    def export_csv(self, path: Path | str, since: float | None = None) -> int:
        """Write every usage row since `since` (Unix time) as CSV for billing; returns the number of rows."""
        count = 0
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["time_utc", "unix_time", "key_name", "rpc", "queries", "request_bytes",
                             "response_bytes"])
            for at, *rest in self.rows(since):
                writer.writerow([time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + "Z", f"{at:.3f}", *rest])
                count += 1
        return count
