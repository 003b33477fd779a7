"""Bounded chat history: a sweeper that deletes messages older than
PARLEY_CHAT_RETENTION_MAX_AGE and those beyond PARLEY_CHAT_RETENTION_MAX_MESSAGES of their room,
never one younger than PARLEY_CHAT_RETENTION_MIN_AGE.

What is deleted. Only the front of a room: its lowest sequences, never one in the middle, so a
room's stored messages stay one run `first .. last_sequence` without holes, and its first kept
sequence is `min(sequence)` (one probe of the primary key index), or `last_sequence + 1` when
nothing is left. Nothing else records it, so no row that writers touch gains a writer. A message
goes when its sequence is at most the room's count cutoff (reason `count`), or when it and every
message before it in the room are older than the maximum age (reason `age`), and in either case
only when it and every message before it were stored before the sweep's least-age instant
(`now() - min_age` when the sweep began): a resend under a client message id finds the stored
message, and is not stored again, for at least min_age. The timestamps of two messages sent at
the same instant can come out of sequence order by a few milliseconds; such a message waits for
the one before it rather than leaving a hole.

Count. A room is swept by count only when it is over max_messages by at least
PARLEY_CHAT_RETENTION_BATCH messages, and then down to max_messages: each over-limit room costs
a transaction per sweep only when there is a batch's worth to delete, and a room holds between
max_messages and max_messages + batch - 1 (more when min_age keeps them). The room's cutoff,
`last_sequence - max_messages`, is fixed when the sweep starts on the room (read by its first
batch, reused by the rest): the sweep never deletes at or past the horizon a stream refused
meanwhile was told to go on from (`MessageStore.horizon`, computed from a last_sequence at
least as new), so one sweep makes one gap, not one per batch.

How. Every PARLEY_CHAT_RETENTION_INTERVAL each replica starts a sweep (the first one at a
random point of the first interval, so replicas do not start together). A sweep reads its two
instants from Postgres's clock, lists the rooms with something to delete and deletes from each
in batches of at most PARLEY_CHAT_RETENTION_BATCH rows. Each batch is its own short
transaction, holding a pooled connection only while it runs:

- `pg_try_advisory_xact_lock`: one replica deletes at a time. A replica that finds the lock
  taken leaves the rest of its sweep to the holder (counted as yielded) and waits for its
  next interval; no connection ever waits for the lock.
- `statement_timeout` and `lock_timeout` (local to the transaction): a batch never waits long
  for a row lock (a DeleteRoom removing the same rows: the batch gives up after the lock
  timeout and the room waits for the next sweep), and a stuck one fails instead of lingering.
  A batch (or a scan) that fails is logged with Postgres's own words, counted in
  parley_chat_retention_sweep_failures_total, and the sweep goes on with the other rooms and
  the age pass; the next sweep tries again.
- One DELETE that takes the room's first `batch` rows by the primary key and deletes the
  prefix of them that is over the count cutoff or older than the age, and stored before the
  least-age instant. It locks only the message rows it deletes: never a chat_rooms row (its
  first batch reads last_sequence with a plain MVCC read; the foreign key from chat_messages
  checks inserts, not deletes), never the rows being appended at the other end of the room,
  so the send path (`UPDATE chat_rooms SET last_sequence ...` and its INSERT) does not wait
  for a sweep. The exception: a DeleteRoom of the room waits for the batch under way (at most
  its statement timeout) to delete the same rows, and sends into that room wait for the
  DeleteRoom.

After each batch, the last of a room included (so between rooms too), the sweeper pauses as
long as the batch took: it takes at most half of one connection's time, however big the
backlog and however many rooms are over a limit.

Cost with many rooms (100,000, say). A sweep does not visit every room:

- count: one sequential read of chat_rooms for the rooms whose `last_sequence` exceeds
  `max_messages + batch` (only they can be a batch over the limit; chat_rooms has no index on
  `last_sequence`, which would cost every send its HOT update), and for each of those one
  probe of the primary key for its first sequence. 100,000 rooms: a scan of a few MB, tens
  of milliseconds a sweep.
- age: a range scan of the `chat_messages (create_time)` index (migration 0005) over the
  expired rows only, a page of them at a time, keyset-paged on (create_time, room, sequence)
  so that rows sharing a timestamp (a bulk import) never stall it: rows tied with the last
  one of a page are sorted again for the next page, work in proportion to the tie. In a
  steady state a sweep reads what expired since the last sweep, and visits only the rooms
  those rows are in, each once.
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
from parley.chassis.errors import ServiceError
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
# the count (sequence <= over_count; none when it is 0) and the prefix stored before
# `expired_before` (none when by_age is false), but never a message stored at or after
# `keep_from` (PARLEY_CHAT_RETENTION_MIN_AGE), nor any after it. `over_count` is fixed for
# the whole of the room's sweep (NULL in its first batch: last_sequence - max_messages, read
# then without locking the room's row, and returned for the next batches), so a sweep never
# deletes past the horizon a refused stream was told (see MessageStore.kept). Returns how
# many went for each reason, and the over_count used.
_BATCH = """
WITH front AS (
    SELECT sequence, create_time FROM chat_messages WHERE room = %(room)s
    ORDER BY sequence LIMIT %(batch)s
), bounds AS (
    SELECT
        coalesce(%(over_count)s::bigint, CASE WHEN %(max_messages)s::bigint > 0 THEN
            coalesce((SELECT last_sequence FROM chat_rooms WHERE name = %(room)s), 0)
                - %(max_messages)s::bigint
        ELSE 0 END) AS over_count,
        CASE WHEN %(by_age)s THEN
            coalesce((SELECT min(sequence) FROM front
                      WHERE create_time >= %(expired_before)s), %(beyond)s::bigint)
        ELSE 0 END AS young,
        coalesce((SELECT min(sequence) FROM front WHERE create_time >= %(keep_from)s),
                 %(beyond)s::bigint) AS protected
), gone AS (
    DELETE FROM chat_messages AS m USING front, bounds
    WHERE m.room = %(room)s AND m.sequence = front.sequence
      AND front.sequence < bounds.protected
      AND (front.sequence <= bounds.over_count OR front.sequence < bounds.young)
    RETURNING m.sequence <= bounds.over_count AS by_count
)
SELECT count(*) FILTER (WHERE by_count), count(*) FILTER (WHERE NOT by_count),
    (SELECT over_count FROM bounds)
