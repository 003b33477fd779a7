"""What comes out of Redis is untrusted input: messages published on a room's channel by
something other than Parley's replicas (here a plain redis-py client, as a second deployment
sharing the Redis and the prefix could) are never delivered and move no stream.

Two `parley-chat serve` replicas with a Redis key prefix of their own, on the session's
database and UserService; the periodic check against Postgres is turned off (an hour), so
what reaches the streams came through the hints. Each test uses a room of its own and compares
what every stream received with what Postgres holds, byte for byte.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from parley.chat_service.bus import presence_key, room_channel
from parley.proto import chat_pb2, chat_pb2_grpc
from parley.proto.contract import ROOM_KEY
from parley.testing import bearer, sample_key, scrape_metrics, wait_until
from parley.testing.launcher import Launcher, Served, chat_env

from .servers import Stack

REASONS = ("too_large", "unreadable", "wrong_room", "bad_sequence", "unconfirmed")
FAR_AHEAD = 9_000_000_000_000
FLOOD = 2000
WARNING = "did not publish"


@dataclass
class Replica:
    server: Served

    @property
    def target(self) -> str:
        return self.server.target

    def samples(self) -> dict[str, float]:
        return scrape_metrics(self.server.metrics_port)


@dataclass
class Pair:
    replicas: list[Replica]
    prefix: str
    redis_url: str

    def channel(self, room: str) -> str:
        return room_channel(self.prefix, room)


@pytest.fixture(scope="module")
def pair(stack: Stack, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    prefix = f"forgery-{uuid.uuid4().hex[:12]}"
    env = chat_env(
        stack.database,
        redis_url,
        prefix,
        stack.user.target,
        PARLEY_SHUTDOWN_GRACE="2",
        PARLEY_CHAT_MAX_STREAMS_PER_USER="1000",
        PARLEY_CHAT_RESYNC_INTERVAL="1h",
    )
    launcher = Launcher(tmp_path_factory.mktemp("forgery"))
    try:
        replicas = [Replica(launcher.process_sync("chat", env)) for _ in range(2)]
        yield Pair(replicas, prefix, redis_url)
    finally:
        launcher.close_sync()


class Client:
    """One StreamChat call of the stack's chatter, reading everything it is sent."""

    def __init__(self, channel: grpc.aio.Channel, token: str, room: str) -> None:
        stub: Any = chat_pb2_grpc.ChatServiceStub(channel)
        self.call = stub.StreamChat(metadata=[*bearer(token), (ROOM_KEY, room)])
        self.received: list[chat_pb2.ChatMessage] = []
        self.error: grpc.aio.AioRpcError | None = None
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for message in self.call:
                self.received.append(message)
        except grpc.aio.AioRpcError as error:
            self.error = error

    async def send(self, text: str) -> None:
        await self.call.write(chat_pb2.ChatMessage(text=text))

    async def close(self) -> None:
        self.call.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


