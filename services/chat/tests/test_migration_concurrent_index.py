"""Migration 0005 builds the create_time index concurrently (a `-- parley:no-transaction`
migration, libs/chassis migrations.py) against a real Postgres: sends go on while it builds, a
build that fails leaves nothing recorded and is redone whole by the next run, and two
migrators at once still apply it once, without failing the build.

Each test takes a migrated database and undoes 0005 (drops the index, forgets its ledger row).
An open transaction that wrote to chat_messages holds the build at its wait for writers, so
the test can look at everything else while the migration is under way.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from parley.chassis.migrations import NO_TRANSACTION
from parley.chat_service.migrations import MIGRATIONS
from parley.testing.waiting import wait_until

INDEX = "chat_messages_create_time"


async def _connect(url: str) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(url, autocommit=True)


async def _one(url: str, query: str, params: Any = None) -> Any:
    async with await _connect(url) as conn:
        cur = await conn.execute(query, params)
        row = await cur.fetchone()
        return None if row is None else row[0]


async def _undo_0005(url: str) -> None:
    async with await _connect(url) as conn:
        await conn.execute(f"DROP INDEX {INDEX}")
        await conn.execute(
            "DELETE FROM parley_schema_migrations WHERE component = 'chat' AND version = 5"
        )
        await conn.execute("INSERT INTO chat_rooms (name, last_sequence) VALUES ('r', 1000)")


async def _index_valid(url: str) -> bool | None:
    """True: built; False: left INVALID; None: absent."""
    return await _one(
        url, "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)", (INDEX,)
    )


async def _recorded(url: str) -> bool:
    return bool(
        await _one(
            url,
            "SELECT count(*) FROM parley_schema_migrations WHERE component = 'chat'"
            " AND version = 5",
        )
    )


async def _building_pid(url: str) -> int | None:
    """The backend whose index build waits for a lock, when one does."""
    return await _one(
        url,
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        " AND query ILIKE %s AND wait_event_type = 'Lock'",
        (f"%CREATE INDEX%{INDEX}%",),
    )


@contextlib.asynccontextmanager
async def _writer_holding(url: str, sequence: int) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A transaction that has inserted a message into room r and not yet ended."""
    conn = await psycopg.AsyncConnection.connect(url)
    try:
        await conn.execute(
            "INSERT INTO chat_messages (room, sequence, user_id, user_name, text)"
            " VALUES ('r', %s, 1, 'holder', 'open')",
            (sequence,),
        )
        yield conn
    finally:
        await conn.rollback()
        await conn.close()


def test_0005_is_marked_no_transaction_and_builds_concurrently():
    (migration,) = [m for m in MIGRATIONS.load() if m.version == 5]
    assert migration.sql.splitlines()[0] == NO_TRANSACTION
    assert not migration.transactional
    assert migration.concurrent_indexes() == [INDEX]
    assert len(migration.statements()) == 1
    assert all(m.transactional for m in MIGRATIONS.load() if m.version != 5)


async def test_sends_go_on_while_the_index_builds_and_a_failed_build_is_redone(database):
    await _undo_0005(database)
    async with _writer_holding(database, 1):
        migrating = asyncio.create_task(MIGRATIONS.apply(database))
        builder = await wait_until(
            lambda: _building_pid(database), 20, "the index build to wait for the open writer"
        )
        # A send now: an INSERT into chat_messages, from a connection of its own.
        async with await _connect(database) as sender:
            cur = await sender.execute("SELECT pg_backend_pid()")
            row = await cur.fetchone()
            assert row is not None
            sender_pid = row[0]
            sending = asyncio.create_task(
                sender.execute(
                    "INSERT INTO chat_messages (room, sequence, user_id, user_name, text)"
                    " VALUES ('r', 2, 1, 'sender', 'during the build')"
                )
            )

            async def settled() -> str:
                if sending.done():
                    return "stored"
                waiting = await _one(
                    database,
                    "SELECT count(*) FROM pg_locks WHERE pid = %s AND NOT granted",
                    (sender_pid,),
                )
                return "blocked" if waiting else ""

            outcome = await wait_until(settled, 20, "the send to be stored or to wait")
            if outcome == "blocked":
                await _one(database, "SELECT pg_cancel_backend(%s)", (sender_pid,))
                with contextlib.suppress(psycopg.Error):
                    await sending
                await _one(database, "SELECT pg_cancel_backend(%s)", (builder,))
                with contextlib.suppress(psycopg.Error):
                    await migrating
                pytest.fail("the send waited for the migration's index build")
            await sending
        assert not migrating.done()
        # The build fails (here: cancelled) while it waits: its index is left INVALID, and
        # the migration is not recorded.
        await _one(database, "SELECT pg_cancel_backend(%s)", (builder,))
        with pytest.raises(psycopg.errors.QueryCanceled):
            await migrating
        assert await _index_valid(database) is False
        assert not await _recorded(database)
    # The next run drops the INVALID index, builds it again and records the migration.
    assert await MIGRATIONS.apply(database) == [5]
    assert await _index_valid(database) is True
    assert await _recorded(database)
    assert await _one(database, "SELECT count(*) FROM pg_indexes WHERE indexname = %s", (INDEX,))
    assert await MIGRATIONS.apply(database) == []


async def test_two_migrators_at_once_apply_the_build_once(database):
    """The second migrator waits for the first one's lock by trying it again, holding no
    snapshot in between, so the first one's concurrent build never waits for it (a blocking
    wait would be a deadlock that Postgres breaks by failing one of them)."""
    await _undo_0005(database)
    async with _writer_holding(database, 1) as holder:
        first = asyncio.create_task(MIGRATIONS.apply(database))
        builder = await wait_until(lambda: _building_pid(database), 20, "the first build")

        second = asyncio.create_task(MIGRATIONS.apply(database))

        async def second_waits() -> bool:
            return bool(
                await _one(
                    database,
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND pid <> %s AND query ILIKE '%%pg_try_advisory_lock%%'",
                    (builder,),
                )
            )

        await wait_until(second_waits, 20, "the second migrator to wait for the lock")
        assert not first.done() and not second.done()
        await holder.commit()
        results = await asyncio.wait_for(asyncio.gather(first, second), 60)
    assert sorted(results) == [[], [5]]
    assert await _index_valid(database) is True
    assert await _recorded(database)
