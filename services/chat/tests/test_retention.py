"""Bounded chat history: the retention sweeper (retention.py) against a real Postgres, and the
RESUME_POINT_EXPIRED signal of StreamChat and ListMessages' first_sequence against real
servers.

Rows are seeded with SQL (generate_series, timestamps set in the past for the age limit); the
sweeper under test is built in this process on a pool of its own, so a test decides when it
sweeps and can hold a batch open inside its transaction. The chat replicas started here run
with retention off, so nothing else deletes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
import psycopg
import pytest
from prometheus_client import CollectorRegistry

from parley.chassis import ConfigError, Database, DatabaseSettings, Env
from parley.chat_service import ChatSettings
from parley.chat_service.metrics import RetentionMetrics
from parley.chat_service.retention import RetentionSweeper, Sweep
from parley.chat_service.settings import RetentionSettings
from parley.chat_service.store import MessageStore
from parley.proto import chat_pb2, chat_pb2_grpc
from parley.proto.contract import FIRST_SEQUENCE_KEY, RESUME_EXPIRED, RESUME_KEY, ROOM_KEY
from parley.testing.launcher import run_to_exit
from parley.testing.tokens import bearer
from parley.testing.waiting import wait_until

# The chat replicas of these tests: no sweeper of their own.
NO_RETENTION = {"PARLEY_CHAT_RETENTION_MAX_AGE": "0", "PARLEY_CHAT_RETENTION_MAX_MESSAGES": "0"}


def settings_env(**overrides: str) -> dict[str, str]:
    return {
        "PARLEY_DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/postgres",
        "PARLEY_JWT_SECRET": os.urandom(32).hex(),
        "PARLEY_REDIS_URL": "redis://127.0.0.1:6379/0",
        **overrides,
    }


# --- Seeding and reading rows ---------------------------------------------------------------


async def seed(
    url: str,
    room: str,
    count: int,
    *,
    old: Iterable[int] = (),
    text: str = "message",
    recent: str = "0 seconds",
) -> None:
    """A public room holding messages 1..count (last_sequence = count); those in `old` were
    stored three days ago, the rest `recent` ago."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO chat_rooms (name, last_sequence) VALUES (%s, %s)", (room, count)
        )
        await conn.execute(
            "INSERT INTO chat_messages (room, sequence, user_id, user_name, text, create_time)"
            " SELECT %s, g, 1, 'seed', %s || ' ' || g,"
            "  CASE WHEN g = ANY(%s) THEN now() - interval '3 days' ELSE now() - %s::interval END"
            " FROM generate_series(1, %s) AS g",
            (room, text, list(old), recent, count),
        )


async def sequences(url: str, room: str) -> list[int]:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT sequence FROM chat_messages WHERE room = %s ORDER BY sequence", (room,)
        )
        return [int(row[0]) for row in await cur.fetchall()]


async def last_sequence(url: str, room: str) -> int:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute("SELECT last_sequence FROM chat_rooms WHERE name = %s", (room,))
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


# --- The sweeper under test ----------------------------------------------------------------


class Sweeper:
    """A RetentionSweeper on a pool of its own, with its metrics and every batch it ran as
    (room, rows deleted)."""

    def __init__(self, db: Database, settings: RetentionSettings, **options: Any) -> None:
        self.metrics = RetentionMetrics(CollectorRegistry())
        self.batches: list[tuple[str, int]] = []
        self.hold: Any = None  # `await hold(room, deleted)` inside each batch, when set

        async def before_commit(room: str, deleted: int) -> None:
            self.batches.append((room, deleted))
            if self.hold is not None:
                await self.hold(room, deleted)

        self.sweeper = RetentionSweeper(
            db, settings, self.metrics, before_commit=before_commit, **options
        )

    async def sweep(self) -> Sweep:
        return await self.sweeper.sweep()

    def deleted(self, reason: str) -> float:
        return self.metrics.deleted.labels(reason)._value.get()


@contextlib.asynccontextmanager
async def sweeper_on(
    url: str, scan_page: int = 5000, pause: Any = None, **settings: Any
) -> AsyncIterator[Sweeper]:
    db = Database(
        DatabaseSettings.from_env(Env({"PARLEY_DATABASE_URL": url})),
        application_name="parley-retention-test",
    )
    await db.open()
    # Rows seeded "now" may go: PARLEY_CHAT_RETENTION_MIN_AGE's own tests set it.
    settings.setdefault("min_age", 0.0)
    try:
        options = {} if pause is None else {"pause": pause}
        yield Sweeper(db, RetentionSettings(**settings), scan_page=scan_page, **options)
    finally:
        await db.close()


# --- Settings -------------------------------------------------------------------------------


