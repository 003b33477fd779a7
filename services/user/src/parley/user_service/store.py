"""SQL for users; every method maps database failures to domain errors through the pool."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg import errors as pg_errors
from psycopg import sql

from parley.chassis import AlreadyExists, Database, NotFound
from parley.proto import user_pb2

from .paging import Page

__all__ = ["UPDATABLE_FIELDS", "RowInserter", "UserStore"]

UPDATABLE_FIELDS = ("name", "email", "age")
# Inserts one user inside an import; raises AlreadyExists when the email is taken.
RowInserter = Callable[[str, str, int], Awaitable[None]]

# Rows are fetched from Postgres in chunks of this many, so memory stays bounded on any page.
_STREAM_CHUNK = 100

_COLUMN_LIST = "id, name, email, age, create_time, update_time"
_COLUMNS = sql.SQL(_COLUMN_LIST)
# The hot queries as plain strings: nothing to compose per call, and prepared on first use
# (prepare=True) instead of after psycopg's default five executions on each connection.
_GET = "SELECT " + _COLUMN_LIST + " FROM users WHERE id = %s"
_PAGE_AFTER = "SELECT " + _COLUMN_LIST + " FROM users WHERE id > %s ORDER BY id LIMIT %s"
_PAGE_OFFSET = "SELECT " + _COLUMN_LIST + " FROM users ORDER BY id LIMIT %s OFFSET %s"
_INSERT = "INSERT INTO users (name, email, age) VALUES (%s, %s, %s) RETURNING " + _COLUMN_LIST


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _user(row: tuple[Any, ...]) -> user_pb2.User:
    user = user_pb2.User(id=row[0], name=row[1], email=row[2], age=row[3])
    # What Timestamp.FromDatetime computes, in half the time (this runs once per user listed).
    created: timedelta = row[4] - _EPOCH
    updated: timedelta = row[5] - _EPOCH
    user.create_time.seconds = created.days * 86400 + created.seconds
    user.create_time.nanos = created.microseconds * 1000
    user.update_time.seconds = updated.days * 86400 + updated.seconds
    user.update_time.nanos = updated.microseconds * 1000
    return user


def _email_taken(email: str) -> AlreadyExists:
    return AlreadyExists(
        f"a user with email {email!r} already exists",
        reason="EMAIL_TAKEN",
        metadata={"field": "email"},
    )


class UserStore:
    """Reads and writes the `users` table."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def get(self, user_id: int, *, timeout: float | None) -> user_pb2.User:
        async with self._db.connection(timeout) as conn:
            cur = await conn.execute(_GET, (user_id,), prepare=True)
            row = await cur.fetchone()
        if row is None:
            raise NotFound(f"user {user_id} not found", reason="USER_NOT_FOUND")
        return _user(row)

    async def stream(
        self, page: Page, *, timeout: float | None
    ) -> AsyncGenerator[user_pb2.User, None]:
        """Yields up to `page.size + 1` users in id order; an extra one means more pages follow.

        Rows come from the server one at a time (single-row mode), never collected in memory.
        """
        if page.after_id is not None:
            query = _PAGE_AFTER
            params: tuple[int, ...] = (page.after_id, page.size + 1)
        else:
            query = _PAGE_OFFSET
            params = (page.size + 1, page.offset)
        async with self._db.connection(timeout) as conn, conn.cursor() as cur:
            async for row in cur.stream(query, params, size=_STREAM_CHUNK):
                yield _user(row)

    async def create(
        self, name: str, email: str, age: int, *, timeout: float | None
    ) -> user_pb2.User:
        async with self._db.connection(timeout) as conn:
            try:
                cur = await conn.execute(_INSERT, (name, email, age), prepare=True)
            except pg_errors.UniqueViolation:
                raise _email_taken(email) from None
            row = await cur.fetchone()
        assert row is not None
        return _user(row)

    async def update(
        self, user_id: int, changes: Mapping[str, object], *, timeout: float | None
    ) -> user_pb2.User:
        assignments = sql.SQL(", ").join(
            sql.SQL("{} = %s").format(sql.Identifier(field)) for field in changes
        )
        query = sql.SQL(
            "UPDATE users SET {}, update_time = now() WHERE id = %s RETURNING {}"
        ).format(assignments, _COLUMNS)
        async with self._db.connection(timeout) as conn:
            try:
                cur = await conn.execute(query, (*changes.values(), user_id))
            except pg_errors.UniqueViolation:
                raise _email_taken(str(changes.get("email", ""))) from None
            row = await cur.fetchone()
        if row is None:
            raise NotFound(f"user {user_id} not found", reason="USER_NOT_FOUND")
        return _user(row)

    async def delete(self, user_id: int, *, timeout: float | None) -> None:
        async with self._db.connection(timeout) as conn:
            cur = await conn.execute("DELETE FROM users WHERE id = %s RETURNING id", (user_id,))
            row = await cur.fetchone()
        if row is None:
            raise NotFound(f"user {user_id} not found", reason="USER_NOT_FOUND")

    @asynccontextmanager
    async def importing(self, *, timeout: float | None) -> AsyncIterator[RowInserter]:
        """One transaction for a whole import, with a savepoint per row so bad rows are skipped.

        Leaving the block normally commits; leaving it by an exception (cancellation,
        deadline, lost connection) rolls every row back.
        """
        async with self._db.connection(timeout) as conn, conn.transaction():

            async def insert(name: str, email: str, age: int) -> None:
                try:
                    async with conn.transaction():
                        await conn.execute(
                            "INSERT INTO users (name, email, age) VALUES (%s, %s, %s)",
                            (name, email, age),
                        )
                except pg_errors.UniqueViolation:
                    raise _email_taken(email) from None

            yield insert
