"""Bounded chat history: a sweeper that deletes messages older than
PARLEY_CHAT_RETENTION_MAX_AGE and those beyond PARLEY_CHAT_RETENTION_MAX_MESSAGES of their room.

What is deleted. Only the front of a room: its lowest sequences, never one in the middle, so a
room's stored messages stay one run `first .. last_sequence` without holes, and its first kept
sequence is `min(sequence)` (one probe of the primary key index), or `last_sequence + 1` when
nothing is left. Nothing else records it, so no row that writers touch gains a writer. A message
goes when its sequence is at most `last_sequence - max_messages` (reason `count`), or when it
and every message before it in the room are older than the maximum age (reason `age`): the
timestamps of two messages sent at the same instant can come out of sequence order by a few
milliseconds, and such a message waits for the one before it rather than leaving a hole.

How. Every PARLEY_CHAT_RETENTION_INTERVAL each replica starts a sweep (the first one at a
random point of the first interval, so replicas do not start together). A sweep lists the rooms
with something to delete and deletes from each in batches of at most
PARLEY_CHAT_RETENTION_BATCH rows. Each batch is its own short transaction, holding a pooled
connection only while it runs:

- `pg_try_advisory_xact_lock`: one replica deletes at a time. A replica that finds the lock
  taken leaves the rest of its sweep to the holder (counted as yielded) and waits for its
  next interval; no connection ever waits for the lock.
- `statement_timeout` and `lock_timeout` (local to the transaction): a batch never waits long
  for a row lock (a DeleteRoom removing the same rows), and a stuck one fails instead of
  lingering. A failed sweep is counted and retried at the next interval.
- One DELETE that reads the room's `last_sequence` from chat_rooms without locking it (plain
  MVCC read), takes the room's first `batch` rows by the primary key, and deletes the
  prefix of them that is over the count or older than the age. It locks only the message
  rows it deletes: never a chat_rooms row (the foreign key from chat_messages checks inserts,
  not deletes), never the rows being appended at the other end of the room, so the send path
  (`UPDATE chat_rooms SET last_sequence ...` and its INSERT) never waits for a sweep.

After each batch the sweeper pauses as long as the batch took: it takes at most half of one
connection's time, however big the backlog.

Cost with many rooms (100,000, say). A sweep does not visit every room:

- count: one sequential read of chat_rooms for the rooms whose `last_sequence` exceeds
  `max_messages` (only they can be over the limit; chat_rooms has no index on
  `last_sequence`, which would cost every send its HOT update), and for each of those one
  probe of the primary key for its first sequence. 100,000 rooms: a scan of a few MB, tens
  of milliseconds a sweep.
- age: a range scan of the `chat_messages (create_time)` index (migration 0005) over the
  expired rows only, a page of them at a time, so in a steady state a sweep reads what
  expired since the last sweep, and visits only the rooms those rows are in.
- then a batch per room (and per `batch` rows) with something to delete: work in proportion
  to what is deleted. Autovacuum reclaims the deleted rows' space.

Why not native partitioning. Partitioning chat_messages by time would turn age retention into
dropping old partitions (no row deletes, no vacuum), but here it costs more than it saves:
a partitioned table's primary and unique keys must include the partition key, so Postgres would
no longer enforce one row per (room, sequence) nor the once-only resend of a client message id
(room, user_id, client_message_id), which the send path relies on; retention by count per room
is not aligned with time at all (a busy room's last 100,000 messages span hours, a quiet
room's years), so it still needs row deletes; dropping or detaching a partition takes an
ACCESS EXCLUSIVE lock on the parent (DETACH ... CONCURRENTLY cannot run in a transaction),
which stalls every writer for a moment; and a partition boundary cuts rooms by time, not at
their front, where two messages' timestamps can be out of sequence order. Partitioning by room
(hash) changes nothing for deletion. Batched deletes through the primary key cost in proportion
to the rows deleted, lock only those rows, and keep every room's history one contiguous run.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from parley.chassis import Database
from parley.chassis.tasks import cancel_and_wait

from .metrics import RetentionMetrics
from .settings import RetentionSettings

__all__ = ["LOCK_KEY", "RetentionSweeper", "Sweep"]

_log = logging.getLogger("parley.chat.retention")

# The advisory lock one replica holds while it deletes a batch ("PRLYRTN"); distinct from the
# migrations' lock.
LOCK_KEY = 0x50524C5952544E
# Per batch transaction: its statements' longest run, and longest wait for a lock.
STATEMENT_TIMEOUT = "5s"
LOCK_TIMEOUT = "500ms"
# For the reads that find rooms with something to delete (a scan of chat_rooms, an index page).
SCAN_TIMEOUT = "30s"
# Expired rows read from the create_time index at once to find rooms to sweep by age.
SCAN_PAGE = 5000
# A sequence above every stored one.
_BEYOND = 2**63 - 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_BEGIN = (
    "SELECT set_config('statement_timeout', %(statement_timeout)s, true),"
    " set_config('lock_timeout', %(lock_timeout)s, true),"
    " pg_try_advisory_xact_lock(%(key)s)"
)

# One batch of one room: of its first `batch` messages (by the primary key), deletes those over
# the count (sequence <= last_sequence - max_messages; none when max_messages is 0) and the
# prefix older than max_age (none when it is 0). Returns how many went for each reason.
_BATCH = """
WITH front AS (
    SELECT sequence, create_time FROM chat_messages WHERE room = %(room)s
    ORDER BY sequence LIMIT %(batch)s
), bounds AS (
    SELECT
        CASE WHEN %(max_messages)s::bigint > 0 THEN
            coalesce((SELECT last_sequence FROM chat_rooms WHERE name = %(room)s), 0)
                - %(max_messages)s::bigint
        ELSE 0 END AS over_count,
        CASE WHEN %(by_age)s THEN
            coalesce((SELECT min(sequence) FROM front
                      WHERE create_time >= now() - %(max_age)s::interval), %(beyond)s::bigint)
        ELSE 0 END AS young
), gone AS (
    DELETE FROM chat_messages AS m USING front, bounds
    WHERE m.room = %(room)s AND m.sequence = front.sequence
      AND (front.sequence <= bounds.over_count OR front.sequence < bounds.young)
    RETURNING m.sequence <= bounds.over_count AS by_count
)
SELECT count(*) FILTER (WHERE by_count), count(*) FILTER (WHERE NOT by_count) FROM gone
"""

# Rooms that may hold more than max_messages: only those whose last_sequence exceeds it, and of
# those the ones whose first stored sequence is at most last_sequence - max_messages.
_OVER_COUNT = """
SELECT r.name FROM chat_rooms AS r
WHERE r.last_sequence > %(max_messages)s::bigint
  AND r.last_sequence - %(max_messages)s::bigint
      >= (SELECT min(m.sequence) FROM chat_messages AS m WHERE m.room = r.name)