def test_retention_defaults_and_units():
    settings = ChatSettings.from_env(Env(settings_env())).retention
    assert settings == RetentionSettings(
        max_age=30 * 86400.0, max_messages=100_000, interval=60.0, batch=1000
    )
    given = ChatSettings.from_env(
        Env(
            settings_env(
                PARLEY_CHAT_RETENTION_MAX_AGE="720h",
                PARLEY_CHAT_RETENTION_MAX_MESSAGES="0",
                PARLEY_CHAT_RETENTION_INTERVAL="500ms",
                PARLEY_CHAT_RETENTION_BATCH="50",
            )
        )
    ).retention
    assert (given.max_age, given.max_messages, given.interval, given.batch) == (
        30 * 86400.0,
        0,
        0.5,
        50,
    )
    assert given.enabled
    days = ChatSettings.from_env(Env(settings_env(PARLEY_CHAT_RETENTION_MAX_AGE="7d")))
    assert days.retention.max_age == 7 * 86400.0
    off = RetentionSettings(max_age=0, max_messages=0)
    assert not off.enabled
    assert settings.min_age == 3600.0
    for value, seconds in (("1m", 60.0), ("2h", 7200.0), ("30d", 30 * 86400.0)):
        env = settings_env(PARLEY_CHAT_RETENTION_MIN_AGE=value)
        assert ChatSettings.from_env(Env(env)).retention.min_age == seconds
    # Without an age limit, the least age is only what the count limit waits for.
    env = settings_env(PARLEY_CHAT_RETENTION_MAX_AGE="0", PARLEY_CHAT_RETENTION_MIN_AGE="30d")
    assert ChatSettings.from_env(Env(env)).retention.min_age == 30 * 86400.0


def test_a_least_age_beyond_the_age_limit_is_a_one_line_config_error():
    env = settings_env(PARLEY_CHAT_RETENTION_MAX_AGE="30m")
    with pytest.raises(ConfigError) as caught:
        ChatSettings.from_env(Env(env))
    assert str(caught.value) == (
        "PARLEY_CHAT_RETENTION_MIN_AGE: must not exceed PARLEY_CHAT_RETENTION_MAX_AGE (1800s), "
        "got 3600s"
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PARLEY_CHAT_RETENTION_MAX_AGE", "a month"),
        ("PARLEY_CHAT_RETENTION_MAX_AGE", "-1d"),
        ("PARLEY_CHAT_RETENTION_MAX_AGE", "3651d"),
        ("PARLEY_CHAT_RETENTION_MAX_MESSAGES", "many"),
        ("PARLEY_CHAT_RETENTION_MAX_MESSAGES", "-1"),
        ("PARLEY_CHAT_RETENTION_MAX_MESSAGES", "1000000001"),
        ("PARLEY_CHAT_RETENTION_INTERVAL", "0"),
        ("PARLEY_CHAT_RETENTION_INTERVAL", "2d"),
        ("PARLEY_CHAT_RETENTION_INTERVAL", "often"),
        ("PARLEY_CHAT_RETENTION_BATCH", "0"),
        ("PARLEY_CHAT_RETENTION_BATCH", "10001"),
        ("PARLEY_CHAT_RETENTION_BATCH", "1e3"),
        ("PARLEY_CHAT_RETENTION_MIN_AGE", "59s"),
        ("PARLEY_CHAT_RETENTION_MIN_AGE", "31d"),
        ("PARLEY_CHAT_RETENTION_MIN_AGE", "0"),
        ("PARLEY_CHAT_RETENTION_MIN_AGE", "a while"),
    ],
)
def test_a_bad_retention_setting_is_a_one_line_config_error(variable, value):
    with pytest.raises(ConfigError) as caught:
        ChatSettings.from_env(Env(settings_env(**{variable: value})))
    assert caught.value.variable == variable
    message = str(caught.value)
    assert message.startswith(f"{variable}: ") and "\n" not in message


def test_the_command_stops_on_a_bad_retention_setting_with_one_line():
    env = settings_env(
        PARLEY_CHAT_RETENTION_BATCH="0", PARLEY_GRPC_PORT="0", PARLEY_METRICS_PORT="0"
    )
    done = run_to_exit("chat", env, timeout=60)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "parley-chat: configuration error: PARLEY_CHAT_RETENTION_BATCH: must be between 1 and "
        "10000, got 0"
    ]


# --- What the sweeper deletes ---------------------------------------------------------------


async def test_count_retention_deletes_the_oldest_in_batches_of_the_configured_size(database):
    await seed(database, "busy", 50)
    await seed(database, "quiet", 10)
    async with sweeper_on(database, max_age=0, max_messages=20, batch=7) as sweeper:
        done = await sweeper.sweep()
        assert (done.count, done.age, done.rooms, done.yielded) == (30, 0, {"busy"}, False)
        assert sweeper.batches == [("busy", 7)] * 4 + [("busy", 2)]
        assert await sequences(database, "busy") == list(range(31, 51))
        assert await sequences(database, "quiet") == list(range(1, 11))
        assert await last_sequence(database, "busy") == 50
        assert (sweeper.deleted("count"), sweeper.deleted("age")) == (30, 0)
        assert sweeper.metrics.last_sweep._value.get() > 0
        # Nothing more to do: the next sweep deletes nothing and runs no batch.
        again = await sweeper.sweep()
        assert (again.deleted, again.batches) == (0, 0)


