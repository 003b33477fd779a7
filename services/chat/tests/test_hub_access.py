"""The hub's access checks, in memory: a message stored after a change of access waits until
the room's streams have been checked, and only the streams that lost access end."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from parley.chassis import PermissionDenied
from parley.chat_service.hub import RoomHub, Subscriber, outgoing
from parley.chat_service.metrics import ChatMetrics
from parley.proto import chat_pb2
from parley.testing import wait_until

ROOM = "guarded"


ROOM_ID = 100


class Readers:
    """Answers the hub's access reads from `allowed`, one read at a time on request."""

    def __init__(self, version: int, allowed: set[int] | None, room_id: int = ROOM_ID) -> None:
        self.version = version
        self.allowed = allowed
        self.room_id = room_id
        self.asked: list[list[int]] = []
        self.go = asyncio.Event()

    async def __call__(self, room: str, users: list[int]) -> tuple[int, int, set[int]] | None:
        self.asked.append(users)
        await self.go.wait()
        if self.allowed is None:
            return None
        return self.room_id, self.version, self.allowed & set(users)


def item(sequence: int, version: int, room_id: int = ROOM_ID):
    message = chat_pb2.ChatMessage(room=ROOM, sequence=sequence, text=f"m{sequence}")
    return outgoing(message, version=version, room_id=room_id)


def join(hub: RoomHub, user_id: int, version: int = 1, room_id: int = ROOM_ID) -> Subscriber:
    """A stream as StreamChat makes one: joined, then stamped with its own access read."""
    subscriber = hub.join(ROOM, user_id)
    subscriber.room_id, subscriber.version = room_id, version
    return subscriber


async def offered(subscriber: Subscriber) -> list[int] | PermissionDenied:
    """The sequences offered so far, or the error the stream ends with."""
    got: list[int] = []
    while True:
        try:
            next_item = await asyncio.wait_for(subscriber.next(), 0.01)
        except TimeoutError:
            return got
        except PermissionDenied as error:
            return error
        assert next_item is not None
        got.append(next_item.message.sequence)


def make_hub(readers: Readers) -> tuple[RoomHub, CollectorRegistry]:
    registry = CollectorRegistry()
    hub = RoomHub(ChatMetrics(registry), queue_limit=100)
    hub.check_access_with(readers)
    return hub, registry


async def settled(hub: RoomHub) -> None:
    """Waits until no access check of the hub is running: every read it asked for answered,
    every verdict given and every message that waited for it let through."""
    await wait_until(lambda: not hub.checking, 5, "the hub's access checks to finish")


async def until_asked(readers: Readers, count: int) -> None:
    async with asyncio.timeout(5):
        while len(readers.asked) < count:
            await asyncio.sleep(0)


async def test_a_newer_message_waits_for_the_check_and_reaches_only_who_may_read() -> None:
    readers = Readers(version=7, allowed={1})
    hub, registry = make_hub(readers)
    stays, removed = join(hub, 1), join(hub, 2)
    hub.deliver(item(1, version=7))  # stored after a change the streams were not checked at
    await until_asked(readers, 1)
    assert await offered(stays) == [] and await offered(removed) == []  # held back
    readers.go.set()
    await settled(hub)
    assert await offered(stays) == [1]
    result = await offered(removed)
    assert isinstance(result, PermissionDenied) and result.reason == "ROOM_ACCESS_DENIED"
    assert registry.get_sample_value("parley_chat_access_revoked_total") == 1
    # Checked at 7 now: the next message of that version goes out at once.
    hub.deliver(item(2, version=7))
    assert await offered(stays) == [2]
    assert len(readers.asked) == 1
    await hub.stop()


async def test_a_stream_that_joins_during_a_check_is_judged_before_anything_goes_out() -> None:
    # B joins while a read that did not ask about B is in flight, and is removed meanwhile:
    # the message stored after the removal must not reach B, and B's stream must end.
    readers = Readers(version=4, allowed={1})
    hub, _ = make_hub(readers)
    first = join(hub, 1, version=3)
    hub.note_access(ROOM, ROOM_ID, 3)
    await until_asked(readers, 1)
    late = join(hub, 2, version=3)  # its own read came before the removal
    hub.deliver(item(1, version=4))  # stored after the removal
    readers.go.set()
    await settled(hub)
    assert readers.asked[:2] == [[1], [1, 2]]  # asked again, about B too
    assert await offered(first) == [1]
    assert isinstance(await offered(late), PermissionDenied)
    await hub.stop()


