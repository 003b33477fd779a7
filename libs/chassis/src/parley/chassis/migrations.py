"""Versioned SQL migrations: applied in order, once, under an advisory lock.

Each service owns a component (`user`, `chat`) whose numbered files `NNNN_name.sql` live
in its package's `migrations/` folder; one ledger table records what was applied.

A migration runs in one transaction with its ledger row, unless its first line is
`-- parley:no-transaction` (for `CREATE INDEX CONCURRENTLY`, which builds an index without
blocking writers and cannot run in a transaction). Such a migration runs one statement at a
time (statements end with `;` at the end of a line; none may hold `;` inside), each committing
by itself, and its ledger row is written only after the last succeeds, so a failed one runs
again, whole, next time: every statement must be safe to repeat (`IF NOT EXISTS`). A failed
concurrent build leaves its index behind INVALID (unused by queries, yet kept up to date by
every write), which `IF NOT EXISTS` would take as done: before running such a migration the
runner drops, concurrently, each index it creates that exists and is INVALID.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg
from psycopg import sql

from parley.chassis.database import redact_url

__all__ = ["Migration", "MigrationSet", "connect_when_ready"]

_log = logging.getLogger("parley.migrate")
_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
NO_TRANSACTION = "-- parley:no-transaction"
# The indexes a no-transaction migration builds concurrently, by name.
_CONCURRENT_INDEX = re.compile(
    r"\bCREATE\s+(?:UNIQUE\s+)?INDEX\s+CONCURRENTLY\s+(?:IF\s+NOT\s+EXISTS\s+)?"
    r"([a-z_][a-z0-9_]*)",
    re.IGNORECASE,
)
# A statement's end in a no-transaction migration: `;` at the end of a line.
_STATEMENT_END = re.compile(r";[ \t]*(?:--[^\n]*)?$", re.MULTILINE)
# How often a migrator waiting for another one tries the lock again (doubling to the last).
_LOCK_POLL_FIRST, _LOCK_POLL_MAX = 0.05, 1.0
# One lock for every component, so concurrent migrations of a database never interleave.
_ADVISORY_LOCK_KEY = 0x5041524C4559  # "PARLEY"

# Failures that waiting cannot fix: the server answered and refused who or what we asked for,
# or libpq refused the settings. Connection errors carry no SQLSTATE, so this goes by libpq's
# (English) text; a server whose lc_messages is another language makes them retried, up to
# PARLEY_MIGRATE_WAIT, before the same one-line failure.
_PERMANENT = (
    "password authentication failed",
    "does not exist",
    "no pg_hba.conf entry",
    "no password supplied",
    "does not support SSL",
)
# Back-off between connection attempts: doubling from the first, capped at the last.
_FIRST_DELAY, _MAX_DELAY = 0.5, 5.0

_LEDGER = """
CREATE TABLE IF NOT EXISTS parley_schema_migrations (
    component  text        NOT NULL,
    version    integer     NOT NULL,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (component, version)
)
"""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def transactional(self) -> bool:
        """False for a migration marked `-- parley:no-transaction` on its first line."""
        first = self.sql.lstrip().split("\n", 1)[0].strip()
        return first != NO_TRANSACTION

    def statements(self) -> list[str]:
        """A no-transaction migration's statements, in order, comments kept."""
        parts: list[str] = []
        start = 0
        for end in _STATEMENT_END.finditer(self.sql):
            parts.append(self.sql[start : end.end()])
            start = end.end()
        parts.append(self.sql[start:])
        return [part for part in parts if _has_sql(part)]

    def concurrent_indexes(self) -> list[str]:
        """The indexes this migration creates concurrently."""
        return [match.group(1) for match in _CONCURRENT_INDEX.finditer(_without_comments(self.sql))]


def _without_comments(text: str) -> str:
    return re.sub(r"--[^\n]*", "", text)


def _has_sql(text: str) -> bool:
    return bool(_without_comments(text).strip(" \t\r\n;"))