async def test_age_retention_deletes_only_the_expired_front_of_each_room(database):
    await seed(database, "old-front", 30, old=range(1, 13))
    # Sequence 7 is older than 6: two sends whose timestamps crossed. It waits for 6 rather
    # than leave a hole.
    await seed(database, "crossed", 10, old=[1, 2, 3, 4, 5, 7])
    await seed(database, "all-old", 4, old=range(1, 5))
    await seed(database, "young", 5)
    async with sweeper_on(database, max_age=86400.0, max_messages=0, batch=5) as sweeper:
        done = await sweeper.sweep()
        assert (done.age, done.count) == (12 + 5 + 4, 0)
        assert await sequences(database, "old-front") == list(range(13, 31))
        assert await sequences(database, "crossed") == list(range(6, 11))
        assert await sequences(database, "all-old") == []
        assert await sequences(database, "young") == list(range(1, 6))
        assert [deleted for room, deleted in sweeper.batches if room == "old-front"] == [5, 5, 2]
        assert all(deleted <= 5 for _, deleted in sweeper.batches)
        assert await last_sequence(database, "all-old") == 4
        assert sweeper.deleted("age") == 21


async def test_age_retention_reads_the_expired_rows_a_page_at_a_time(database):
    """Rooms whose old messages were stored at different times, read three expired rows at a
    time from the create_time index: every expired front goes, nothing else."""
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        for number in range(8):
            room = f"paged-{number}"
            await conn.execute(
                "INSERT INTO chat_rooms (name, last_sequence) VALUES (%s, 6)", (room,)
            )
            # Messages 1-4 of each room are old, each room's a minute apart; 5-6 are new.
            await conn.execute(
                "INSERT INTO chat_messages (room, sequence, user_id, user_name, text, create_time)"
                " SELECT %s, g, 1, 'seed', 'm',"
                "  CASE WHEN g <= 4 THEN now() - interval '3 days' - %s * interval '1 minute'"
                "   + g * interval '1 second' ELSE now() END"
                " FROM generate_series(1, 6) AS g",
                (room, number),
            )
    async with sweeper_on(database, scan_page=3, max_age=86400.0, max_messages=0) as sweeper:
        done = await sweeper.sweep()
    assert (done.age, len(done.rooms)) == (32, 8)
    for number in range(8):
        assert await sequences(database, f"paged-{number}") == [5, 6]


async def test_both_limits_together_count_the_reason_of_each_row(database):
    # 1-10 are old and over the count of 5 (counted as count), 11-15 only over the count,
    # 16-20 are kept.
    await seed(database, "both", 20, old=range(1, 11))
    async with sweeper_on(database, max_age=86400.0, max_messages=5, batch=1000) as sweeper:
        done = await sweeper.sweep()
        assert (done.count, done.age) == (15, 0)
        assert await sequences(database, "both") == list(range(16, 21))
    await seed(database, "age-first", 20, old=range(1, 16))
    async with sweeper_on(database, max_age=86400.0, max_messages=10, batch=1000) as sweeper:
        done = await sweeper.sweep()
        assert (done.count, done.age) == (10, 5)
        assert await sequences(database, "age-first") == list(range(16, 21))


async def test_two_sweepers_delete_one_at_a_time_and_nothing_twice(database):
    rooms = [f"room-{i}" for i in range(6)]
    for room in rooms:
        await seed(database, room, 40, old=range(1, 11))
    settings = {"max_age": 86400.0, "max_messages": 25, "batch": 4}
    async with sweeper_on(database, **settings) as first, sweeper_on(database, **settings) as other:
        held = asyncio.Event()
        release = asyncio.Event()

        async def hold_once(room: str, deleted: int) -> None:
            first.hold = None
            held.set()
            await release.wait()

        first.hold = hold_once
        sweeping = asyncio.create_task(first.sweep())
        await asyncio.wait_for(held.wait(), 10)
        # The first holds a batch open: the other finds the lock taken and leaves the sweep.
        yielded = await asyncio.wait_for(other.sweep(), 10)
        assert yielded.yielded and yielded.deleted == 0 and other.batches == []
        assert other.metrics.yielded._value.get() == 1
        assert other.metrics.last_sweep._value.get() == 0
        release.set()
        done = [await sweeping]
        # Now both at once, until one completes a sweep without being interrupted.
        while True:
            results = await asyncio.gather(first.sweep(), other.sweep())
            done += results
            if any(not result.yielded for result in results):
                break
        for room in rooms:
            assert await sequences(database, room) == list(range(16, 41))
        total = sum(result.deleted for result in done)
        assert total == 15 * len(rooms)
        assert sum(n for _, n in first.batches + other.batches) == total
        assert all(n <= 4 for _, n in first.batches + other.batches)