FROM gone
"""

# Rooms over max_messages by at least `batch` messages (a room nearer the limit waits until it
# is: one short transaction per room and sweep is not spent on a handful of rows), with the
# sequence at or below which each one's messages are over the count. Only rooms whose
# last_sequence exceeds max_messages + batch can be, so the probe of the primary key for the
# first stored sequence runs for those only.
_OVER_COUNT = """
SELECT r.name, r.last_sequence - %(max_messages)s::bigint FROM chat_rooms AS r
WHERE r.last_sequence - %(max_messages)s::bigint >= %(batch)s::bigint
  AND r.last_sequence - %(max_messages)s::bigint + 1
      - (SELECT min(m.sequence) FROM chat_messages AS m WHERE m.room = r.name)
      >= %(batch)s::bigint
"""

# The sweep's two instants, from Postgres's clock (the one create_time is written by): rows
# stored before the first are expired, rows stored at or after the second are never deleted.
_CUTOFFS = "SELECT now() - %(max_age)s::interval, now() - %(min_age)s::interval"

# A page of expired rows in the order of the unique key (create_time, room, sequence), after
# the last row of the previous page: rows that share a timestamp never stall the scan.
_EXPIRED = """
SELECT room, sequence, create_time FROM chat_messages
WHERE create_time < %(expired_before)s AND create_time >= %(since)s
  AND (create_time, room, sequence) > (%(since)s, %(room)s, %(sequence)s)
ORDER BY create_time, room, sequence LIMIT %(limit)s
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
    failures: int = 0
    """Rooms (or scans) it gave up on for an error, counted and logged; it went on with the
    rest."""

    @property
    def deleted(self) -> int:
        return self.age + self.count


