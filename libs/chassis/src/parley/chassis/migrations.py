"""Versioned SQL migrations: applied in order, once, under an advisory lock.

Each service owns a component (`user`, `chat`) whose numbered files `NNNN_name.sql` live
in its package's `migrations/` folder; one ledger table records what was applied.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg

__all__ = ["Migration", "MigrationSet"]

_log = logging.getLogger("parley.migrate")
_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# One lock for every component, so concurrent migrations of a database never interleave.
_ADVISORY_LOCK_KEY = 0x5041524C4559  # "PARLEY"

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

    async def apply(self, url: str) -> list[int]:
        """Applies every pending migration; returns the versions applied (empty when current).

        Safe when several replicas run it at once: the advisory lock serialises them and the
        ledger, read under the lock, makes each migration run exactly once.
        """
        applied: list[int] = []
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
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