async def test_sends_complete_while_a_batch_holds_its_locks(database, make_stack, chat):
    stack = await make_stack(replicas=1, people=("Ada",), **NO_RETENTION)
    await seed(database, "swept", 300, old=range(1, 301))
    ada = stack.people["Ada"]
    sender = await chat(ada, stack.replicas[0], room="swept")
    await sender.send("before")
    await _echoed(sender, 1)
    assert sender.received[-1].sequence == 301
    acknowledged_inside: list[int] = []

    async def send_during_the_batch(room: str, deleted: int) -> None:
        if acknowledged_inside:
            return
        assert deleted == 100
        # This batch has deleted its rows, holds their locks and the sweep lock, and has not
        # committed: sends into the same room must still complete.
        for text in ("during 1", "during 2", "during 3"):
            await sender.send(text)
        await _echoed(sender, 4)
        acknowledged_inside.extend(m.sequence for m in sender.received[1:])

    async with sweeper_on(database, max_age=86400.0, max_messages=0, batch=100) as sweeper:
        sweeper.hold = send_during_the_batch
        done = await sweeper.sweep()
    assert acknowledged_inside == [302, 303, 304]
    assert done.age == 300
    await sender.send("after")
    await _echoed(sender, 5)
    assert [m.sequence for m in sender.received] == [301, 302, 303, 304, 305]
    assert await sequences(database, "swept") == [301, 302, 303, 304, 305]
    assert await last_sequence(database, "swept") == 305


async def _echoed(client: Any, count: int) -> None:
    """Waits until `client` has received `count` messages; fails when its stream ends first."""

    def arrived() -> bool:
        if client.ended and len(client.received) < count:
            raise AssertionError(f"the stream ended: {client.error}")
        return len(client.received) >= count

    await wait_until(arrived, 10, f"{count} messages on {client.name}")


async def test_a_replica_sweeps_by_itself_every_interval_and_counts_it(
    database, make_stack, metrics
):
    """The sweeper a chat replica starts: it deletes what goes over the limits without being
    asked, again as the room grows, and its metrics say so."""
    stack = await make_stack(
        replicas=1,
        people=(),
        PARLEY_CHAT_RETENTION_MAX_MESSAGES="10",
        PARLEY_CHAT_RETENTION_MAX_AGE="1d",
        PARLEY_CHAT_RETENTION_INTERVAL="0.1s",
        PARLEY_CHAT_RETENTION_BATCH="4",
    )
    # Older than PARLEY_CHAT_RETENTION_MIN_AGE (1h by default), younger than the age limit.
    await seed(database, "by-itself", 30, old=[1, 2], recent="2 hours")
    expected = list(range(21, 31))

    async def swept() -> bool:
        return await sequences(database, "by-itself") == expected

    await wait_until(swept, 20, "the replica to delete messages 1-20")
    port = stack.replicas[0].metrics_port
    found: dict[str, float] = {}

    async def counted() -> bool:
        found.update(await metrics(port))
        # The sweep that deleted them may still be pausing after its last batch.
        return (
            found['parley_chat_retention_deleted_messages_total{reason="count"}'] == 20
            and found["parley_chat_retention_last_sweep_timestamp_seconds"] > 0
        )

    await wait_until(counted, 10, "the deletions to be counted and a sweep completed")
    assert found['parley_chat_retention_deleted_messages_total{reason="age"}'] == 0
    assert found["parley_chat_retention_batch_duration_seconds_count"] >= 5
    assert found["parley_chat_retention_last_sweep_timestamp_seconds"] > 0
    assert found["parley_chat_retention_sweep_failures_total"] == 0
    assert await last_sequence(database, "by-itself") == 30


# --- The signal -----------------------------------------------------------------------------


def _stub(stack: Any, channels: Any) -> Any:
    return chat_pb2_grpc.ChatServiceStub(channels.get(stack.replicas[0].target))


