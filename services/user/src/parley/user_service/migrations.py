"""Versioned SQL migrations: applied in order, once, under an advisory lock."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources

import psycopg

__all__ = [
    "COMPONENT",
    "Migration",
    "apply_migrations",
    "latest_version",
    "load_migrations",
    "schema_version",
]

COMPONENT = "user"

_log = logging.getLogger("parley.migrate")
_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# One lock for every Parley component, so concurrent migrations of a database never interleave.
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


def load_migrations() -> list[Migration]:
    """The packaged migrations, in version order; versions must be 1, 2, 3, ... without gaps."""
    folder = resources.files("parley.user_service") / "migrations"
    found: list[Migration] = []
    for entry in folder.iterdir():
        match = _FILE_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text()))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migration versions must run 1..N without gaps: {found}")
    return found


def latest_version() -> int:
    return len(load_migrations())


async def schema_version(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> int:
    """The highest applied version, or 0 when nothing has been applied."""
    cur = await conn.execute("SELECT to_regclass('parley_schema_migrations') IS NOT NULL")
    row = await cur.fetchone()
    if row is None or not row[0]:
        return 0
    cur = await conn.execute(
        "SELECT coalesce(max(version), 0) FROM parley_schema_migrations WHERE component = %s",
        (COMPONENT,),
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0  # type: ignore[call-overload]


async def apply_migrations(url: str) -> list[int]:
    """Applies every pending migration; returns the versions applied (empty when up to date).

    Safe when several replicas run it at once: the advisory lock serialises them and the
    ledger, read under the lock, makes each migration run exactly once.
    """
    applied: list[int] = []
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("SELECT pg_advisory_lock(%s)", (_ADVISORY_LOCK_KEY,))
        try:
            await conn.execute(_LEDGER)
            current = await schema_version(conn)
            for migration in load_migrations():
                if migration.version <= current:
                    continue
                async with conn.transaction():
                    await conn.execute(migration.sql.encode())
                    await conn.execute(
                        "INSERT INTO parley_schema_migrations (component, version, name)"
                        " VALUES (%s, %s, %s)",
                        (COMPONENT, migration.version, migration.name),
                    )
                _log.info("applied migration %04d_%s", migration.version, migration.name)
                applied.append(migration.version)
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (_ADVISORY_LOCK_KEY,))
    return applied