async def test_a_stream_checked_at_an_older_version_is_checked_again() -> None:
    readers = Readers(version=5, allowed={1, 2})
    readers.go.set()
    hub, _ = make_hub(readers)
    join(hub, 1, version=5)
    hub.note_access(ROOM, ROOM_ID, 5)
    await until_asked(readers, 1)
    await settled(hub)
    join(hub, 2, version=4)
    hub.note_access(ROOM, ROOM_ID, 4)  # older than the room was checked at: check again
    await until_asked(readers, 2)
    # The periodic check does the same for a stream whose own check is behind.
    stale = join(hub, 2, version=3)
    hub.verify({ROOM: (ROOM_ID, 5)})
    await until_asked(readers, 3)
    await settled(hub)
    assert stale.version == 5
    await hub.stop()


async def test_a_room_made_again_under_the_name_ends_the_old_rooms_streams() -> None:
    # The private room 100 was deleted and a public room 200 made under its name: the old
    # streams end even though everyone may read the new room, and nothing of either room
    # that waited goes to them.
    readers = Readers(version=9, allowed={1, 2, 3}, room_id=200)
    hub, _ = make_hub(readers)
    old = [join(hub, 1, version=5), join(hub, 2, version=5)]
    hub.deliver(item(6, version=8))  # the old room's, stored after a change
    readers.go.set()
    await settled(hub)
    for stream in old:
        assert isinstance(await offered(stream), PermissionDenied)
    new = join(hub, 3, version=9, room_id=200)
    hub.deliver(item(1, version=9, room_id=200))
    await settled(hub)
    assert await offered(new) == [1]
    await hub.stop()


async def test_a_deleted_room_ends_every_stream() -> None:
    readers = Readers(version=0, allowed=None)
    hub, _ = make_hub(readers)
    streams = [join(hub, 1), join(hub, 2)]
    hub.recheck(ROOM)
    readers.go.set()
    await settled(hub)
    for stream in streams:
        assert isinstance(await offered(stream), PermissionDenied)
    await hub.stop()


@pytest.mark.parametrize("newer", [False, True])
async def test_a_message_of_a_checked_version_is_not_held(newer: bool) -> None:
    readers = Readers(version=5, allowed={1})
    hub, _ = make_hub(readers)
    stream = join(hub, 1, version=5)
    hub.note_access(ROOM, ROOM_ID, 5)
    readers.go.set()
    await until_asked(readers, 1)
    await settled(hub)
    if newer:
        # Postgres holds the newer version before any message of it can be read.
        readers.version = 6
        readers.go.clear()
    hub.deliver(item(1, version=6 if newer else 5))
    got = await offered(stream)
    # A newer one waits for a second read, then goes out; an old one goes at once.
    assert got == ([] if newer else [1])
    if newer:
        await until_asked(readers, 2)
        readers.go.set()
        await settled(hub)
        assert await offered(stream) == [1]
    assert len(readers.asked) == (2 if newer else 1)
    await hub.stop()


async def test_a_second_stream_of_a_user_is_not_judged_by_a_read_that_started_before_it() -> None:
    # The user's first stream is in the read; the second joins the room made again (room 200)
    # while that read, of the old room 100, is in flight: only the first one is judged by it.
    readers = Readers(version=5, allowed={1})
    hub, _ = make_hub(readers)
    first = join(hub, 1, version=5)
    hub.note_access(ROOM, 999, 5)  # any stamp the hub has not checked: a read starts
    await until_asked(readers, 1)
    second = join(hub, 1, version=7, room_id=200)
    readers.go.set()
    await settled(hub)
    assert await offered(first) == []
    # The next read finds room 100 (the Readers' room): the second stream, of room 200, ends
    # only then, judged by a read that started after it had joined.
    assert len(readers.asked) >= 2
    assert isinstance(await offered(second), PermissionDenied)
    await hub.stop()