async def test_a_resume_point_before_the_kept_history_is_refused_with_first_sequence(
    database, make_stack, chat, details, channels
):
    stack = await make_stack(replicas=1, people=("Ada",), **NO_RETENTION)
    await seed(database, "kept", 50)
    # A room is swept by count once it is over by a batch at least: 20 over, batches of 20.
    async with sweeper_on(database, max_age=0, max_messages=30, batch=20) as sweeper:
        assert (await sweeper.sweep()).count == 20
    ada = stack.people["Ada"]
    stub = _stub(stack, channels)
    page = await stub.ListMessages(
        chat_pb2.ListMessagesRequest(room="kept", page_size=5),
        metadata=bearer(ada.token),
        timeout=10,
    )
    assert (page.first_sequence, page.last_sequence) == (21, 50)
    assert [m.sequence for m in page.messages] == [21, 22, 23, 24, 25]
    older = await stub.ListMessages(
        chat_pb2.ListMessagesRequest(room="kept", before_sequence=30),
        metadata=bearer(ada.token),
        timeout=10,
    )
    assert older.first_sequence == 21 and older.messages[0].sequence == 21
    for point in ("0", "5", "19", "0019"):
        client = await chat(ada, stack.replicas[0], room="kept", resume_after=point)
        assert await client.wait_until_ended() == grpc.StatusCode.OUT_OF_RANGE
        error = details(client.error)
        assert error.reason == RESUME_EXPIRED == "RESUME_POINT_EXPIRED"
        assert error.metadata == {FIRST_SEQUENCE_KEY: "21"}
        assert "resume after 20" in error.message
        assert client.received == []
    # Exactly at first_sequence - 1: everything kept, then live.
    client = await chat(ada, stack.replicas[0], room="kept", resume_after=20)
    await _echoed(client, 30)
    await client.send("live")
    await _echoed(client, 31)
    assert client.sequences == list(range(21, 52))
    assert client.error is None and not client.ended


async def test_a_room_whose_every_message_went(database, make_stack, chat, details, channels):
    stack = await make_stack(replicas=1, people=("Ada",), **NO_RETENTION)
    await seed(database, "emptied", 12, old=range(1, 13))
    async with sweeper_on(database, max_age=86400.0, max_messages=0) as sweeper:
        assert (await sweeper.sweep()).age == 12
    ada = stack.people["Ada"]
    page = await _stub(stack, channels).ListMessages(
        chat_pb2.ListMessagesRequest(room="emptied"), metadata=bearer(ada.token), timeout=10
    )
    assert (page.first_sequence, page.last_sequence, list(page.messages)) == (13, 12, [])
    expired = await chat(ada, stack.replicas[0], room="emptied", resume_after=3)
    assert await expired.wait_until_ended() == grpc.StatusCode.OUT_OF_RANGE
    assert details(expired.error).metadata == {FIRST_SEQUENCE_KEY: "13"}
    caught_up = await chat(ada, stack.replicas[0], room="emptied", resume_after=12)
    await caught_up.send("next")
    await _echoed(caught_up, 1)
    assert caught_up.sequences == [13]
    # A room made on first use and not yet: empty, first sequence 1.
    never = await _stub(stack, channels).ListMessages(
        chat_pb2.ListMessagesRequest(room="not-yet"), metadata=bearer(ada.token), timeout=10
    )
    assert (never.first_sequence, never.last_sequence) == (1, 0)


async def test_a_catch_up_that_meets_deleted_messages_ends_with_the_signal(
    database, make_stack, channels, details
):
    """A stream replaying a long history reads its first message, then stops reading: the
    server holds what flow control lets it send. The messages after those are deleted
    meanwhile. Reading on, the client gets what was on its way and then the signal: no gap
    skipped, nothing twice."""
    stack = await make_stack(replicas=1, people=("Ada",), **NO_RETENTION)
    total = 3000
    await seed(database, "long", total, text="x" * 4000)  # 12 MB: far beyond any window
    ada = stack.people["Ada"]
    metadata = [*bearer(ada.token), (ROOM_KEY, "long"), (RESUME_KEY, "0")]
    call = _stub(stack, channels).StreamChat(metadata=metadata)
    first = await asyncio.wait_for(call.read(), 10)
    assert first.sequence == 1  # the catch-up is under way
    async with sweeper_on(database, max_age=0, max_messages=100, batch=1000) as sweeper:
        done = await sweeper.sweep()
    assert done.count == total - 100
    got = [first.sequence]
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        while True:
            message = await asyncio.wait_for(call.read(), 10)
            assert message is not grpc.aio.EOF, "the stream ended without the signal"
            got.append(message.sequence)
    assert ended.value.code() == grpc.StatusCode.OUT_OF_RANGE
    error = details(ended.value)
    assert error.reason == RESUME_EXPIRED
    # The first kept message when the stream found the gap: after one of the batches.
    first_kept = int(error.metadata[FIRST_SEQUENCE_KEY])
    assert first_kept in (1001, 2001, 2901), error.metadata
    assert "fell behind" in error.message
    assert got == list(range(1, len(got) + 1)), "a gap or a duplicate before the signal"
    assert got[-1] + 1 < first_kept
    assert f"messages {got[-1] + 1}-{first_kept - 1} are no longer kept" in error.message


