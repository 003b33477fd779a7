"""Chat messages in Postgres: the durable log every delivery and every resume reads from."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, NamedTuple

from psycopg import errors as pg_errors
from psycopg import sql

from parley.chassis import Database
from parley.chassis.errors import Unavailable
from parley.proto import chat_pb2

__all__ = ["Appended", "MessageStore", "Page"]

_COLUMNS = sql.SQL("room, sequence, user_id, user_name, text, client_message_id, create_time")

# The stored message and what became of the send. Every send spends from the sender's budget
# (see the chat_send_budgets migration), a resend too: each costs a statement, and a client
# resending one id in a loop would otherwise load Postgres without bound. Only when the budget
# allows, a resent client id returns the earlier row ('resent'), or the room's counter is
# bumped and the message inserted ('new', with the room's access version). The counter moves
# only while the room's access version is the one the sender was checked at: a room changed
# since (or deleted) stores nothing ('stale') and the sender's access is checked again. 'rate':
# the budget refused it.
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
    UPDATE chat_rooms AS r SET last_sequence = r.last_sequence + 1
    WHERE r.name = %(room)s AND r.access_version = %(version)s
      AND EXISTS (SELECT FROM budget) AND NOT EXISTS (SELECT FROM existing)
    RETURNING r.last_sequence, r.access_version, r.room_id
), added AS (
    INSERT INTO chat_messages (room, sequence, user_id, user_name, text, client_message_id)
    SELECT %(room)s, last_sequence, %(user_id)s, %(name)s, %(text)s, %(client_id)s FROM next
    RETURNING {columns}
)
SELECT {columns}, 'new', (SELECT access_version FROM next), (SELECT room_id FROM next)
FROM added
UNION ALL
SELECT {columns}, 'resent', NULL::bigint,
    (SELECT room_id FROM chat_rooms WHERE name = %(room)s)
FROM existing WHERE EXISTS (SELECT FROM budget)
UNION ALL
SELECT NULL::text, NULL::bigint, NULL::integer, NULL::text, NULL::text, NULL::text,
    NULL::timestamptz, CASE WHEN EXISTS (SELECT FROM budget) THEN 'stale' ELSE 'rate' END,
    NULL::bigint, NULL::bigint
WHERE NOT EXISTS (SELECT FROM added)
  AND NOT (EXISTS (SELECT FROM existing) AND EXISTS (SELECT FROM budget))
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
# The page, read only when `reader` may read the room, from the same snapshot as that check:
# no row when the room does not exist; one row of NULLs when the reader may not read it or the
# page is empty. With it the room's first stored sequence (history retention deletes from the
# front: see retention.py), last_sequence + 1 when it holds none: one probe of the primary key.
_CHECKED_PAGE = """
SELECT r.access_version, r.last_sequence, r.room_id, kept.first, allowed, page.*
FROM chat_rooms r
CROSS JOIN LATERAL (SELECT NOT r.private OR EXISTS (
    SELECT FROM chat_room_members m WHERE m.room = r.name AND m.user_id = %(reader)s
) AS allowed) AS access
CROSS JOIN LATERAL (SELECT coalesce(
    (SELECT min(f.sequence) FROM chat_messages f WHERE f.room = r.name), r.last_sequence + 1
) AS first) AS kept
LEFT JOIN LATERAL ({page}) AS page ON allowed
WHERE r.name = %(room)s
ORDER BY page.sequence {order}
"""


def _checked_page(order: str, side: str) -> sql.Composed:
    page = _PAGE.strip().replace("{order}", order).replace("{side}", side)
    return sql.SQL(_CHECKED_PAGE.strip().replace("{page}", page).replace("{order}", order)).format(
        columns=_COLUMNS
    )


_PAGE_AFTER = _checked_page("", ">")
_PAGE_BEFORE = _checked_page("DESC", "<")


class Appended(NamedTuple):
    """What became of a send: 'new' (stored now), 'resent' (stored before under its client
    id), 'rate' (the sender's budget refused it) or 'stale' (the room's access changed since
    the sender was checked, or it was deleted: nothing stored)."""

    outcome: str
    message: chat_pb2.ChatMessage | None
    version: int  # the room's access version with a 'new' message


class Page(NamedTuple):
    messages: list[chat_pb2.ChatMessage]
    more: bool
    exists: bool
    allowed: bool  # the reader may read the room (False when it does not exist)
    version: int
    last_sequence: int  # the room's highest sequence when the page was read
    room_id: int = 0  # which room the name stood for
    # The room's lowest stored sequence when the page was read (last_sequence + 1: none).
    first_sequence: int = 0


def _message(row: tuple[Any, ...], room_id: int) -> chat_pb2.ChatMessage:
    message = chat_pb2.ChatMessage(
        room_id=room_id,
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

    def __init__(self, db: Database, *, rate: float, burst: int, max_messages: int = 0) -> None:
        self._db = db
        self._max_messages = max_messages  # PARLEY_CHAT_RETENTION_MAX_MESSAGES (0: none)
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
        version: int,
        timeout: float | None,
    ) -> Appended:
        """Stores a message if the room is still at access `version` (what the sender was
        checked at); see _APPEND for the outcomes.

        One statement, so one round trip and its own transaction: the room's counter row is
        locked by the update until the commit, which serialises writers, so sequences have
        no gaps; a message already stored under the same client id takes no number. The
        sender's budget row is locked before the room's, always in that order, so two
        writers cannot deadlock.
        """
        params = {
            "room": room,
            "user_id": user_id,
            "name": user_name,
            "text": text,
            "client_id": client_message_id,
            "interval": self._interval,
            "tolerance": self._tolerance,
            "version": version,
        }
        for _attempt in range(2):
            try:
                async with self._db.connection(timeout) as conn:
                    cur = await conn.execute(_APPEND, params, prepare=True)
                    row = await cur.fetchone()
            except pg_errors.UniqueViolation:
                # The same client id raced in from another stream (a retry) and committed
                # first: the statement again, which now finds it ('resent').
                continue
            assert row is not None
            outcome = row[7]
            if outcome in ("rate", "stale"):
                return Appended(outcome, None, 0)
            return Appended(outcome, _message(row, int(row[9] or 0)), int(row[8] or 0))
        # Raced twice in a row: never INTERNAL, the client resends and is answered then.
        raise Unavailable(
            "postgres",
            "another send with the same client_message_id was being stored at the same moment;"
            " send it again",
        )

    async def last_sequence(self, room: str, *, timeout: float | None = None) -> int:
        async with self._db.connection(timeout) as conn:
            cur = await conn.execute(
                "SELECT last_sequence FROM chat_rooms WHERE name = %s", (room,)
            )
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def kept(self, room: str, *, timeout: float | None = None) -> tuple[int, int]:
        """The room's lowest stored sequence (history retention deletes from the front), or
        its last_sequence + 1 when it holds none (1 for a room that does not exist); and the
        first sequence to tell a stream refused for what was deleted (see `horizon`)."""
        async with self._db.connection(timeout) as conn:
            cur = await conn.execute(
                "SELECT coalesce((SELECT min(sequence) FROM chat_messages WHERE room = %(room)s),"
                " (SELECT last_sequence FROM chat_rooms WHERE name = %(room)s) + 1, 1),"
                " coalesce((SELECT last_sequence FROM chat_rooms WHERE name = %(room)s), 0)",
                {"room": room},
            )
            row = await cur.fetchone()
        assert row is not None
        first = int(row[0])
        return first, self.horizon(first, int(row[1]))

    def horizon(self, first: int, last: int) -> int:
        """Where a stream refused for deleted history goes on: the first kept sequence, or,
        with a count limit, the first one the limit keeps when it is later (those below it are
        about to go, and the sweep under way never deletes at or past it: see retention.py),
        so one gap is told once rather than again for each batch of a sweep."""
        if self._max_messages <= 0:
            return first
        return max(first, last - self._max_messages + 1)

    async def after(
        self, room: str, after_sequence: int, limit: int, *, timeout: float | None = None
    ) -> tuple[list[chat_pb2.ChatMessage], tuple[int, int] | None]:
        """Up to `limit` messages with a sequence above `after_sequence`, oldest first, and
        the room's (id, access version) read with them (None: the room does not exist)."""
        async with self._db.connection(timeout) as conn:
            cur = await conn.execute(
                sql.SQL(
                    "SELECT r.room_id, r.access_version, m.* FROM chat_rooms r LEFT JOIN LATERAL ("
                    " SELECT {} FROM chat_messages WHERE room = r.name AND sequence > %s"
                    " ORDER BY sequence LIMIT %s) AS m ON true WHERE r.name = %s"
                    " ORDER BY m.sequence"
                ).format(_COLUMNS),
                (after_sequence, limit, room),
            )
            rows = await cur.fetchall()
        if not rows:
            return [], None
        room_id = int(rows[0][0])
        messages = [_message(row[2:], room_id) for row in rows if row[2] is not None]
        return messages, (room_id, int(rows[0][1]))

    async def page(
        self,
        room: str,
        *,
        reader: int,
        after: int = 0,
        before: int = 0,
        size: int,
        max_bytes: int,
        timeout: float | None = None,
    ) -> Page:
        """A page of at most `size` messages and about `max_bytes` of text (at least one
        message), oldest first: just below `before` when it is set, else just above `after`;
        whether more messages lie beyond it in that direction; and whether `reader` may read
        the room at all (no messages when not), all from one snapshot."""
        query = _PAGE_BEFORE if before > 0 else _PAGE_AFTER
        params = {
            "room": room,
            "reader": reader,
            "at": before if before > 0 else after,
            "limit": size + 1,
            "max_bytes": max_bytes,
        }
        async with self._db.connection(timeout) as conn:
            cur = await conn.execute(query, params)
            rows = await cur.fetchall()
        if not rows:
            return Page([], False, exists=False, allowed=False, version=0, last_sequence=0)
        version, last, room_id = int(rows[0][0]), int(rows[0][1]), int(rows[0][2])
        first = int(rows[0][3])
        allowed = bool(rows[0][4])
        found = [row[5:] for row in rows if row[5] is not None]
        kept = found[:size]
        more = bool(found) and int(found[0][7]) > len(kept)
        messages = [_message(row, room_id) for row in kept]
        if before > 0:
            messages.reverse()
        return Page(
            messages,
            more,
            exists=True,
            allowed=allowed,
            version=version,
            last_sequence=last,
            room_id=room_id,
            first_sequence=first,
        )
