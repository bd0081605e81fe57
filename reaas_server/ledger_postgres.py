"""The ledger in PostgreSQL: one bill and one quota count for replicas on any number of machines.

``--ledger postgresql://USER:PASSWORD@HOST:5432/DB`` (any libpq connection URL). The server creates the tables
on start if they are missing (``reaas-keys`` too), so a new database needs no migration step. Each operation
takes a connection from a small pool (psycopg_pool): a replica's io and batcher threads commit side by side, and the
database serialises only what must be (a key's quota count, with ``SELECT … FOR UPDATE``).

When the database cannot be reached, an operation raises ``LedgerUnavailable`` after at most
``CONNECT_TIMEOUT_S``; the server answers that call UNAVAILABLE (clients retry on another replica) and bills
nothing, since nothing was answered. There is no local spool: fail closed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import psycopg
import psycopg.conninfo
import psycopg_pool

from reaas_server.ledger import USAGE_COLUMNS, LedgerUnavailable, Run, SqlLedger

CONNECT_TIMEOUT_S = 5.0
POOL_SIZE = 8

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    name TEXT PRIMARY KEY,
    key_sha256 TEXT NOT NULL UNIQUE,
    created_at DOUBLE PRECISION NOT NULL,
    revoked_at DOUBLE PRECISION,
    quota_queries BIGINT,
    quota_period_s BIGINT,
    max_concurrent_calls BIGINT
);
CREATE TABLE IF NOT EXISTS usage (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at DOUBLE PRECISION NOT NULL,
    key_name TEXT NOT NULL,
    rpc TEXT NOT NULL,
    queries BIGINT NOT NULL,
    request_bytes BIGINT NOT NULL,
    response_bytes BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_by_key_time ON usage (key_name, at);
CREATE TABLE IF NOT EXISTS quota_usage (
    key_name TEXT NOT NULL,
    period_start DOUBLE PRECISION NOT NULL,
    used BIGINT NOT NULL,
    PRIMARY KEY (key_name, period_start)
);
CREATE TABLE IF NOT EXISTS quota_holds (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key_name TEXT NOT NULL,
    queries BIGINT NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS quota_holds_by_key ON quota_holds (key_name);
"""


_INSERT_USAGE_ROWS = f"INSERT INTO usage ({USAGE_COLUMNS}) VALUES "


def _postgres_sql(sql: str) -> str:
    return sql.replace("?", "%s")  # the shared SQL has no literal question marks


class PostgresLedger(SqlLedger):
    """The PostgreSQL store (psycopg 3 and its connection pool); thread-safe."""

    _lock_row_suffix = " FOR UPDATE"
    _integrity_errors = (psycopg.errors.UniqueViolation,)

    def __init__(self, url: str, *, pool_size: int = POOL_SIZE) -> None:
        super().__init__()
        self.url = url
        # Autocommit connections: a read or a usage row is one statement, one round trip (an explicit BEGIN and
        # COMMIT around it, and a liveness check at checkout, made four; measured 0.55 ms a charge). Several
        # statements still commit together in _transaction. A connection the database dropped (a restart) fails
        # the one call that meets it (UNAVAILABLE: the client retries) and the pool replaces it.
        self._pool = psycopg_pool.ConnectionPool(
            url, min_size=1, max_size=pool_size, timeout=CONNECT_TIMEOUT_S, open=False,
            kwargs={"connect_timeout": max(1, int(CONNECT_TIMEOUT_S)), "application_name": "reaas-server",
                    "autocommit": True},
        )
        try:
            self._pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
        except psycopg_pool.PoolTimeout:
            self._pool.close()
            raise LedgerUnavailable(f"cannot connect to the PostgreSQL ledger at {self.describe()} within "
                                    f"{CONNECT_TIMEOUT_S:.0f} s; is it running, and are the URL's host, "
                                    "user and password right?") from None
        # two replicas starting at once would race on CREATE TABLE IF NOT EXISTS: an advisory lock orders them
        with self._pool.connection() as connection, connection.transaction():
            connection.execute("SELECT pg_advisory_xact_lock(4242000001)")
            connection.execute(_SCHEMA)

    def describe(self) -> str:
        """The URL without its password (for messages and logs)."""
        info = psycopg.conninfo.conninfo_to_dict(self.url)
        info.pop("password", None)
        return psycopg.conninfo.make_conninfo(**info)

    @contextlib.contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        try:
            with self._pool.connection() as connection:
                yield connection
        except (psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout) as error:
            raise LedgerUnavailable(f"the PostgreSQL ledger at {self.describe()} is unavailable: "
                                    f"{str(error).strip() or type(error).__name__}") from error

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Run]:
        with self._connection() as connection, connection.transaction():
            yield lambda sql, params=(): connection.execute(_postgres_sql(sql), params)

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._connection() as connection:
            return connection.execute(_postgres_sql(sql), params).fetchall()

    def _insert_usage_rows(self, rows: list[tuple]) -> None:
        """One multi-row INSERT: one round trip and one commit for the whole group."""
        values = ", ".join(["(%s, %s, %s, %s, %s, %s)"] * len(rows))
        with self._connection() as connection:
            connection.execute(_INSERT_USAGE_ROWS + values, [value for row in rows for value in row])

    def close(self) -> None:
        self._pool.close()