@pytest.mark.parametrize(
    ("point", "code"),
    [
        ("-1", grpc.StatusCode.INVALID_ARGUMENT),
        ("abc", grpc.StatusCode.INVALID_ARGUMENT),
        ("1.5", grpc.StatusCode.INVALID_ARGUMENT),
        ("99999999999999999999", grpc.StatusCode.INVALID_ARGUMENT),
        ("9" * 5000, grpc.StatusCode.INVALID_ARGUMENT),
        ("9223372036854775807", grpc.StatusCode.OUT_OF_RANGE),
        ("51", grpc.StatusCode.OUT_OF_RANGE),
    ],
)
async def test_hostile_resume_points_in_a_room_with_deleted_history(
    database, make_stack, chat, details, point, code
):
    stack = await make_stack(replicas=1, people=("Ada",), **NO_RETENTION)
    await seed(database, "hostile", 50)
    async with sweeper_on(database, max_age=0, max_messages=10, batch=40) as sweeper:
        assert (await sweeper.sweep()).count == 40
    client = await chat(stack.people["Ada"], stack.replicas[0], room="hostile", resume_after=point)
    assert await client.wait_until_ended() == code
    error = details(client.error)
    if code == grpc.StatusCode.OUT_OF_RANGE:
        assert error.reason == "RESUME_POINT_NOT_IN_ROOM"  # past the last: not an expiry
    assert client.received == []


# --- The least age, the count threshold, ties, failures -------------------------------------


async def _store_on(url: str, **options: Any) -> AsyncIterator[tuple[Database, MessageStore]]:
    db = Database(
        DatabaseSettings.from_env(Env({"PARLEY_DATABASE_URL": url})),
        application_name="parley-retention-test",
    )
    await db.open()
    try:
        yield db, MessageStore(db, rate=1000.0, burst=1000, **options)
    finally:
        await db.close()


store_on = contextlib.asynccontextmanager(_store_on)


async def _version(url: str, room: str) -> int:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute("SELECT access_version FROM chat_rooms WHERE name = %s", (room,))
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


async def test_a_resend_within_the_least_age_is_answered_with_the_stored_message(database):
    """A client resends a message it has no acknowledgement for (as a session does after a
    history gap): however far over the count its room is, the message is younger than
    PARLEY_CHAT_RETENTION_MIN_AGE, so the sweep keeps it and the resend is not stored again."""
    await seed(database, "resent", 40, old=range(1, 11))
    async with store_on(database) as (_db, store):
        version = await _version(database, "resent")
        first = await store.append(
            "resent", 7, "Ada", "hello", "client-1", version=version, timeout=10
        )
        assert first.outcome == "new" and first.message is not None
        assert first.message.sequence == 41
        settings = {"max_age": 86400.0, "max_messages": 5, "min_age": 3600.0, "batch": 10}
        async with sweeper_on(database, **settings) as sweeper:
            done = await sweeper.sweep()
        # Only the three-day-old front went; 11-41 are younger than an hour: the count limit
        # of 5 waits for them.
        assert (done.count + done.age, done.failures) == (10, 0)
        assert await sequences(database, "resent") == list(range(11, 42))
        again = await store.append(
            "resent", 7, "Ada", "hello", "client-1", version=version, timeout=10
        )
        assert again.outcome == "resent" and again.message is not None
        assert again.message.sequence == 41
        assert await last_sequence(database, "resent") == 41


async def test_the_least_age_holds_for_the_age_limit_too(database):
    # 1-5 three days old, 6 an hour and a half old, 7-8 five minutes old.
    await seed(database, "aging", 8, old=range(1, 6))
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        await conn.execute(
            "UPDATE chat_messages SET create_time = now() - CASE WHEN sequence = 6"
            " THEN interval '90 minutes' ELSE interval '5 minutes' END"
            " WHERE room = 'aging' AND sequence > 5"
        )
    settings = {"max_age": 60.0, "max_messages": 0, "min_age": 3600.0}
    async with sweeper_on(database, **settings) as sweeper:
        assert (await sweeper.sweep()).age == 6
    assert await sequences(database, "aging") == [7, 8]


async def test_a_room_is_swept_by_count_once_it_is_a_batch_over(database):
    """Each over-limit room costs a transaction a sweep: a room goes by count only once it is
    over by a whole batch, and then down to the limit, so a room holds between max_messages
    and max_messages + batch - 1."""
    await seed(database, "nearly", 10 + 4)  # 4 over: less than a batch
    await seed(database, "over", 10 + 5)  # a batch over
    async with sweeper_on(database, max_age=0, max_messages=10, batch=5) as sweeper:
        done = await sweeper.sweep()
        assert (done.count, done.rooms) == (5, {"over"})
        assert sweeper.batches == [("over", 5), ("over", 0)]
    assert await sequences(database, "nearly") == list(range(1, 15))
    assert await sequences(database, "over") == list(range(6, 16))


