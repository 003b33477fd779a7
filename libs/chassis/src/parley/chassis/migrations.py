"""Versioned SQL migrations: applied in order, once, under an advisory lock.

Each service owns a component (`user`, `chat`) whose numbered files `NNNN_name.sql` live
in its package's `migrations/` folder; one ledger table records what was applied.
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

from parley.chassis.database import redact_url

__all__ = ["Migration", "MigrationSet", "connect_when_ready"]

_log = logging.getLogger("parley.migrate")
_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
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
        ledger, read under the lock, makes each migration run exactly once.
        """
        applied: list[int] = []
        async with await connect_when_ready(url, wait=wait) as conn:
            await conn.execute("SELECT pg_advisory_lock(%s)", (_ADVISORY_LOCK_KEY,))
            try:
                await conn.execute(_LEDGER)
                current = await self.schema_version(conn)
                for migration in self.load():
                    if migration.version <= current:
                        continue
                    async with conn.transaction():
                        await conn.execute(migration.sql.encode())
                        await conn.execute(
                            "INSERT INTO parley_schema_migrations (component, version, name)"
                            " VALUES (%s, %s, %s)",
                            (self.component, migration.version, migration.name),
                        )
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
