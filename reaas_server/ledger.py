"""The ledger: API keys, the bill and the quota counts, in one SQL database every replica shares.

* **Keys are stored hashed** (SHA-256 of the secret). The secrets are 256-bit random tokens made by
  ``add_key``, so a fast hash is enough (slow password hashes exist for low-entropy passwords); the ledger can
  be read without revealing a usable key. A key has a name (what logs, usage reports and exports show), an
  optional quota (queries per period) and an optional limit on concurrent calls.
* **Every answered call is one row, committed before its reply is sent** (``charge``); a call that is refused,
  fails or is abandoned leaves no row.
* **Quotas live in the database, not in a replica's memory.** A call holds its queries with one transaction
  before it runs (``reserve_quota``: the key's count for the period is locked, the live holds summed, a hold row
  added if it all fits) and its charge turns the hold into usage in the transaction that writes the usage row.
  Replicas sharing the ledger therefore never overshoot a quota between them. A hold a replica could not
  settle (it was killed) expires after ``QUOTA_HOLD_TTL_S``; a charge whose hold expired is checked against the
  quota again and refused rather than overshoot.

Two stores: SQLite (``UsageLedger``, the default: one file, WAL, readers beside the writing server) and
PostgreSQL (``ledger_postgres.PostgresLedger``, for replicas on several machines). ``open_ledger`` picks one
from what ``--ledger`` names. The SQL lives here once; a store says how to run it.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import math
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

MEMORY_LEDGER = ":memory:"  # what the CLIs accept for "no file"
POSTGRES_SCHEMES = ("postgresql://", "postgres://")
ANONYMOUS = "anonymous"  # the account every caller is billed to in open mode (no keys in the ledger)
KEY_PREFIX = "reaas_"  # makes a leaked key recognisable to secret scanners
OPEN_ACCESS_RECHECK_S = 1.0  # how stale "no key was ever issued" may be (another process may issue one)
QUOTA_HOLD_TTL_S = 600.0  # a hold no replica settles (it died) stops counting after this long
SCHEMA_VERSION = 2  # 1: keys and usage; 2: + quota counts and holds (PRAGMA user_version of a SQLite ledger)
BUSY_TIMEOUT_S = 2.0  # how long an operation waits for a database another process has locked, then UNAVAILABLE

_SQLITE_SCHEMA = """
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
CREATE TABLE IF NOT EXISTS quota_usage (
    key_name TEXT NOT NULL,
    period_start REAL NOT NULL,
    used INTEGER NOT NULL,
    PRIMARY KEY (key_name, period_start)
);
CREATE TABLE IF NOT EXISTS quota_holds (
    id INTEGER PRIMARY KEY,
    key_name TEXT NOT NULL,
    queries INTEGER NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS quota_holds_by_key ON quota_holds (key_name);
"""

_KEY_COLUMNS = "name, created_at, revoked_at, quota_queries, quota_period_s, max_concurrent_calls"
USAGE_COLUMNS = "at, key_name, rpc, queries, request_bytes, response_bytes"  # a usage row, in this order
_INSERT_USAGE = f"INSERT INTO usage ({USAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)"
# The period's count, made on first use from the usage rows already in it (rows written before the key had a
# count, or by an older server), then kept up to date by each charge in the charge's own transaction.
_ENSURE_COUNT = ("INSERT INTO quota_usage (key_name, period_start, used) "
                 "SELECT ?, ?, COALESCE(SUM(queries), 0) FROM usage WHERE key_name = ? AND at >= ? AND at < ? "
                 "ON CONFLICT (key_name, period_start) DO NOTHING")
_ADD_TO_COUNT = "UPDATE quota_usage SET used = used + ? WHERE key_name = ? AND period_start = ?"
_LIVE_HOLDS = "SELECT COALESCE(SUM(queries), 0) FROM quota_holds WHERE key_name = ? AND expires_at > ?"


class LedgerError(ValueError):
    """A key operation that cannot be done (duplicate name, unknown key, bad quota)."""


class LedgerOpenError(RuntimeError):
    """The ledger cannot be used at all (unwritable, corrupt, locked, a newer schema): the server does not start.
    The message names the ledger and the fix."""


class LedgerUnavailable(ConnectionError):
    """The ledger's database cannot be reached or is locked now: the call is not answered (UNAVAILABLE, so a
    client retries on another replica) and nothing is billed."""


class QuotaExceeded(Exception):
    """A request the key's quota cannot take now (``retry_after_ms``: until the period resets) or ever (None)."""

    def __init__(self, message: str, retry_after_ms: int | None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_ms = retry_after_ms


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
class QuotaHold:
    """Queries a call holds of its key's quota while it runs (a row in ``quota_holds``)."""

    id: int
    key: ApiKey
    queries: int


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
    error: Exception | None = None


def period_start(period_s: int, now: float) -> float:
    """Periods are aligned to the Unix epoch: a daily quota resets at 00:00 UTC on every replica."""
    return math.floor(now / period_s) * period_s


def describe_period(seconds: int) -> str:
    names = {60: "minute", 3600: "hour", 86400: "day", 7 * 86400: "week"}
    return names.get(seconds, f"{seconds} s")


def default_ledger_path() -> Path | str:
    """$REAAS_LEDGER, else $XDG_STATE_HOME/reaas/ledger.sqlite3 (~/.local/state/...): outside any checkout, and
    the same file for the server and the reaas-keys admin CLI. A postgresql:// URL in $REAAS_LEDGER comes back
    as it is (a Path would fold its "//"): containers pass the DSN there, out of their command lines."""
    if os.environ.get("REAAS_LEDGER"):
        spec = os.environ["REAAS_LEDGER"]
        return spec if is_postgres(spec) else Path(spec)
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return state / "reaas" / "ledger.sqlite3"


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


Run = Callable[..., object]  # run(sql, params=()) -> a cursor, inside a store's transaction


class SqlLedger:
    """Every ledger operation, in SQL both stores speak (``?`` placeholders; a store may rewrite them).

    A store provides ``_transaction()`` (a context manager yielding ``run``: all statements commit together or
    none does), ``_lock_row_suffix`` (what makes a SELECT lock the rows it reads against other writers) and
    ``_insert_usage_rows`` (one transaction of usage rows: concurrent charges are grouped into one)."""

    _lock_row_suffix = ""
    _integrity_errors: tuple[type[Exception], ...] = (sqlite3.IntegrityError,)

    def __init__(self) -> None:
        self._keys_issued = False
        self._open_access_until = 0.0  # monotonic time until which "no key issued" is trusted without asking
        self._commit_lock = threading.Lock()  # one group commit of usage rows at a time
        self._pending_lock = threading.Lock()  # guards _open_batch: the rows waiting for the next commit
        self._open_batch = _Batch()
        self._deferring = threading.local()  # .rows: this thread's rows inside deferred_commits(), else absent

    # -- the store ------------------------------------------------------------------------------------------
    def _transaction(self) -> contextlib.AbstractContextManager[Run]:
        raise NotImplementedError

    def _insert_usage_rows(self, rows: list[tuple]) -> None:
        """Commit `rows` in one transaction (raise, committing none, if that cannot be done)."""
        raise NotImplementedError

    def _commit_usage(self, rows: list[tuple]) -> None:
        """Group commit: the rows of calls that charge while another commit runs wait for it, and the first of
        them to get the database then commits all of them in one transaction. Under many concurrent calls that is
        one commit per burst instead of one per call, and still every row is committed before its reply leaves."""
        with self._pending_lock:
            batch = self._open_batch
            batch.rows.extend(rows)
        with self._commit_lock:
            if not batch.done:  # nobody committed it while this call waited: this call commits the whole batch
                with self._pending_lock:
                    self._open_batch = _Batch()
                try:
                    self._insert_usage_rows(batch.rows)
                except Exception as error:  # noqa: BLE001 - every call in the batch learns it, not only this one
                    batch.error = error
                batch.done = True
        if batch.error is not None:
            raise batch.error

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._transaction() as run:
            return run(sql, params).fetchall()

    def close(self) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        """Where the ledger is, for messages and logs (never a password)."""
        raise NotImplementedError

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
            with self._transaction() as run:
                run(f"INSERT INTO api_keys ({_KEY_COLUMNS}, key_sha256) VALUES (?, ?, NULL, ?, ?, ?, ?)",
                    (name, time.time(), quota_queries, quota_period_s, max_concurrent_calls, hash_key(secret)))
        except self._integrity_errors:
            raise LedgerError(f"a key named {name!r} exists already (revoked keys keep their names)") from None
        self._keys_issued = True
        return secret

    def revoke_key(self, name: str) -> None:
        with self._transaction() as run:
            changed = run("UPDATE api_keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                          (time.time(), name)).rowcount
        if not changed:
            raise LedgerError(f"no active key named {name!r}")

    def api_keys(self) -> list[ApiKey]:
        return [ApiKey(*row) for row in self._query(f"SELECT {_KEY_COLUMNS} FROM api_keys ORDER BY created_at")]

    def authenticate(self, secret: str) -> ApiKey | None:
        """The active key whose secret this is, else None (unknown or revoked). Asked on every call, so a
        revocation by any replica or by ``reaas-keys`` holds from the next call on."""
        rows = self._query(f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_sha256 = ? AND revoked_at IS NULL",
                           (hash_key(secret),))
        return ApiKey(*rows[0]) if rows else None

    def has_keys(self) -> bool:
        """False means open access: no key was ever issued, every caller is billed as ``anonymous``. Revoking every
        key does not reopen the server: once a key exists, calls need a valid one (so a True is kept, not asked
        again on every call). A False is asked again at most every ``OPEN_ACCESS_RECHECK_S``: a key issued by
        ``reaas-keys`` while the server runs closes open access within that time, and the many small calls of
        open access do not each pay an SQL query (12 % of the server's busy time under 64 clients,
        benchmarks/results/service_profile.md)."""
        known = self.has_keys_known()
        if known is not None:
            return known
        now = time.monotonic()
        self._keys_issued = bool(self._query("SELECT 1 FROM api_keys LIMIT 1"))
        self._open_access_until = now + OPEN_ACCESS_RECHECK_S
        return self._keys_issued

    def has_keys_known(self) -> bool | None:
        """``has_keys()`` when it needs no database query (the common case), else None: the serving loop asks this
        and sends only a due re-check to a thread."""
        if self._keys_issued:
            return True
        return False if time.monotonic() < self._open_access_until else None

    # -- quotas ---------------------------------------------------------------------------------------------
    def _locked_count(self, run: Run, key: ApiKey, now: float) -> tuple[float, int, int]:
        """(period start, used, held by live holds) of `key` now, its period's count locked until commit."""
        start = period_start(key.quota_period_s, now)
        run(_ENSURE_COUNT, (key.name, start, key.name, start, start + key.quota_period_s))
        (used,) = run("SELECT used FROM quota_usage WHERE key_name = ? AND period_start = ?"
                      + self._lock_row_suffix, (key.name, start)).fetchone()
        (held,) = run(_LIVE_HOLDS, (key.name, now)).fetchone()
        return start, int(used), int(held)

    def reserve_quota(self, key: ApiKey, queries: int) -> QuotaHold:
        """Hold `queries` of `key`'s quota (which it must have) or raise QuotaExceeded; one transaction."""
        if queries > key.quota_queries:
            raise QuotaExceeded(
                f"this request needs {queries} queries but key {key.name!r} has a quota of {key.quota_queries} per "
                f"{describe_period(key.quota_period_s)}: it can never fit; send at most {key.quota_queries} "
                "inputs per request", retry_after_ms=None)
        now = time.time()
        with self._transaction() as run:
            start, used, held = self._locked_count(run, key, now)
            if used + held + queries > key.quota_queries:
                resets_at = start + key.quota_period_s
                raise QuotaExceeded(
                    f"quota exceeded for key {key.name!r}: {key.quota_queries} queries per "
                    f"{describe_period(key.quota_period_s)}, {used} used, {held} in flight, this request needs "
                    f"{queries}; it resets at {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(resets_at))} UTC "
                    f"(in {resets_at - now:.0f} s)",
                    retry_after_ms=max(1, round(1000 * (resets_at - now))),
                )
            run("DELETE FROM quota_holds WHERE key_name = ? AND expires_at <= ?", (key.name, now))
            (hold_id,) = run("INSERT INTO quota_holds (key_name, queries, expires_at) VALUES (?, ?, ?) RETURNING id",
                             (key.name, queries, now + QUOTA_HOLD_TTL_S)).fetchone()
        return QuotaHold(int(hold_id), key, queries)

    def release_quota(self, hold: QuotaHold) -> None:
        """Give back a hold whose call ended unanswered."""
        with self._transaction() as run:
            run("DELETE FROM quota_holds WHERE id = ?", (hold.id,))

    def quota_used(self, key: ApiKey, now: float) -> tuple[float, int]:
        """(period start, answered queries in it) of a key with a quota."""
        start = period_start(key.quota_period_s, now)
        ((used,),) = self._query("SELECT COALESCE(SUM(queries), 0) FROM usage WHERE key_name = ? AND at >= ? "
                                 "AND at < ?", (key.name, start, start + key.quota_period_s))
        return start, int(used)

    # -- usage ----------------------------------------------------------------------------------------------
    def charge(self, key_name: str, rpc: str, *, queries: int, request_bytes: int, response_bytes: int,
               hold: QuotaHold | None = None) -> None:
        """Record one answered call; committed when this returns (raises, and records nothing, if it cannot be).

        With a quota hold, the hold becomes usage in the same transaction as the row; a hold that expired while
        the call ran is checked against the quota again, and QuotaExceeded is raised rather than overshoot.
        """
        row = (time.time(), key_name, rpc, queries, request_bytes, response_bytes)
        if hold is None:
            deferred = getattr(self._deferring, "rows", None)
            if deferred is not None:
                deferred.append(row)
            else:
                self._commit_usage([row])
            return
        with self._transaction() as run:
            # the count first, the hold second: the order reserve_quota takes its locks in (no deadlock)
            start, used, held = self._locked_count(run, hold.key, row[0])
            live = run("DELETE FROM quota_holds WHERE id = ? AND expires_at > ? RETURNING id",
                       (hold.id, row[0])).fetchone()
            if live is None and used + held + queries > hold.key.quota_queries:
                raise QuotaExceeded(
                    f"quota exceeded for key {hold.key.name!r}: the call outlived its quota hold "
                    f"({QUOTA_HOLD_TTL_S:.0f} s) and the quota was used meanwhile; nothing was billed",
                    retry_after_ms=max(1, round(1000 * (start + hold.key.quota_period_s - row[0]))))
            run(_INSERT_USAGE, row)
            run(_ADD_TO_COUNT, (queries, key_name, start))

    @contextlib.contextmanager
    def deferred_commits(self) -> Iterator[None]:
        """Inside: this thread's ``charge`` calls without a quota hold only collect their rows; they are committed
        together, in one transaction, when the block ends (which raises, and commits none, if that cannot be done).
        The batcher's worker charges every call of a forward pass so: one commit per pass, before any reply of the
        pass leaves. Charges with a hold commit at once, as ever (their quota check is their own transaction)."""
        if getattr(self._deferring, "rows", None) is not None:  # nested: the outer block commits
            yield
            return
        self._deferring.rows = rows = []
        try:
            yield
        finally:
            del self._deferring.rows
        if rows:
            self._commit_usage(rows)

    def totals(self, key_name: str) -> list[RpcTotals]:
        """Everything `key_name` was served, per RPC, since the ledger began."""
        rows = self._query("SELECT rpc, COUNT(*), SUM(queries), SUM(request_bytes), SUM(response_bytes) FROM usage "
                           "WHERE key_name = ? GROUP BY rpc ORDER BY rpc", (key_name,))
        return [RpcTotals(rpc, *(int(v) for v in values)) for rpc, *values in rows]

    def rows(self, since: float | None = None) -> Iterator[tuple]:
        """Usage rows (at, key_name, rpc, queries, request_bytes, response_bytes), oldest first."""
        yield from self._query(f"SELECT {USAGE_COLUMNS} FROM usage "
                               "WHERE at >= ? ORDER BY id", (since or 0.0,))

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


class UsageLedger(SqlLedger):
    """The SQLite store, one file; thread-safe (one connection, one lock; every operation is a few microseconds).

    WAL mode with ``synchronous=NORMAL``: a commit is in the operating system's hands when it returns, so a
    SIGKILL or a restart of the server loses nothing that was answered (a power cut may lose the last commits;
    ``durable=True`` syncs every commit to disk at a measured cost). Readers (GetUsage, ``reaas-keys``, the CSV
    export) run beside the writing server: WAL lets them. Replicas on one machine may share the file (a write
    transaction locks the whole file); replicas on several machines need PostgreSQL.
    """

    def __init__(self, path: Path | str | None = None, *, durable: bool = False) -> None:
        """`path` None keeps the ledger in memory (tests, embedding): it then ends with the process.

        Everything a call would need is checked here, before any encoder loads: the file can be created (0600: it
        names every client and what they used), opened, written and locked, and its schema is one this version
        knows. Otherwise LedgerOpenError, one line naming the file and the fix."""
        super().__init__()
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        try:
            if self.path is not None:
                self._create_private(self.path)
            self._db = sqlite3.connect(":memory:" if self.path is None else str(self.path),
                                       check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT_S)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            (version,) = self._db.execute("PRAGMA user_version").fetchone()
            if version > SCHEMA_VERSION:
                raise LedgerOpenError(f"ledger {self.describe()} has schema version {version}, newer than this "
                                      f"reaas-server's {SCHEMA_VERSION}: run the newer reaas-server, or give "
                                      "--ledger another file")
            self._db.execute("BEGIN IMMEDIATE")  # the write lock: proves the file is writable and not held
            self._db.executescript(_SQLITE_SCHEMA + f"PRAGMA user_version = {SCHEMA_VERSION};")
        except sqlite3.Error as error:
            raise LedgerOpenError(self._open_advice(error)) from error

    def _create_private(self, path: Path) -> None:
        if path.is_dir():
            raise LedgerOpenError(f"ledger {path} is a folder; give --ledger a file, e.g. {path / 'ledger.sqlite3'}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))  # SQLite gives its -wal and -shm the same mode
        except OSError as error:
            raise LedgerOpenError(f"cannot create or write the ledger {path}: {error.strerror}; make it (and its "
                                  "folder) writable by this user, or give --ledger (or $REAAS_LEDGER) another file"
                                  ) from None

    def _open_advice(self, error: sqlite3.Error) -> str:
        text = str(error)
        where = f"ledger {self.describe()}"
        if "locked" in text or "busy" in text:
            return (f"{where} is locked by another process (held for more than {BUSY_TIMEOUT_S:g} s); stop "
                    "whatever holds a write transaction on it, then start again")
        if "readonly" in text or "read-only" in text:
            return f"{where} is read-only for this user; make it (and its folder) writable, or give --ledger another"
        if "not a database" in text or "malformed" in text or "corrupt" in text:
            return (f"{where} is not a usable SQLite database ({text}); restore it from a backup, or give --ledger "
                    "a new file")
        return f"cannot open {where}: {text}"

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def describe(self) -> str:
        return str(self.path) if self.path is not None else MEMORY_LEDGER

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """The one connection, within BUSY_TIMEOUT_S whatever holds it: this process's other threads (the lock)
        or another process's write transaction (SQLite's busy timeout); else LedgerUnavailable (the call is
        answered UNAVAILABLE and billed nothing, rather than wait out its deadline and end UNKNOWN)."""
        if not self._lock.acquire(timeout=BUSY_TIMEOUT_S):
            raise LedgerUnavailable(f"ledger {self.describe()} is busy: no turn within {BUSY_TIMEOUT_S:g} s")
        try:
            yield self._db
        except sqlite3.ProgrammingError as error:  # closed: the server is stopping under a handler that outlived it
            raise LedgerUnavailable(f"ledger {self.describe()} is closed: the server is stopping") from error
        except sqlite3.OperationalError as error:
            if self._db.in_transaction:
                self._db.rollback()
            if "locked" in str(error) or "busy" in str(error):
                raise LedgerUnavailable(f"ledger {self.describe()} is locked by another process: {error}") from error
            raise
        finally:
            self._lock.release()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Run]:
        """BEGIN IMMEDIATE: the file's write lock from the first statement, so a transaction that reads a quota
        count and then writes a hold is atomic against every other process on the file too."""
        with self._connection() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db.execute
            except BaseException:
                if db.in_transaction:
                    db.rollback()
                raise
            db.execute("COMMIT")

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._connection() as db:  # a read needs no write lock: WAL readers see the last commit
            return db.execute(sql, params).fetchall()

    def _insert_usage_rows(self, rows: list[tuple]) -> None:
        with self._connection() as db:
            try:
                if len(rows) == 1:  # alone: one autocommitted statement is its own transaction
                    db.execute(_INSERT_USAGE, rows[0])
                else:
                    db.execute("BEGIN")
                    db.executemany(_INSERT_USAGE, rows)
                    db.execute("COMMIT")
            except sqlite3.Error:
                if db.in_transaction:
                    db.rollback()
                raise


def open_ledger(spec: str | Path | None, *, durable: bool = False) -> SqlLedger:
    """The ledger ``--ledger`` names: a ``postgresql://`` URL (PostgreSQL, shared by replicas on any machine),
    ``:memory:`` or None (SQLite in memory), else a SQLite file."""
    if isinstance(spec, str) and spec.startswith(POSTGRES_SCHEMES):
        from reaas_server.ledger_postgres import PostgresLedger  # psycopg is only needed by who uses it

        return PostgresLedger(spec)
    return UsageLedger(None if spec in (None, MEMORY_LEDGER) else spec, durable=durable)


def is_postgres(spec: str | Path | None) -> bool:
    return isinstance(spec, str) and spec.startswith(POSTGRES_SCHEMES)
