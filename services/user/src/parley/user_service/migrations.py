"""The user component's migrations (files in `migrations/`), applied by `parley-user migrate`."""

from __future__ import annotations

from typing import Any

import psycopg

from parley.chassis.migrations import Migration, MigrationSet

__all__ = [
    "COMPONENT",
    "MIGRATIONS",
    "apply_migrations",
    "latest_version",
    "load_migrations",
    "schema_version",
]

COMPONENT = "user"
MIGRATIONS = MigrationSet(COMPONENT, "parley.user_service")


def load_migrations() -> list[Migration]:
    return MIGRATIONS.load()


def latest_version() -> int:
    return MIGRATIONS.latest_version()


async def schema_version(conn: psycopg.AsyncConnection[Any]) -> int:
    return await MIGRATIONS.schema_version(conn)


async def apply_migrations(url: str) -> list[int]:
    return await MIGRATIONS.apply(url)