class Room:
    """A fresh room with clients on both replicas, and a Redis client to forge with."""

    def __init__(self, stack: Stack, pair: Pair) -> None:
        self.stack = stack
        self.pair = pair
        self.name = f"forged-{uuid.uuid4().hex[:10]}"
        self.channels = {r.target: grpc.aio.insecure_channel(r.target) for r in pair.replicas}
        self.clients: list[Client] = []
        self.redis = aioredis.Redis.from_url(pair.redis_url, socket_timeout=10)

    def open(self, replica: Replica) -> Client:
        client = Client(self.channels[replica.target], self.stack.chatter_token, self.name)
        self.clients.append(client)
        return client

    async def joined(self) -> None:
        """Waits until presence lists every client: from then on, every new message of the
        room must reach each of them."""
        stub: Any = chat_pb2_grpc.ChatServiceStub(self.channels[self.pair.replicas[0].target])

        async def listed() -> bool:
            reply = await stub.ListPresence(
                chat_pb2.ListPresenceRequest(room=self.name),
                metadata=bearer(self.stack.chatter_token),
                timeout=5,
            )
            return sum(m.stream_count for m in reply.members) == len(self.clients)

        await wait_until(listed, 20, f"{len(self.clients)} streams in {self.name}")

    async def forge(self, *payloads: bytes, channel: str | None = None, receivers: int = 2) -> None:
        """Publishes raw payloads on the room's channel, as anything with access to Redis can;
        `receivers` replicas (both, with streams in the room) must have received each."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for payload in payloads:
                pipe.publish(channel or self.pair.channel(self.name), payload)
            received = await pipe.execute()
        assert received == [receivers] * len(payloads), "subscribed replicas"

    async def stored(self) -> list[tuple[int, int, str, str]]:
        rows = await asyncio.to_thread(
            self.stack.sql,
            "SELECT sequence, user_id, user_name, text FROM chat_messages"
            " WHERE room = %s ORDER BY sequence",
            self.name,
        )
        return [(int(r[0]), int(r[1]), str(r[2]), str(r[3])) for r in rows]

    async def store_unannounced(self, text: str) -> int:
        """Stores a message as a replica would, without publishing it (as if its publish were
        still on its way); returns its sequence."""
        rows = await asyncio.to_thread(
            self.stack.sql,
            "WITH next AS (UPDATE chat_rooms SET last_sequence = last_sequence + 1"
            " WHERE name = %s RETURNING last_sequence)"
            " INSERT INTO chat_messages (room, sequence, user_id, user_name, text)"
            " SELECT %s, last_sequence, %s, %s, %s FROM next RETURNING sequence",
            self.name,
            self.name,
            self.stack.chatter_id,
            self.stack.chatter_name,
            text,
        )
        return int(rows[0][0])

    async def everyone_has(self, count: int, timeout: float = 20) -> None:
        await wait_until(
            lambda: all(len(c.received) >= count for c in self.clients),
            timeout,
            f"every stream to have {count} messages",
        )

    async def check_against_postgres(self, count: int) -> None:
        """Each stream received exactly the stored messages, once each, in order."""
        rows = await self.stored()
        assert [row[0] for row in rows] == list(range(1, count + 1))
        for client in self.clients:
            assert client.error is None, client.error
            got = [(m.sequence, m.user_id, m.user, m.text) for m in client.received]
            assert got == rows

    async def close(self) -> None:
        await asyncio.gather(*(client.close() for client in self.clients))
        await asyncio.gather(*(channel.close() for channel in self.channels.values()))
        await self.redis.aclose()


@pytest.fixture
async def room(stack: Stack, pair: Pair) -> AsyncIterator[Room]:
    opened = Room(stack, pair)
    try:
        yield opened
    finally:
        await opened.close()


def forged(room: str, sequence: int, text: str = "forged", **fields: Any) -> bytes:
    message = chat_pb2.ChatMessage(
        room=room, sequence=sequence, text=text, user="Mallory", user_id=666, **fields
    )
    return message.SerializeToString()


def every_kind(room: str, next_sequence: int) -> dict[str, list[bytes]]:
    """One or two forged messages for each reason they are dropped."""
    return {
        "unconfirmed": [
            forged(room, FAR_AHEAD, "far ahead"),
            forged(room, next_sequence, "the next one, before it exists"),
        ],
        "wrong_room": [forged("elsewhere", next_sequence)],
        "unreadable": [b"\xff\x00 not a protobuf message"],
        "too_large": [forged(room, next_sequence, "x" * 200_000)],
        "bad_sequence": [forged(room, 0), forged(room, -7)],
    }


async def rejected(pair: Pair) -> list[dict[str, float]]:
    """parley_chat_bus_rejected_total by reason, on each replica."""
    found = []
    for replica in pair.replicas:
        samples = await asyncio.to_thread(replica.samples)
        found.append(
            {
                reason: samples.get(
                    sample_key("parley_chat_bus_rejected_total", reason=reason), 0.0
                )
                for reason in REASONS
            }
        )
    return found


async def room_reads(pair: Pair) -> list[float]:
    reads = []
    for replica in pair.replicas:
        samples = await asyncio.to_thread(replica.samples)
        reads.append(samples.get("parley_chat_room_reads_total", 0.0))
    return reads


async def test_forged_messages_are_not_delivered_and_move_no_stream(room: Room, pair: Pair) -> None:
    a, b = pair.replicas
    sender_a, sender_b = room.open(a), room.open(b)
    room.open(a), room.open(b)  # listeners only
    await room.joined()
    await sender_a.send("real 1")
    await room.everyone_has(1)

    before = await rejected(pair)
    kinds = every_kind(room.name, next_sequence=2)
    await room.forge(*(payload for payloads in kinds.values() for payload in payloads))

    async def judged_or_delivered() -> bool:
        if any(len(c.received) > 1 for c in room.clients):
            return True  # something forged got through: the assertion below says what
        now = await rejected(pair)
        return all(now[i]["unconfirmed"] - before[i]["unconfirmed"] == 2 for i in range(2))

    await wait_until(judged_or_delivered, 20, "both replicas to judge the forged messages")
    assert [[m.text for m in c.received] for c in room.clients] == [["real 1"]] * 4

    # A real sequence with forged content: the replicas deliver what Postgres holds for it.
    sequence = await room.store_unannounced("real 2, stored by a replica")
    await room.forge(forged(room.name, sequence, "forged text for a real sequence"))
    await room.everyone_has(2)

    # The real messages that follow reach every stream, from both replicas, interleaved.
    for i in range(3):
        await sender_a.send(f"real from a {i}")
        await sender_b.send(f"real from b {i}")
    await room.everyone_has(8)
    await room.check_against_postgres(8)


async def test_each_forged_message_is_counted_by_its_reason(room: Room, pair: Pair) -> None:
    a, b = pair.replicas
    sender = room.open(a)
    room.open(b)
    await room.joined()
    await sender.send("real 1")
    await room.everyone_has(1)

    before = await rejected(pair)
    kinds = every_kind(room.name, next_sequence=2)
    await room.forge(*(payload for payloads in kinds.values() for payload in payloads))
    # A channel of no room Parley accepts, with a message naming a real room: no replica
    # subscribes to a channel it has no streams for, so it reaches none and costs nothing.
    await room.forge(forged(room.name, 1), channel=pair.channel("NOT A ROOM"), receivers=0)
    expected = {reason: len(payloads) for reason, payloads in kinds.items()}

    last: list[list[dict[str, float]]] = [before]

    async def all_counted() -> bool:
        last[0] = await rejected(pair)
        return all(
            {r: last[0][i][r] - before[i][r] for r in REASONS}
            == {r: expected.get(r, 0) for r in REASONS}
            for i in range(2)
        )

    try:
        await wait_until(all_counted, 20, "every forged message to be counted")
    except pytest.fail.Exception:
        pytest.fail(f"expected {expected} more on each replica; before {before}, now {last[0]}")
    assert [[m.sequence for m in c.received] for c in room.clients] == [[1], [1]]


async def test_a_flood_of_forged_hints_does_not_stop_real_delivery(room: Room, pair: Pair) -> None:
    a, b = pair.replicas
    senders = [room.open(a), room.open(b)]
    for replica in (a, b, a, b):
        room.open(replica)
    await room.joined()
    await senders[0].send("before the flood")
    await room.everyone_has(1)
    logs_before = [r.server.log_text().count(WARNING) for r in pair.replicas]
    reads_before = await room_reads(pair)
    rejected_before = await rejected(pair)

    each = 10
    total = 1 + each * len(senders)
    # First forged content for the sequences the real messages are about to take, then hints
    # far ahead: all before or among the real messages.
    near = [forged(room.name, n, f"forged {n}") for n in range(2, total + 1)]
    far = [forged(room.name, FAR_AHEAD + i, f"flood {i}") for i in range(FLOOD - len(near))]
    started = time.monotonic()

    async def talk() -> None:
        for i in range(each):
            for sender in senders:
                await sender.send(f"real {i}")

    await asyncio.gather(room.forge(*near, *far), talk())
    await room.everyone_has(total, timeout=30)
    took = time.monotonic() - started
    await room.check_against_postgres(total)

    # Every hint far ahead is counted; one for a sequence a real message took is counted only
    # when it was judged before that message was stored.
    async def flood_counted() -> bool:
        now = await rejected(pair)
        return all(
            len(far) <= now[i]["unconfirmed"] - rejected_before[i]["unconfirmed"] <= FLOOD
            for i in range(2)
        )

    await wait_until(flood_counted, 20, f"{len(far)} unconfirmed hints counted on each replica")
    reads = [
        after - before for after, before in zip(await room_reads(pair), reads_before, strict=True)
    ]
    warnings = [
        r.server.log_text().count(WARNING) - before
        for r, before in zip(pair.replicas, logs_before, strict=True)
    ]
    # Hints are judged together, a read at a time per room: far fewer reads than hints, and
    # at most a warning or two in the log, not one a message.
    assert all(n < FLOOD / 10 for n in reads), f"{reads} reads of the room for {FLOOD} hints"
    assert all(n <= 2 for n in warnings), f"{warnings} warnings for {FLOOD} forged hints"
    assert took < 15, f"the real messages took {took:.1f}s to arrive during the flood"


async def test_malformed_presence_entries_are_skipped(room: Room, pair: Pair) -> None:
    a, _ = pair.replicas
    room.open(a)
    await room.joined()
    key = presence_key(pair.prefix, room.name)
    far = time.time() + 3600
    junk: dict[bytes, float] = {
        b"no separators at all": far,
        b"replica|1|not-a-number|Mallory": far,
        b"replica|1|-5|Mallory": far,
        b"replica|1|99999999999999|Mallory": far,
        b"replica|1|\xff\xfe|Mallory": far,
    }
    await room.redis.zadd(key, junk)
    for replica in pair.replicas:
        stub: Any = chat_pb2_grpc.ChatServiceStub(room.channels[replica.target])
        reply = await stub.ListPresence(
            chat_pb2.ListPresenceRequest(room=room.name),
            metadata=bearer(room.stack.chatter_token),
            timeout=5,
        )
        assert [(m.user_id, m.stream_count) for m in reply.members] == [(room.stack.chatter_id, 1)]
