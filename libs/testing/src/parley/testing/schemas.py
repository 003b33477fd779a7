"""Both services' schemas in one database, as the suites that run the whole system need."""

from __future__ import annotations

import asyncio

from parley.chat_service.migrations import MIGRATIONS as CHAT_MIGRATIONS
from parley.user_service.migrations import MIGRATIONS as USER_MIGRATIONS

__all__ = ["migrate_both", "migrate_both_sync"]


async def migrate_both(url: str) -> None:
    """Brings the user and the chat schema of the database at `url` up to date."""
    await USER_MIGRATIONS.apply(url)
    await CHAT_MIGRATIONS.apply(url)


def migrate_both_sync(url: str) -> None:
    """`migrate_both` outside an event loop (e.g. as a DatabaseFactory's `prepare`)."""
    asyncio.run(migrate_both(url))