class MigrationSet:
    """The migrations of one component, packaged in `<package>/migrations/`."""

    def __init__(self, component: str, package: str) -> None:
        self.component = component
        self._package = package

    def load(self) -> list[Migration]:
        """The migrations in version order; versions must run 1, 2, 3, ... without gaps."""
        folder = resources.files(self._package) / "migrations"
        found: list[Migration] = []
        for entry in folder.iterdir():
            match = _FILE_NAME.match(entry.name)
            if match:
                found.append(Migration(int(match.group(1)), match.group(2), entry.read_text()))
        found.sort(key=lambda m: m.version)
        if [m.version for m in found] != list(range(1, len(found) + 1)):
            raise RuntimeError(f"migration versions must run 1..N without gaps: {found}")
        return found

    def latest_version(self) -> int:
        return len(self.load())

    async def schema_version(self, conn: psycopg.AsyncConnection[Any]) -> int:
        """The highest applied version, or 0 when nothing has been applied."""
        cur = await conn.execute("SELECT to_regclass('parley_schema_migrations') IS NOT NULL")
        row = await cur.fetchone()
        if row is None or not row[0]:
            return 0
        cur = await conn.execute(
            "SELECT coalesce(max(version), 0) FROM parley_schema_migrations WHERE component = %s",
            (self.component,),
        )
        row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def require_current(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Raises, naming the command to run, unless every migration has been applied."""
        version = await self.schema_version(conn)
        expected = self.latest_version()
        if version < expected:
            raise RuntimeError(
                f"{self.component} schema is at version {version}, expected {expected}: "
                f"run `parley-{self.component} migrate`"
            )

    async def apply(self, url: str, *, wait: float = 0.0) -> list[int]:
        """Applies every pending migration; returns the versions applied (empty when current).

        `wait` is how long to keep retrying a database that is not reachable yet
        (see `connect_when_ready`).

        Safe when several replicas run it at once: the advisory lock serialises them and the
        ledger, read under the lock, makes each migration run exactly once. A migrator waits
        for the lock by trying it again and again, never inside a statement: a waiting
        statement would hold a snapshot, which a concurrent index build of the lock's holder
        waits for (a deadlock that Postgres would break by failing the build).
        """
        applied: list[int] = []
        async with await connect_when_ready(url, wait=wait) as conn:
            await _take_lock(conn)
            try:
                await conn.execute(_LEDGER)
                current = await self.schema_version(conn)
                for migration in self.load():
                    if migration.version <= current:
                        continue
                    if migration.transactional:
                        async with conn.transaction():
                            await conn.execute(migration.sql.encode())
                            await self._record(conn, migration)
                    else:
                        await _run_outside_a_transaction(conn, migration)
                        await self._record(conn, migration)
                    _log.info(
                        "applied %s migration %04d_%s",
                        self.component,
                        migration.version,
                        migration.name,
                    )
                    applied.append(migration.version)
            finally:
                await conn.execute("SELECT pg_advisory_unlock(%s)", (_ADVISORY_LOCK_KEY,))
        return applied

    async def _record(self, conn: psycopg.AsyncConnection[Any], migration: Migration) -> None:
        await conn.execute(
            "INSERT INTO parley_schema_migrations (component, version, name) VALUES (%s, %s, %s)",
            (self.component, migration.version, migration.name),
        )


async def _take_lock(conn: psycopg.AsyncConnection[Any]) -> None:
    """Takes the migrations' session lock, trying again while another migrator holds it."""
    pause = _LOCK_POLL_FIRST
    waited = False
    while True:
        cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (_ADVISORY_LOCK_KEY,))
        row = await cur.fetchone()
        if row is not None and row[0]:
            return
        if not waited:
            _log.info("another migrator holds the migrations' lock; waiting for it")
            waited = True
        await asyncio.sleep(pause)
        pause = min(pause * 2, _LOCK_POLL_MAX)


async def _run_outside_a_transaction(
    conn: psycopg.AsyncConnection[Any], migration: Migration
) -> None:
    """Runs a no-transaction migration one statement at a time (the connection is in
    autocommit), first dropping what a failed run of it left: its INVALID indexes."""
    for index in migration.concurrent_indexes():
        cur = await conn.execute(
            "SELECT NOT i.indisvalid FROM pg_index AS i WHERE i.indexrelid = to_regclass(%s)",
            (index,),
        )
        row = await cur.fetchone()
        if row is not None and row[0]:
            _log.warning(
                "index %s was left INVALID by a failed build; dropping it to build it again",
                index,
            )
            await conn.execute(
                sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(index))
            )
    for statement in migration.statements():
        await conn.execute(statement.encode())


async def connect_when_ready(url: str, *, wait: float) -> psycopg.AsyncConnection[Any]:
    """An autocommit connection to `url`, retried with back-off for up to `wait` seconds.

    A database that is still starting, or a host name that does not resolve yet (a container
    started in the same breath), is retried; each failed attempt is one log line. A refusal
    that waiting cannot fix, such as a wrong password or a missing database, and the last
    failure once `wait` is spent, raise psycopg.OperationalError at once.
    """
    deadline = time.monotonic() + wait
    delay, attempt = _FIRST_DELAY, 0
    while True:
        attempt += 1
        remaining = deadline - time.monotonic()
        try:
            # libpq's connect_timeout is whole seconds, at least 2 (a smaller value means 2).
            return await psycopg.AsyncConnection.connect(
                url, autocommit=True, connect_timeout=max(2, min(10, int(remaining)))
            )
        except psycopg.OperationalError as error:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            remaining = deadline - time.monotonic()
            if any(text in reason for text in _PERMANENT):
                raise
            if remaining <= 0:
                if attempt == 1:
                    raise
                raise psycopg.OperationalError(
                    f"{reason} (gave up after {attempt} attempts in {wait:g}s)"
                ) from error
            pause = min(delay, remaining)
            _log.warning(
                "postgres at %s is not reachable yet (attempt %d, retrying in %.1fs, "
                "%.0fs left): %s",
                redact_url(url),
                attempt,
                pause,
                remaining,
                reason,
            )
            await asyncio.sleep(pause)
            delay = min(delay * 2, _MAX_DELAY)
