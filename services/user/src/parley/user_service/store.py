"""SQL for users; every method maps database failures to domain errors through the pool.

No method keeps a pooled connection while a client reads or sends: pages are read in full
before they are streamed, and imports are stored only once every row has arrived.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg import errors as pg_errors
from psycopg import sql

from parley.chassis import AlreadyExists, Database, NotFound
from parley.proto import user_pb2

from .paging import Page

__all__ = ["UPDATABLE_FIELDS", "NewUser", "UserPage", "UserStore"]

UPDATABLE_FIELDS = ("name", "email", "age")
# A validated user to insert: name, email, age.
NewUser = tuple[str, str, int]

_COLUMN_LIST = "id, name, email, age, create_time, update_time"
_COLUMNS = sql.SQL(_COLUMN_LIST)
# The hot queries as plain strings: nothing to compose per call, and prepared on first use
# (prepare=True) instead of after psycopg's default five executions on each connection.
_GET = "SELECT " + _COLUMN_LIST + " FROM users WHERE id = %s"
_PAGE_AFTER = "SELECT " + _COLUMN_LIST + " FROM users WHERE id > %s ORDER BY id LIMIT %s"
_PAGE_OFFSET = "SELECT " + _COLUMN_LIST + " FROM users ORDER BY id LIMIT %s OFFSET %s"
_INSERT = "INSERT INTO users (name, email, age) VALUES (%s, %s, %s) RETURNING " + _COLUMN_LIST
# One import row: stored, or no row returned when its email is taken (by a stored user or
# by an earlier row of the same import), without aborting the import's transaction.
_INSERT_IF_FREE = (
    "INSERT INTO users (name, email, age) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING RETURNING id"
)


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

    async def list_page(self, page: Page, *, timeout: float | None) -> UserPage:
        """Up to `page.size` users in id order, and whether more follow.

        The rows (at most MAX_PAGE_SIZE + 1) are read in full and the connection goes back
        to the pool before the caller sends any of them, however slowly its client reads.
        """
        if page.after_id is not None:
            query = _PAGE_AFTER
            params: tuple[int, ...] = (page.after_id, page.size + 1)
        else:
            query = _PAGE_OFFSET
            params = (page.size + 1, page.offset)
        async with self._db.connection(timeout) as conn:
            cur = await conn.execute(query, params, prepare=True)
            rows = await cur.fetchall()
        return UserPage(rows[: page.size], more=len(rows) > page.size)

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

    async def insert_new(
        self,
        users: Sequence[NewUser],
        *,
        timeout: float | None,
        before_commit: Callable[[], Awaitable[None]],
        on_commit: Callable[[list[AlreadyExists | None]], None] | None = None,
    ) -> list[AlreadyExists | None]:
        """Inserts `users` in order in one transaction; for each, None when it was stored, or
        the error that refused it: its email was taken, by a stored user or an earlier row.

        All rows go to Postgres in one pipeline (psycopg's executemany), not a round trip
        each. Nothing is stored unless `before_commit` returns: an exception from it, a
        cancellation or a lost connection rolls every row back. `on_commit` is called as soon
        as the commit has returned, before anything else is awaited, so that what it records
        holds even when the call is cancelled while the connection goes back to the pool.
        """
        async with self._db.connection(timeout) as conn:
            async with conn.transaction():
                async with conn.cursor() as cur:
                    await cur.executemany(_INSERT_IF_FREE, users, returning=True)
                    stored = [result.rowcount == 1 async for result in cur.results()]
                await before_commit()
            refusals: list[AlreadyExists | None] = [
                None if ok else _email_taken(email)
                for ok, (_, email, _) in zip(stored, users, strict=True)
            ]
            if on_commit is not None:
                on_commit(refusals)
        return refusals


class UserPage:
    """One page of users read from Postgres; each User is built as the page is iterated."""

    __slots__ = ("_rows", "more")

    def __init__(self, rows: list[tuple[Any, ...]], *, more: bool) -> None:
        self._rows = rows
        self.more = more

    def __iter__(self) -> Iterator[user_pb2.User]:
        return map(_user, self._rows)