async def test_the_sweeper_pauses_between_rooms_as_between_batches(database):
    for number in range(3):
        await seed(database, f"pause-{number}", 12)
    pauses: list[float] = []

    async def recorded(delay: float) -> None:
        pauses.append(delay)

    settings = {"max_age": 0, "max_messages": 2, "batch": 10}
    async with sweeper_on(database, pause=recorded, **settings) as sweeper:
        done = await sweeper.sweep()
    # Per room one full batch, and one that finds the rest short of a batch: a pause after
    # each, the last batch of a room included.
    assert done.count == 30
    assert sweeper.batches == [(f"pause-{n}", m) for n in range(3) for m in (10, 0)]
    assert len(pauses) == 6 and all(pause > 0 for pause in pauses)


async def test_the_age_scan_moves_past_rows_that_share_a_timestamp(database):
    """Expired rows that all share one timestamp, read three at a time: the scan pages on
    (create_time, room, sequence), so every room is reached, even after a page of rows that
    cannot go (their room's first message is young)."""
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        cur = await conn.execute("SELECT now() - interval '3 days'")
        row = await cur.fetchone()
        assert row is not None
        stamp = row[0]
        await conn.execute("INSERT INTO chat_rooms (name, last_sequence) VALUES ('a-stuck', 5)")
        # a-stuck (first by name): message 1 young, 2-5 expired, all at one instant.
        await conn.execute(
            "INSERT INTO chat_messages (room, sequence, user_id, user_name, text, create_time)"
            " SELECT 'a-stuck', g, 1, 'seed', 'm', CASE WHEN g = 1 THEN now() ELSE %s END"
            " FROM generate_series(1, 5) AS g",
            (stamp,),
        )
        for number in range(4):
            room = f"tied-{number}"
            await conn.execute(
                "INSERT INTO chat_rooms (name, last_sequence) VALUES (%s, 3)", (room,)
            )
            await conn.execute(
                "INSERT INTO chat_messages (room, sequence, user_id, user_name, text, create_time)"
                " SELECT %s, g, 1, 'seed', 'm', %s FROM generate_series(1, 3) AS g",
                (room, stamp),
            )
        cur = await conn.execute(
            "SELECT count(DISTINCT create_time) FROM chat_messages"
            " WHERE create_time < now() - interval '1 day'"
        )
        assert await cur.fetchone() == (1,)
    async with sweeper_on(database, scan_page=3, max_age=86400.0, max_messages=0) as sweeper:
        done = await sweeper.sweep()
    assert done.age == 12
    assert await sequences(database, "a-stuck") == [1, 2, 3, 4, 5]
    for number in range(4):
        assert await sequences(database, f"tied-{number}") == []


async def test_a_failing_room_is_counted_and_the_sweep_goes_on(database, caplog):
    """One room's batch fails (a statement timeout, say): the sweep logs its cause, counts it,
    and still sweeps the other rooms by count and by age."""
    await seed(database, "bad", 20)
    await seed(database, "good", 20)
    await seed(database, "old", 4, old=range(1, 5))

    async def fail_in_bad(room: str, deleted: int) -> None:
        if room == "bad":
            raise psycopg.errors.QueryCanceled("canceling statement due to statement timeout")

    async with sweeper_on(database, max_age=86400.0, max_messages=10, batch=10) as sweeper:
        sweeper.hold = fail_in_bad
        with caplog.at_level("WARNING", logger="parley.chat.retention"):
            done = await sweeper.sweep()
        assert (done.failures, done.count, done.age, done.yielded) == (1, 10, 4, False)
        assert sweeper.metrics.failures._value.get() == 1
        assert sweeper.metrics.last_sweep._value.get() == 0  # not a whole sweep
        assert "room 'bad'" in caplog.text and "statement timeout" in caplog.text
        assert await sequences(database, "bad") == list(range(1, 21))  # rolled back
        assert await sequences(database, "good") == list(range(11, 21))
        assert await sequences(database, "old") == []
        sweeper.hold = None
        again = await sweeper.sweep()
        assert (again.failures, again.count) == (0, 10)
        assert sweeper.metrics.last_sweep._value.get() > 0


