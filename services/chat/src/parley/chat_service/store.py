"""Chat messages in Postgres: the durable log every delivery and every resume reads from."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from psycopg import errors as pg_errors
from psycopg import sql

from parley.chassis import Database
from parley.proto import chat_pb2

__all__ = ["MessageStore"]

_COLUMNS = sql.SQL("room, sequence, user_id, user_name, text, client_message_id, create_time")

# The stored message and whether this call stored it. Every send spends from the sender's
# budget (see the chat_send_budgets migration), a resend too: each costs a statement, and a
# client resending one id in a loop would otherwise load Postgres without bound. Only when
# the budget allows, a resent client id returns the earlier row (false), or the room's
# counter is bumped and the message inserted (true). No row at all: the budget refused it.
_APPEND = sql.SQL(
    """
WITH existing AS (
    SELECT {columns} FROM chat_messages
    WHERE %(client_id)s <> '' AND room = %(room)s AND user_id = %(user_id)s
      AND client_message_id = %(client_id)s
), budget AS (
    INSERT INTO chat_send_budgets AS b (user_id, full_again)
    VALUES (%(user_id)s, now() + %(interval)s)
    ON CONFLICT (user_id) DO UPDATE
        SET full_again = greatest(b.full_again, now()) + %(interval)s
        WHERE b.full_again <= now() + %(tolerance)s
    RETURNING full_again
), next AS (
    INSERT INTO chat_rooms AS r (name, last_sequence)
    SELECT %(room)s, 1 WHERE EXISTS (SELECT FROM budget) AND NOT EXISTS (SELECT FROM existing)
    ON CONFLICT (name) DO UPDATE SET last_sequence = r.last_sequence + 1
    RETURNING last_sequence
), added AS (
    INSERT INTO chat_messages (room, sequence, user_id, user_name, text, client_message_id)
    SELECT %(room)s, last_sequence, %(user_id)s, %(name)s, %(text)s, %(client_id)s FROM next
    RETURNING {columns}
)
SELECT {columns}, true FROM added
UNION ALL
SELECT {columns}, false FROM existing WHERE EXISTS (SELECT FROM budget)
"""
).format(columns=_COLUMNS)

# A page of a ListMessages or of a stream's catch-up: up to `limit` messages on one side of a
# sequence, nearest first, cut after the message that brings its text to `max_bytes` or
# more; `total` is how many the limit let through, so the caller can tell whether the cut
# left some out.
_PAGE = """
SELECT {columns}, total FROM (
    SELECT {columns}, sum(octet_length(text)) OVER (ORDER BY sequence {order}) AS through,
        count(*) OVER () AS total
    FROM (
        SELECT {columns} FROM chat_messages WHERE room = %(room)s AND sequence {side} %(at)s
        ORDER BY sequence {order} LIMIT %(limit)s
    ) AS nearest
) AS page
WHERE through - octet_length(text) < %(max_bytes)s
ORDER BY sequence {order}
"""
_PAGE_AFTER = sql.SQL(_PAGE.strip().replace("{order}", "").replace("{side}", ">")).format(
    columns=_COLUMNS
)
_PAGE_BEFORE = sql.SQL(_PAGE.strip().replace("{order}", "DESC").replace("{side}", "<")).format(
    columns=_COLUMNS
)


def _message(row: tuple[Any, ...]) -> chat_pb2.ChatMessage:
    message = chat_pb2.ChatMessage(
        room=row[0],
        sequence=row[1],
        user_id=row[2],
        user=row[3],
        text=row[4],
        client_message_id=row[5],
    )
    message.create_time.FromDatetime(row[6])
    return message


class MessageStore:
    """Appends messages with the room's next sequence number and reads them back.

    Each sender may append `rate` messages a second on average and `burst` at once, across
    every stream and replica (the budget lives in Postgres, next to the messages).
    """

    def __init__(self, db: Database, *, rate: float, burst: int) -> None:
        self._db = db
        self._interval = timedelta(seconds=1 / rate)
        self._tolerance = timedelta(seconds=(burst - 1) / rate)

    async def append(
        self,
        room: str,
        user_id: int,
        user_name: str,
        text: str,
        client_message_id: str,
        *,
        timeout: float | None,
    ) -> tuple[chat_pb2.ChatMessage, bool] | None:
        """Stores a message; returns it and whether it is new (False for a resent client id),
        or None when the sender's budget refused it (nothing stored).

        One statement, so one round trip and its own transaction: the room's counter row is
        locked by the upsert until the commit, which serialises writers, so sequences have
        no gaps; a message already stored under the same client id takes no number and
        spends no budget. The sender's budget row is locked before the room's, always in
        that order, so two writers cannot deadlock.
        """
        params = {
            "room": room,
            "user_id": user_id,
            "name": user_name,
            "text": text,
            "client_id": client_message_id,
            "interval": self._interval,
            "tolerance": self._tolerance,
        }
        try:
            async with self._db.connection(timeout) as conn:
                cur = await conn.execute(_APPEND, params, prepare=True)
                row = await cur.fetchone()
        except pg_errors.UniqueViolation:
            # The same client id raced in from another stream (a retry); it is stored once.
            existing = await self._by_client_id(room, user_id, client_message_id, timeout)
            assert existing is not None
            return existing, False
        if row is None:
            return None
        return _message(row), bool(row[7])

    async def _by_client_id(
        self, room: str, user_id: int, client_message_id: str, timeout: float | None
    ) -> chat_pb2.ChatMessage | None:
        async with self._db.connection(timeout) as conn:
            cur = await conn.execute(
                sql.SQL(
                    "SELECT {} FROM chat_messages"
                    " WHERE room = %s AND user_id = %s AND client_message_id = %s"
                ).format(_COLUMNS),
                (room, user_id, client_message_id),
            )
            row = await cur.fetchone()
        return None if row is None else _message(row)

    async def last_sequence(self, room: str, *, timeout: float | None = None) -> int:
        async with self._db.connection(timeout) as conn:
            cur = await conn.execute(
                "SELECT last_sequence FROM chat_rooms WHERE name = %s", (room,)
            )
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def after(
        self, room: str, after_sequence: int, limit: int, *, timeout: float | None = None
    ) -> list[chat_pb2.ChatMessage]:
        """Up to `limit` messages with a sequence above `after_sequence`, oldest first."""
        async with self._db.connection(timeout) as conn:
            cur = await conn.execute(
                sql.SQL(
                    "SELECT {} FROM chat_messages WHERE room = %s AND sequence > %s"
                    " ORDER BY sequence LIMIT %s"
                ).format(_COLUMNS),
                (room, after_sequence, limit),
            )
            rows = await cur.fetchall()
        return [_message(row) for row in rows]

    async def before(
        self, room: str, before_sequence: int, limit: int, *, timeout: float | None = None
    ) -> list[chat_pb2.ChatMessage]:
        """Up to `limit` messages just below `before_sequence`, oldest first."""
        async with self._db.connection(timeout) as conn:
            cur = await conn.execute(
                sql.SQL(
                    "SELECT {} FROM chat_messages WHERE room = %s AND sequence < %s"
                    " ORDER BY sequence DESC LIMIT %s"
                ).format(_COLUMNS),
                (room, before_sequence, limit),
            )
            rows = await cur.fetchall()
        return [_message(row) for row in reversed(rows)]

    async def page(
        self,
        room: str,
        *,
        after: int = 0,
        before: int = 0,
        size: int,
        max_bytes: int,
        timeout: float | None = None,
    ) -> tuple[list[chat_pb2.ChatMessage], bool]:
        """A page of at most `size` messages and about `max_bytes` of text (at least one
        message), oldest first: just below `before` when it is set, else just above `after`.
        Also whether more messages lie beyond the page in that direction."""
        query = _PAGE_BEFORE if before > 0 else _PAGE_AFTER
        params = {
            "room": room,
            "at": before if before > 0 else after,
            "limit": size + 1,
            "max_bytes": max_bytes,
        }
        async with self._db.connection(timeout) as conn:
            cur = await conn.execute(query, params)
            rows = await cur.fetchall()
        kept = rows[:size]
        more = bool(rows) and int(rows[0][7]) > len(kept)
        messages = [_message(row) for row in kept]
        if before > 0:
            messages.reverse()
        return messages, more
