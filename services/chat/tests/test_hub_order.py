"""The hub puts a room's messages back in sequence order before its streams see them.

Two replicas writing to one room interleave their sequences, so a replica often receives the
other's next message (through Redis) before its own previous one. A short wait in memory puts
them in order; only a gap that stays open makes the streams re-read Postgres.
"""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from parley.chat_service.hub import RoomHub, Subscriber, outgoing
from parley.chat_service.metrics import ChatMetrics
from parley.proto import chat_pb2

ROOM = "order"


def item(sequence: int):
    return outgoing(chat_pb2.ChatMessage(room=ROOM, sequence=sequence, text=f"m{sequence}"))


async def drain(subscriber: Subscriber) -> list[int | None]:
    """What the stream has been offered so far (None: it was told to re-read Postgres)."""
    got: list[int | None] = []
    while True:
        try:
            next_item = await asyncio.wait_for(subscriber.next(), 0.01)
        except TimeoutError:
            return got
        got.append(None if next_item is None else next_item.message.sequence)


def hub(wait: float) -> RoomHub:
    return RoomHub(ChatMetrics(CollectorRegistry()), queue_limit=100, reorder_wait=wait)


async def test_a_message_that_overtook_its_predecessor_waits_for_it() -> None:
    rooms = hub(wait=5.0)
    subscriber = rooms.join(ROOM, 1)
    rooms.deliver(item(1))
    rooms.deliver(item(3))  # 2 is still on its way
    rooms.deliver(item(4))
    assert await drain(subscriber) == [1]
    rooms.deliver(item(2))
    assert await drain(subscriber) == [2, 3, 4]
    rooms.deliver(item(5))
    assert await drain(subscriber) == [5]


async def test_a_gap_that_stays_open_is_left_to_the_streams_after_the_wait() -> None:
    rooms = hub(wait=0.05)
    subscriber = rooms.join(ROOM, 1)
    rooms.deliver(item(1))
    rooms.deliver(item(4))
    rooms.deliver(item(3))
    assert await drain(subscriber) == [1]

    # Once the wait is over the stream gets 3 and 4, in order, and sees the jump from 1
    # itself (it re-reads 2 from Postgres).
    first = await asyncio.wait_for(subscriber.next(), 2.0)
    assert first is not None and first.message.sequence == 3
    assert await drain(subscriber) == [4]
    rooms.deliver(item(2))  # arriving late: offered, and the stream skips what it has
    assert await drain(subscriber) == [2]


async def test_catching_up_from_postgres_drops_what_was_held_back() -> None:
    rooms = hub(wait=5.0)
    subscriber = rooms.join(ROOM, 1)
    rooms.deliver(item(1))
    rooms.deliver(item(3))
    rooms.catch_up(ROOM, through=3)
    assert await drain(subscriber) == [None]  # the stream re-reads everything after its last
    rooms.deliver(item(4))
    assert await drain(subscriber) == [4]