@dataclass(frozen=True)
class _Cutoffs:
    expired_before: datetime
    keep_from: datetime


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
        pause: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._pause = pause
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
        sweep lock (then `yielded`). A room (or a scan) that fails is counted in `failures`,
        logged, and left for the next sweep; the sweep goes on with the rest. Raises only when
        Postgres cannot even tell the sweep's cutoffs."""
        done = Sweep()
        settings = self._settings
        cutoffs = await self._cutoffs()
        visited: set[str] = set()  # each room's batches delete for both reasons: once a sweep
        try:
            if settings.max_messages > 0:
                for room, over_count in await self._rooms_over_count(done):
                    visited.add(room)
                    await self._sweep_room(room, done, cutoffs, over_count)
            if settings.max_age > 0:
                await self._sweep_by_age(done, cutoffs, visited)
        except _Yielded:
            done.yielded = True
            self._metrics.yielded.inc()
            return done
        if not done.failures:
            self._metrics.last_sweep.set(self._clock())
        return done

    async def _cutoffs(self) -> _Cutoffs:
        rows = await self._read(
            _CUTOFFS,
            {
                "max_age": timedelta(seconds=self._settings.max_age),
                "min_age": timedelta(seconds=self._settings.min_age),
            },
        )
        return _Cutoffs(expired_before=rows[0][0], keep_from=rows[0][1])

    async def _rooms_over_count(self, done: Sweep) -> list[tuple[str, int]]:
        """The rooms to sweep by count, each with its count cutoff; none when the scan
        fails (counted and logged: the age pass still runs)."""
        try:
            rows = await self._read(
                _OVER_COUNT,
                {"max_messages": self._settings.max_messages, "batch": self._settings.batch},
            )
        except Exception as exc:  # a timeout, Postgres gone: the next sweep tries again
            self._failed(done, "finding the rooms over the count", None, exc)
            return []
        return [(str(row[0]), int(row[1])) for row in rows]

    def _failed(self, done: Sweep, what: str, room: str | None, exc: BaseException) -> None:
        done.failures += 1
        self._metrics.failures.inc()
        # The pool turns Postgres's own error (a statement timeout, say) into a service error
        # meant for callers; the log names what Postgres said.
        if isinstance(exc, ServiceError) and exc.__context__ is not None:
            exc = exc.__context__
        text = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        where = f" of room {room!r}" if room is not None else ""
        _log.warning(
            "chat history retention failed %s%s (%s: %s); the sweep goes on, and the next one "
            "tries again",
            what,
            where,
            type(exc).__name__,
            text,
        )

    async def _sweep_by_age(self, done: Sweep, cutoffs: _Cutoffs, visited: set[str]) -> None:
        """Visits the rooms of the expired rows, a page of the create_time index at a time,
        keyset-paged on (create_time, room, sequence): every page moves past the last, however
        many rows share a timestamp."""
        since, last_room, last_sequence = _EPOCH, "", 0
        while True:
            try:
                rows = await self._read(
                    _EXPIRED,
                    {
                        "expired_before": cutoffs.expired_before,
                        "since": since,
                        "room": last_room,
                        "sequence": last_sequence,
                        "limit": self._scan_page,
                    },
                )
            except _Yielded:
                raise
            except Exception as exc:  # a timeout, Postgres gone: next sweep
                self._failed(done, "reading the expired messages", None, exc)
                return
            for room in dict.fromkeys(str(row[0]) for row in rows):
                if room not in visited:
                    visited.add(room)
                    await self._sweep_room(room, done, cutoffs, None)
            if len(rows) < self._scan_page:
                return
            last_room, last_sequence, since = str(rows[-1][0]), int(rows[-1][1]), rows[-1][2]

    async def _sweep_room(
        self, room: str, done: Sweep, cutoffs: _Cutoffs, over_count: int | None
    ) -> None:
        """Deletes the room's expired front, a batch at a time, until a batch finds less to
        delete than it could have; pauses after each batch as long as it took (so between
        rooms too). An error ends this room's turn, counted and logged."""
        while True:
            started = time.monotonic()
            try:
                by_count, by_age, over_count = await self._batch(room, cutoffs, over_count)
            except _Yielded:
                raise
            except Exception as exc:  # a timeout, Postgres gone: next sweep
                self._failed(done, "deleting old messages", room, exc)
                await self._pause(time.monotonic() - started)
                return
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
            await self._pause(elapsed)  # at most half of a connection's time
            if by_count + by_age < self._settings.batch:
                return

    async def _batch(
        self, room: str, cutoffs: _Cutoffs, over_count: int | None
    ) -> tuple[int, int, int | None]:
        """One batch in its own transaction: (deleted by count, deleted by age, the count
        cutoff for the room's next batches)."""
        params = {
            "room": room,
            "batch": self._settings.batch,
            "max_messages": self._settings.max_messages,
            "over_count": over_count,
            "by_age": self._settings.max_age > 0,
            "expired_before": cutoffs.expired_before,
            "keep_from": cutoffs.keep_from,
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
                return 0, 0, over_count
        assert counts is not None
        return int(counts[0]), int(counts[1]), int(counts[2])

    async def _read(self, query: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        async with self._db.connection() as conn, conn.transaction():
            await conn.execute("SELECT set_config('statement_timeout', %s, true)", (SCAN_TIMEOUT,))
            cur = await conn.execute(query, params)
            return await cur.fetchall()