async def test_a_refusal_during_a_sweep_names_a_point_the_sweep_will_not_delete(database):
    """While a count sweep of a room is under way, the room grows; a stream refused for its
    resume point meanwhile is told the horizon of the count limit, which that sweep does not
    delete (its cutoff was fixed when it began the room), rather than the first message
    still stored, which it goes on deleting."""
    await seed(database, "moving", 100)
    told: list[tuple[int, int]] = []
    async with store_on(database, max_messages=10) as (_db, store):

        async def between_batches(room: str, deleted: int) -> None:
            if len(sweeper.batches) == 2:
                async with await psycopg.AsyncConnection.connect(database, autocommit=True) as c:
                    await c.execute(
                        "UPDATE chat_rooms SET last_sequence = 105 WHERE name = %s", (room,)
                    )
                    await c.execute(
                        "INSERT INTO chat_messages (room, sequence, user_id, user_name, text)"
                        " SELECT %s, g, 1, 'seed', 'new' FROM generate_series(101, 105) AS g",
                        (room,),
                    )
                told.append(await store.kept(room))

        async with sweeper_on(database, max_age=0, max_messages=10, batch=20) as sweeper:
            sweeper.hold = between_batches
            done = await sweeper.sweep()
    # The first batch committed (1-20 gone); 5 messages came during the second.
    assert told == [(21, 96)]
    # The sweep deleted up to its cutoff, 90, and no further: 96 is still there.
    assert done.count == 90
    assert await sequences(database, "moving") == list(range(91, 106))


async def test_a_replica_with_a_count_limit_refuses_with_the_horizon(
    database, make_stack, chat, details
):
    """The room holds 6-50 (1-5 gone) and the replica keeps 10 a room: a stream resuming
    after 2 is told to go on from 41, not 6 (6-40 are about to go), so one sweep makes one
    gap. Its own sweeper deletes nothing here: every message is younger than the least age."""
    stack = await make_stack(
        replicas=1,
        people=("Ada",),
        PARLEY_CHAT_RETENTION_MAX_AGE="0",
        PARLEY_CHAT_RETENTION_MAX_MESSAGES="10",
        PARLEY_CHAT_RETENTION_INTERVAL="1d",
    )
    await seed(database, "busy-room", 50)
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        await conn.execute("DELETE FROM chat_messages WHERE room = 'busy-room' AND sequence <= 5")
    ada = stack.people["Ada"]
    client = await chat(ada, stack.replicas[0], room="busy-room", resume_after=2)
    assert await client.wait_until_ended() == grpc.StatusCode.OUT_OF_RANGE
    error = details(client.error)
    assert error.reason == RESUME_EXPIRED
    assert error.metadata == {FIRST_SEQUENCE_KEY: "41"}
    # A point whose next message is still stored is no refusal, over the count or not.
    kept = await chat(ada, stack.replicas[0], room="busy-room", resume_after=5)
    await _echoed(kept, 45)
    assert kept.sequences == list(range(6, 51))


async def _waiting_on(url: str, relation: str, query: str) -> bool:
    """Whether a session whose statement starts with `query` waits for a lock on `relation`
    (a table, or 'transactionid' for another transaction's row)."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_locks AS l JOIN pg_stat_activity AS a ON a.pid = l.pid"
            " WHERE NOT l.granted AND a.datname = current_database() AND a.query LIKE %s"
            " AND (l.locktype = %s OR l.relation = to_regclass(%s))",
            (query + "%", relation, relation),
        )
        row = await cur.fetchone()
        return bool(row and row[0])


async def test_a_resend_racing_a_deletion_is_never_an_internal_error(database):
    """Two sends of one client id race: the first commits while the second waits on the
    unique index, which then fails the second. Before the second can read the first, that
    row is deleted (a room's front going, say). The second is stored anew rather than
    failing with an assertion (INTERNAL)."""
    await seed(database, "raced", 3)
    version = await _version(database, "raced")
    other = await psycopg.AsyncConnection.connect(database)
    locker = await psycopg.AsyncConnection.connect(database)
    try:
        await other.execute(
            "INSERT INTO chat_messages (room, sequence, user_id, user_name, text,"
            " client_message_id) VALUES ('raced', 100, 7, 'Ada', 'hi', 'dup')"
        )
        async with store_on(database) as (_db, store):
            sending = asyncio.create_task(
                store.append("raced", 7, "Ada", "hi", "dup", version=version, timeout=30)
            )
            await wait_until(
                lambda: _waiting_on(database, "transactionid", "\nWITH existing"),
                20,
                "the send to wait on the unique index",
            )
            locking = asyncio.create_task(
                locker.execute("LOCK TABLE chat_rooms IN ACCESS EXCLUSIVE MODE")
            )
            await wait_until(
                lambda: _waiting_on(database, "chat_rooms", "LOCK TABLE"), 20, "the lock"
            )
            await other.commit()  # the send fails on the unique index; the lock is taken
            await asyncio.wait_for(locking, 20)
            await wait_until(
                lambda: _waiting_on(database, "chat_rooms", ""), 20, "the send to read again"
            )
            await locker.execute("DELETE FROM chat_messages WHERE client_message_id = 'dup'")
            await locker.commit()
            appended = await asyncio.wait_for(sending, 20)
        assert appended.outcome == "new" and appended.message is not None
        assert (appended.message.sequence, appended.message.client_message_id) == (4, "dup")
        assert await sequences(database, "raced") == [1, 2, 3, 4]
    finally:
        await other.close()
        await locker.close()