"""

# A page of expired rows, oldest first, from `since` on (the create_time index).
_EXPIRED = """
SELECT room, create_time FROM chat_messages
WHERE create_time < now() - %(max_age)s::interval AND create_time >= %(since)s
ORDER BY create_time LIMIT %(limit)s
"""


class _Yielded(Exception):
    """Another replica holds the sweep lock."""


@dataclass
class Sweep:
    """What one sweep did."""

    age: int = 0
    """Messages deleted for their age."""
    count: int = 0
    """Messages deleted beyond their room's count."""
    batches: int = 0
    rooms: set[str] = field(default_factory=set)
    """The rooms it deleted from."""
    yielded: bool = False
    """It stopped because another replica held the sweep lock."""

    @property
    def deleted(self) -> int:
        return self.age + self.count


class RetentionSweeper:
    """Deletes old chat history in the background (see the module's documentation).

    `before_commit(room, deleted)`, when given, is awaited inside every batch's transaction
    just before its commit, with the batch's row locks and the sweep lock held: tests hold a
    batch open with it.
    """

    def __init__(
        self,
        db: Database,
        settings: RetentionSettings,
        metrics: RetentionMetrics,
        *,
        before_commit: Callable[[str, int], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.time,
        scan_page: int = SCAN_PAGE,
    ) -> None:
        self._db = db
        self._scan_page = scan_page
        self._settings = settings
        self._metrics = metrics
        self._before_commit = before_commit
        self._clock = clock
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._settings.enabled:
            self._task = asyncio.create_task(self._every(), name="chat-retention")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None

    async def _every(self) -> None:
        interval = self._settings.interval
        await asyncio.sleep(random.uniform(0, interval))
        while True:
            started = time.monotonic()
            try:
                done = await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Postgres unavailable, a timeout: next interval
                self._metrics.failures.inc()
                text = (str(exc).strip() or type(exc).__name__).splitlines()[0]
                _log.warning(
                    "chat history retention sweep failed: %s; retrying in %gs", text, interval
                )
            else:
                if done.deleted:
                    _log.info(
                        "chat history retention deleted %d message(s) (%d by age, %d by count) "
                        "from %d room(s) in %d batch(es)%s",
                        done.deleted,
                        done.age,
                        done.count,
                        len(done.rooms),
                        done.batches,
                        "; another replica sweeps the rest" if done.yielded else "",
                    )
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    async def sweep(self) -> Sweep:
        """One sweep: deletes what is over the limits now, unless another replica holds the
        sweep lock (then `yielded`). Raises when Postgres fails."""
        done = Sweep()
        settings = self._settings
        try:
            if settings.max_messages > 0:
                for room in await self._rooms_over_count():
                    await self._sweep_room(room, done)
            if settings.max_age > 0:
                await self._sweep_by_age(done)
        except _Yielded:
            done.yielded = True
            self._metrics.yielded.inc()
            return done
        self._metrics.last_sweep.set(self._clock())
        return done

    async def _rooms_over_count(self) -> list[str]:
        rows = await self._read(_OVER_COUNT, {"max_messages": self._settings.max_messages})
        return [str(row[0]) for row in rows]

    async def _sweep_by_age(self, done: Sweep) -> None:
        """Visits the rooms of the expired rows, a page of the create_time index at a time."""
        since = _EPOCH
        while True:
            rows = await self._read(
                _EXPIRED,
                {"max_age": self._max_age(), "since": since, "limit": self._scan_page},
            )
            for room in dict.fromkeys(str(row[0]) for row in rows):
                await self._sweep_room(room, done)
            if len(rows) < self._scan_page:
                return
            newest: datetime = rows[-1][1]
            if newest <= since:
                return  # a page of rows with one timestamp that cannot go yet: next sweep
            since = newest

    async def _sweep_room(self, room: str, done: Sweep) -> None:
        """Deletes the room's expired front, a batch at a time, until a batch finds less to
        delete than it could have."""
        while True:
            started = time.monotonic()
            by_count, by_age = await self._batch(room)
            elapsed = time.monotonic() - started
            self._metrics.batch_seconds.observe(elapsed)
            done.batches += 1
            if by_count:
                self._metrics.deleted.labels("count").inc(by_count)
            if by_age:
                self._metrics.deleted.labels("age").inc(by_age)
            done.count += by_count
            done.age += by_age
            if by_count + by_age:
                done.rooms.add(room)
            if by_count + by_age < self._settings.batch:
                return
            await asyncio.sleep(elapsed)  # at most half of a connection's time

    async def _batch(self, room: str) -> tuple[int, int]:
        """One batch in its own transaction: (deleted by count, deleted by age)."""
        params = {
            "room": room,
            "batch": self._settings.batch,
            "max_messages": self._settings.max_messages,
            "by_age": self._settings.max_age > 0,
            "max_age": self._max_age(),
            "beyond": _BEYOND,
        }
        async with self._db.connection() as conn:
            try:
                async with conn.transaction():
                    cur = await conn.execute(
                        _BEGIN,
                        {
                            "statement_timeout": STATEMENT_TIMEOUT,
                            "lock_timeout": LOCK_TIMEOUT,
                            "key": LOCK_KEY,
                        },
                    )
                    row = await cur.fetchone()
                    if row is None or not row[2]:
                        raise _Yielded
                    cur = await conn.execute(_BATCH, params)
                    counts = await cur.fetchone()
                    if self._before_commit is not None and counts is not None:
                        await self._before_commit(room, int(counts[0]) + int(counts[1]))
            except psycopg.errors.LockNotAvailable:
                # A room deletion holds some of these rows (and takes them itself).
                _log.debug("room %s is busy; its old messages go in the next sweep", room)
                return 0, 0
        assert counts is not None
        return int(counts[0]), int(counts[1])

    async def _read(self, query: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        async with self._db.connection() as conn, conn.transaction():
            await conn.execute("SELECT set_config('statement_timeout', %s, true)", (SCAN_TIMEOUT,))
            cur = await conn.execute(query, params)
            return await cur.fetchall()

    def _max_age(self) -> timedelta:
        return timedelta(seconds=self._settings.max_age)
