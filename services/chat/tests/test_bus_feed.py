"""The delivery path from Redis to a replica's streams, without gRPC: the Redis bus turns what
arrives on a room's channel into hints, the room feed reads the room from Postgres, the hub
offers what Postgres holds. Real Postgres (a private database), real Redis (a private prefix).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from parley.chat_service.bus import RedisBus, room_channel
from parley.chat_service.feed import REJECT_REASONS, RoomFeed
from parley.chat_service.hub import RoomHub, Subscriber
from parley.chat_service.metrics import ChatMetrics
from parley.proto import chat_pb2
from parley.testing import wait_until

ROOM = "feed"
FAR_AHEAD = 9_000_000_000_000

_COLUMNS = "room, sequence, user_id, user_name, text, client_message_id, create_time"


@dataclass
class Postgres:
    """Reads and writes a room the way the service's store does, counting reads in flight."""

    url: str
    delay: float = 0.0  # seconds each read spends in Postgres (pg_sleep)
    in_flight: int = 0
    most_in_flight: int = 0
    reads: int = 0
    rows_read: list[int] = field(default_factory=list)

    async def _query(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        self.reads += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
                if self.delay:
                    await conn.execute("SELECT pg_sleep(%s)", (self.delay,))
                cur = await conn.execute(query, params)
                return await cur.fetchall()
        finally:
            self.in_flight -= 1

    async def after(
        self, room: str, sequence: int, limit: int
    ) -> tuple[list[chat_pb2.ChatMessage], tuple[int, int] | None]:
        """The messages and the room's (id, access version) (None: no such room), one
        snapshot."""
        rows = await self._query(
            "SELECT r.room_id, r.access_version, m.* FROM chat_rooms r LEFT JOIN LATERAL"
            f" (SELECT {_COLUMNS}"
            " FROM chat_messages WHERE room = r.name AND sequence > %s ORDER BY sequence"
            " LIMIT %s) AS m ON true WHERE r.name = %s ORDER BY m.sequence",
            sequence,
            limit,
            room,
        )
        if not rows:
            return [], None
        messages = []
        for _room_id, _version, *row in rows:
            if row[0] is None:
                continue
            message = chat_pb2.ChatMessage(
                room=row[0], sequence=row[1], user_id=row[2], user=row[3], text=row[4]
            )
            message.create_time.FromDatetime(row[6])
            messages.append(message)
        self.rows_read += [m.sequence for m in messages]
        return messages, (int(rows[0][0]), int(rows[0][1]))

    async def last(self, room: str) -> int:
        rows = await self._query("SELECT last_sequence FROM chat_rooms WHERE name = %s", room)
        return int(rows[0][0]) if rows else 0

    async def store(self, room: str, *texts: str) -> list[int]:
        """Stores messages as a replica would (without publishing them)."""
        sequences = []
        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
            for text in texts:
                cur = await conn.execute(
                    "WITH next AS (INSERT INTO chat_rooms AS r (name, last_sequence)"
                    " VALUES (%s, 1) ON CONFLICT (name) DO UPDATE"
                    " SET last_sequence = r.last_sequence + 1 RETURNING last_sequence)"
                    " INSERT INTO chat_messages (room, sequence, user_id, user_name, text)"
                    " SELECT %s, last_sequence, 7, 'Ada', %s FROM next RETURNING sequence",
                    (room, room, text),
                )
                row = await cur.fetchone()
                assert row is not None
                sequences.append(int(row[0]))
        return sequences


@dataclass
class Parts:
    hub: RoomHub
    feed: RoomFeed
    metrics: ChatMetrics
    registry: CollectorRegistry
    postgres: Postgres

    def rejected(self, reason: str) -> float:
        value = self.registry.get_sample_value("parley_chat_bus_rejected_total", {"reason": reason})
        assert value is not None
        return value

    @property
    def reads(self) -> float:
        value = self.registry.get_sample_value("parley_chat_room_reads_total")
        assert value is not None
        return value

    async def join(self, room: str = ROOM) -> Subscriber:
        """A stream in `room`, once the room has its position."""
        subscriber = self.hub.join(room, 7)
        await wait_until(lambda: self.hub.position(room) is not None, 10, "the room to settle")
        return subscriber


def make_parts(database: str, *, backlog: int = 256, delay: float = 0.0) -> Parts:
    registry = CollectorRegistry()
    metrics = ChatMetrics(registry)
    hub = RoomHub(metrics, queue_limit=backlog)
    postgres = Postgres(database, delay=delay)
    feed = RoomFeed(hub, metrics, postgres.after, postgres.last, backlog=backlog, concurrency=4)
    return Parts(hub, feed, metrics, registry, postgres)


@pytest.fixture
async def parts(database: str) -> AsyncIterator[Parts]:
    made = make_parts(database)
    try:
        yield made
    finally:
        await made.feed.stop()


@pytest.fixture
async def bus(parts: Parts, redis_url: str, redis_prefix: str) -> AsyncIterator[RedisBus]:
    """The bus of the replica under test, subscribed to its prefix on the shared Redis."""
    made = RedisBus(redis_url, redis_prefix, parts.hub, parts.feed, parts.metrics, 3600)
    await made.start()
    try:
        await wait_until(made.subscribed.is_set, 10, "the subscription")
        yield made
    finally:
        await made.stop()


@pytest.fixture
async def make_bus(
    parts: Parts, redis_url: str, redis_prefix: str
) -> AsyncIterator[Callable[..., Awaitable[RedisBus]]]:
    """`await make_bus(url=..., linger=...)`: a started bus of the replica under test (on
    the shared Redis unless `url` says otherwise)."""
    made: list[RedisBus] = []

    async def start(url: str = redis_url, **options: Any) -> RedisBus:
        bus = RedisBus(url, redis_prefix, parts.hub, parts.feed, parts.metrics, 3600, **options)
        made.append(bus)
        await bus.start()
        await wait_until(bus.subscribed.is_set, 10, "the subscription")
        return bus

    try:
        yield start
    finally:
        for bus in made:
            await bus.stop()


@pytest.fixture
async def listeners(redis_url: str, redis_prefix: str) -> AsyncIterator[Callable[[str], Any]]:
    """`await listeners(room)`: how many connections Redis has subscribed to a room's channel."""
    client = aioredis.Redis.from_url(redis_url, socket_timeout=5)

    async def count(room: str) -> int:
        [(_, subscribed)] = await client.pubsub_numsub(room_channel(redis_prefix, room))
        return int(subscribed)

    try:
        yield count
    finally:
        await client.aclose()


@pytest.fixture
async def forger(redis_url: str, redis_prefix: str) -> AsyncIterator[Any]:
    """`await forger(payload, room=ROOM)`: publishes raw bytes on a room's channel."""
    client = aioredis.Redis.from_url(redis_url, socket_timeout=5)

    async def publish(payload: bytes, room: str = ROOM) -> None:
        assert await client.publish(room_channel(redis_prefix, room), payload) == 1

    try:
        yield publish
    finally:
        await client.aclose()


def _shown(item: Any) -> Any:
    return None if item is None else (item.message.sequence, item.message.text)


async def offered(subscriber: Subscriber, quiet: float = 0.2) -> list[Any]:
    """What the stream has been offered (None: told to re-read Postgres), until nothing more
    comes for `quiet` seconds."""
    got: list[Any] = []
    while True:
        try:
            item = await asyncio.wait_for(subscriber.next(), quiet)
        except TimeoutError:
            return got
        got.append(_shown(item))


async def expect(subscriber: Subscriber, wanted: list[Any], timeout: float = 10) -> None:
    """The stream is offered `wanted` (within `timeout` each), then nothing more."""
    got = [_shown(await asyncio.wait_for(subscriber.next(), timeout)) for _ in wanted]
    got += await offered(subscriber)
    assert got == wanted


def forged(sequence: int, text: str = "forged", room: str = ROOM) -> bytes:
    return chat_pb2.ChatMessage(
        room=room, sequence=sequence, text=text, user="Mallory", user_id=666
    ).SerializeToString()


async def test_a_hint_delivers_what_postgres_holds_and_nothing_else(
    parts: Parts, bus: RedisBus, forger: Any
) -> None:
    await parts.postgres.store(ROOM, "first")
    subscriber = await parts.join()
    # Offered the room's newest message when the room opened: a stream that started before it
    # fills the gap, one that started at it skips it.
    await expect(subscriber, [(1, "first")])
    assert parts.hub.position(ROOM) == 1

    # A real sequence with forged text: the stream gets Postgres's text.
    await parts.postgres.store(ROOM, "second, as stored")
    await forger(forged(2, "second, as forged"))
    await expect(subscriber, [(2, "second, as stored")])

    # A sequence Postgres does not hold: nothing offered, nothing moved, one rejection.
    for sequence in (3, FAR_AHEAD):
        await forger(forged(sequence))
    await wait_until(lambda: parts.rejected("unconfirmed") == 2, 10, "two rejections")
    assert await offered(subscriber) == []
    assert parts.hub.position(ROOM) == 2

    # The real third message is delivered when its hint comes.
    await parts.postgres.store(ROOM, "third")
    await forger(forged(3, "a hint may carry anything"))
    await expect(subscriber, [(3, "third")])


async def test_messages_that_are_not_hints_are_counted_by_reason_and_logged_rarely(
    parts: Parts, bus: RedisBus, forger: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="parley.chat.feed")
    subscriber = await parts.join()
    await offered(subscriber)
    for _ in range(50):
        await forger(b"\xff\xfe not a message")
        await forger(forged(1, "x" * 100_000))  # larger than any message Parley publishes
        await forger(forged(1, room="another-room"))
        await forger(forged(0))
        await forger(forged(-5))
    expected = {"unreadable": 50, "too_large": 50, "wrong_room": 50, "bad_sequence": 100}

    def counted() -> bool:
        return all(parts.rejected(r) == expected.get(r, 0) for r in REJECT_REASONS)

    await wait_until(counted, 10, f"rejections {expected}")
    assert await offered(subscriber) == []
    warnings = [r for r in caplog.records if r.name == "parley.chat.feed"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "password" in warnings[0].getMessage()


async def test_hints_arriving_during_a_read_wait_for_one_more_read(database: str) -> None:
    parts = make_parts(database, delay=0.05)
    try:
        subscriber = await parts.join()
        await offered(subscriber)
        reads_before = parts.postgres.reads
        sequences = await parts.postgres.store(ROOM, *(f"m{i}" for i in range(1, 41)))
        for sequence in sequences:  # as if each arrived from Redis, in one burst
            parts.feed.hint(ROOM, sequence)
        for i in range(1000):
            parts.feed.hint(ROOM, FAR_AHEAD + i)
        await wait_until(lambda: parts.rejected("unconfirmed") == 1000, 10, "the flood judged")
        assert await offered(subscriber) == [(s, f"m{s}") for s in sequences]
        assert parts.postgres.most_in_flight == 1
        # One read for the burst (and one to be sure the room ends there).
        assert parts.postgres.reads - reads_before <= 3, parts.postgres.reads - reads_before
        assert parts.hub.position(ROOM) == 40
    finally:
        await parts.feed.stop()


async def test_a_backlog_beyond_what_a_stream_buffers_is_left_to_the_streams(
    database: str,
) -> None:
    parts = make_parts(database, backlog=5)
    try:
        subscriber = await parts.join()
        await offered(subscriber)
        sequences = await parts.postgres.store(ROOM, *(f"m{i}" for i in range(1, 301)))
        parts.feed.hint(ROOM, sequences[-1])
        # At most a page of offers (the stream buffers 5), then the stream is told to re-read
        # Postgres itself, instead of 300 offers overflowing it.
        got = [_shown(await asyncio.wait_for(subscriber.next(), 10))]
        got += await offered(subscriber)
        assert got[-1] is None and None not in got[:-1], got
        assert got[:-1] == [(s, f"m{s}") for s in range(1, len(got))], got
        assert len(got) <= 6, got
        assert parts.hub.position(ROOM) == 300
        assert parts.rejected("unconfirmed") == 0
    finally:
        await parts.feed.stop()


async def test_a_room_without_streams_here_costs_no_read(parts: Parts) -> None:
    tasks = len(asyncio.all_tasks())
    for sequence in (1, 2, FAR_AHEAD):
        parts.feed.hint("nobody-here", sequence)
    parts.feed.wake(["nobody-here"])
    assert len(asyncio.all_tasks()) == tasks, "no read was started"
    assert parts.reads == 0


async def test_a_stream_that_started_before_the_room_settled_is_offered_what_it_missed(
    database: str,
) -> None:
    """A stream reads its starting point just after joining; a message stored after that but
    before the room's position is read must still reach it."""
    parts = make_parts(database, delay=0.2)
    try:
        subscriber = parts.hub.join(ROOM, 7)  # its start: 0, the room is empty
        await parts.postgres.store(ROOM, "stored while the room settled")
        await wait_until(lambda: parts.hub.position(ROOM) == 1, 10, "the room to settle")
        await expect(subscriber, [(1, "stored while the room settled")])
    finally:
        await parts.feed.stop()


def _changes(parts: Parts, change: str) -> float:
    value = parts.registry.get_sample_value(
        "parley_chat_subscription_changes_total", {"change": change}
    )
    assert value is not None
    return value


def _subscribed_rooms(parts: Parts) -> float:
    value = parts.registry.get_sample_value("parley_chat_subscribed_rooms")
    assert value is not None
    return value


async def test_a_replica_subscribes_to_a_room_only_while_it_has_streams_there(
    parts: Parts, make_bus: Any, listeners: Any
) -> None:
    await make_bus(linger=0.2)
    assert await listeners(ROOM) == 0
    assert (_subscribed_rooms(parts), _changes(parts, "subscribe")) == (0, 0)

    first = await parts.join()
    # Settled only after Redis confirmed the subscription.
    assert await listeners(ROOM) == 1
    assert _subscribed_rooms(parts) == 1
    second = await parts.join()
    await parts.join("another")
    assert _changes(parts, "subscribe") == 2  # one per room, not per stream

    parts.hub.leave(first)
    parts.hub.leave(second)
    # After the linger, the last stream having left, the replica unsubscribes.
    await wait_until(lambda: _subscribed_rooms(parts) == 1, 10, "the room's unsubscribe")
    assert await listeners(ROOM) == 0
    assert await listeners("another") == 1
    assert _changes(parts, "unsubscribe") == 1


async def test_a_room_rejoined_within_the_linger_keeps_its_subscription(
    parts: Parts, make_bus: Any, listeners: Any
) -> None:
    await make_bus(linger=60)
    for _ in range(5):
        parts.hub.leave(await parts.join())
    assert await listeners(ROOM) == 1
    assert (_changes(parts, "subscribe"), _changes(parts, "unsubscribe")) == (1, 0)
    assert _subscribed_rooms(parts) == 1


async def test_a_room_is_read_for_its_position_only_once_redis_delivers_its_messages(
    parts: Parts, make_bus: Any, listeners: Any
) -> None:
    """Nothing stored between a room's first read and its subscription can be missed: the
    read comes after Redis confirmed the subscription."""
    subscribed_at_read: list[int] = []
    last = parts.postgres.last

    async def read_last(room: str) -> int:
        subscribed_at_read.append(await listeners(room))
        return await last(room)

    parts.feed._read_last = read_last
    await make_bus(linger=0)
    rooms = [f"room-{index}" for index in range(40)]
    for room in rooms:
        parts.hub.join(room, 7)
    await wait_until(lambda: len(subscribed_at_read) == len(rooms), 10, "every room's read")
    assert subscribed_at_read == [1] * len(rooms)


async def test_a_subscription_redis_does_not_confirm_is_made_again_and_misses_nothing(
    parts: Parts, make_bus: Any, private_redis: Any
) -> None:
    """Redis stops answering (CLIENT PAUSE) while a room's first stream joins: the room is
    read after the confirmation timeout, the connection is made again, and a message stored
    meanwhile, never announced, is offered once the new subscription is confirmed."""
    server = await private_redis()
    redis = aioredis.Redis.from_url(server.url, socket_timeout=10)
    try:
        await make_bus(server.url, confirm_timeout=0.5)
        await parts.postgres.store(ROOM, "before")
        await redis.execute_command("CLIENT", "PAUSE", "1500", "ALL")
        subscriber = parts.hub.join(ROOM, 7)
        # Read after the timeout, though Redis never confirmed.
        await expect(subscriber, [(1, "before")])
        assert _subscribed_rooms(parts) == 0
        await parts.postgres.store(ROOM, "while unconfirmed")  # no hint for it, ever
        await expect(subscriber, [(2, "while unconfirmed")], timeout=15)
        assert _subscribed_rooms(parts) == 1
        reconnects = parts.registry.get_sample_value("parley_chat_redis_reconnects_total")
        assert reconnects is not None and reconnects >= 1
    finally:
        await redis.aclose()


async def test_a_unix_socket_url_subscribes_like_any_other(
    parts: Parts, make_bus: Any, private_redis: Any, redis_prefix: str
) -> None:
    server = await private_redis(unix_socket=True)
    await make_bus(server.unix_url)  # waits for the subscription
    parts.hub.join(ROOM, 7)
    await wait_until(lambda: _subscribed_rooms(parts) == 1, 10, "the room's subscription")
    async with aioredis.Redis.from_url(server.url, socket_timeout=5) as client:
        [(_, count)] = await client.pubsub_numsub(room_channel(redis_prefix, ROOM))
    assert count == 1


async def test_a_redis_that_stops_answering_is_left_and_every_room_read_again(
    parts: Parts, make_bus: Any, private_redis: Any
) -> None:
    """Redis hangs (CLIENT PAUSE) with the connection open, so nothing but the liveness PINGs
    can notice: the bus gives the connection up, subscribes anew once Redis answers, and
    offers a message stored meanwhile that was never announced."""
    server = await private_redis()
    redis = aioredis.Redis.from_url(server.url, socket_timeout=10)
    try:
        await make_bus(server.url, liveness_interval=0.5)
        subscriber = parts.hub.join(ROOM, 7)
        await wait_until(lambda: _subscribed_rooms(parts) == 1, 10, "the room's subscription")
        await redis.execute_command("CLIENT", "PAUSE", "3000", "ALL")
        await parts.postgres.store(ROOM, "while redis hung")  # no hint for it, ever
        await expect(subscriber, [(1, "while redis hung")], timeout=20)
        reconnects = parts.registry.get_sample_value("parley_chat_redis_reconnects_total")
        assert reconnects is not None and reconnects >= 1
    finally:
        await redis.aclose()
