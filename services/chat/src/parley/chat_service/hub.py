"""In-process fan-out: each replica's streams, by room, with bounded per-stream buffers."""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict, deque
from collections.abc import Callable
from typing import NamedTuple

from parley.chassis import ServiceError
from parley.proto import chat_pb2

from .metrics import ChatMetrics

__all__ = ["Outgoing", "RoomHub", "Subscriber", "outgoing"]

_ids = itertools.count(1)

# How long a message that arrives ahead of its room's next sequence waits for the ones before
# it. Two replicas writing to one room interleave their sequences, and a replica's own message
# (delivered after its publish to Redis returns) often arrives before the other replica's
# previous one, which this replica reads from Postgres once Redis says it is there. Waiting
# this long puts them back in order in memory; without it, every stream of the room re-read
# the gap from Postgres (a fifth of a replica's time at saturation). A gap still open after
# the wait is left to the streams, which fill it from Postgres.
REORDER_WAIT = 0.05


class Outgoing(NamedTuple):
    """A stored message on its way to the streams of its room, serialized once for all."""

    message: chat_pb2.ChatMessage
    payload: bytes  # the message's wire form, written as is to every stream
    stored_at: float  # its create_time, in seconds since the epoch


def outgoing(message: chat_pb2.ChatMessage, payload: bytes | None = None) -> Outgoing:
    """`message` ready for fan-out; `payload` is its serialized form when already at hand."""
    return Outgoing(
        message,
        message.SerializeToString() if payload is None else payload,
        message.create_time.seconds + message.create_time.nanos / 1e9,
    )


class Subscriber:
    """One stream's inbox. It never holds more than `limit` messages: on overflow it drops
    them all and becomes `lagging`, and its stream catches up from Postgres instead."""

    def __init__(self, room: str, user_id: int, limit: int, metrics: ChatMetrics) -> None:
        self.id = next(_ids)
        self.room = room
        self.user_id = user_id
        self.user_name = ""
        self._limit = limit
        self._metrics = metrics
        self._buffer: deque[Outgoing] = deque()
        self._ready = asyncio.Event()
        self._lagging = False
        self._error: ServiceError | None = None
        self.active = True

    def offer(self, item: Outgoing) -> None:
        if self._lagging or self._error is not None:
            return
        if len(self._buffer) >= self._limit:
            self._buffer.clear()
            self._lagging = True
            self._metrics.slow_readers.inc()
        else:
            self._buffer.append(item)
        self._ready.set()

    def catch_up(self) -> None:
        """Makes the stream re-read the room from Postgres (after a gap it cannot see)."""
        self._buffer.clear()
        self._lagging = True
        self._ready.set()

    def close(self, error: ServiceError) -> None:
        """Ends the stream with `error` as soon as its delivery loop wakes up."""
        self._error = error
        self._ready.set()

    async def next(self) -> Outgoing | None:
        """The next buffered message, or None when the stream must catch up from Postgres."""
        while True:
            if self._error is not None:
                raise self._error
            if self._lagging:
                self._lagging = False
                self._buffer.clear()
                return None
            if self._buffer:
                return self._buffer.popleft()
            self._ready.clear()
            await self._ready.wait()


class RoomHub:
    """The rooms of this replica and their subscribers."""

    def __init__(
        self, metrics: ChatMetrics, queue_limit: int, reorder_wait: float = REORDER_WAIT
    ) -> None:
        self._metrics = metrics
        self._queue_limit = queue_limit
        self._reorder_wait = reorder_wait
        self._rooms: dict[str, set[Subscriber]] = defaultdict(set)
        # The highest sequence offered to a room's streams, and messages held back because
        # one before them has not arrived yet (with the timer that stops waiting for it).
        self._heads: dict[str, int] = {}
        self._early: dict[str, dict[int, Outgoing]] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        # Rooms whose head is known to cover what their streams started from (see settle).
        self._settled: set[str] = set()
        self._opened: Callable[[str], None] | None = None

    def watch_rooms(self, opened: Callable[[str], None]) -> None:
        """Calls `opened(room)` whenever a room gets its first stream on this replica."""
        self._opened = opened

    def join(self, room: str, user_id: int) -> Subscriber:
        subscriber = Subscriber(room, user_id, self._queue_limit, self._metrics)
        new = room not in self._rooms
        self._rooms[room].add(subscriber)
        self._metrics.streams.inc()
        if new and self._opened is not None:
            self._opened(room)
        return subscriber

    def leave(self, subscriber: Subscriber) -> None:
        members = self._rooms.get(subscriber.room)
        subscriber.active = False
        if members is not None and subscriber in members:
            members.discard(subscriber)
            self._metrics.streams.dec()
            if not members:
                del self._rooms[subscriber.room]
                self._heads.pop(subscriber.room, None)
                self._settled.discard(subscriber.room)
                self._drop_early(subscriber.room)

    def has_streams(self, room: str) -> bool:
        return bool(self._rooms.get(room))

    def position(self, room: str) -> int | None:
        """The highest sequence offered to the room's streams (or known to be covered by
        their starting points); None until the room is settled, or when it has no streams."""
        if room not in self._settled:
            return None
        return self._heads.get(room, 0)

    def settle(self, room: str, stored: int, newest: Outgoing | None) -> None:
        """Gives a newly opened room its position: `stored`, its last sequence as read after
        its first stream joined, and `newest`, that message (None when there is none).

        A stream reads its own starting point after joining, so one may have started before
        `stored`; offering it `newest` makes it fill anything in between from Postgres itself,
        while a stream that started at `stored` just skips it.
        """
        members = self._rooms.get(room)
        if not members:
            return
        self._settled.add(room)
        head = self._heads.get(room)
        if head is not None and head >= stored:
            return  # every stream here was offered a message at least that new
        self._heads[room] = stored
        if newest is not None:
            for subscriber in members:
                subscriber.offer(newest)

    def deliver(self, item: Outgoing) -> None:
        """Offers a stored message to every local stream of its room, in sequence order.

        A message more than one ahead of the room's last one waits up to `reorder_wait` for
        those before it; then it goes out anyway and the streams fill the gap from Postgres.
        """
        message = item.message
        room = message.room
        if not self._rooms.get(room):
            return
        head = self._heads.get(room)
        if head is not None and message.sequence > head + 1:
            early = self._early.setdefault(room, {})
            early[message.sequence] = item
            if room not in self._timers:
                loop = asyncio.get_running_loop()
                self._timers[room] = loop.call_later(self._reorder_wait, self._give_up, room)
            return
        self._offer(room, item)
        self._release(room)

    def _offer(self, room: str, item: Outgoing) -> None:
        sequence = item.message.sequence
        if sequence > self._heads.get(room, 0):
            self._heads[room] = sequence
            early = self._early.get(room)
            if early is not None:  # the same message, held back, from the other source
                early.pop(sequence, None)
        for subscriber in self._rooms.get(room, ()):
            subscriber.offer(item)

    def _release(self, room: str) -> None:
        """Offers held-back messages that are next in line now."""
        early = self._early.get(room)
        if early is None:  # nothing held back (the usual case), so no timer either
            return
        while early:
            item = early.pop(self._heads[room] + 1, None)
            if item is None:
                return
            self._offer(room, item)
        self._drop_early(room)

    def _give_up(self, room: str) -> None:
        """The wait is over: offer what was held back, gaps and all."""
        self._timers.pop(room, None)
        early = self._early.pop(room, {})
        for sequence in sorted(early):
            if sequence > self._heads.get(room, 0):
                self._offer(room, early[sequence])

    def _drop_early(self, room: str) -> None:
        self._early.pop(room, None)
        timer = self._timers.pop(room, None)
        if timer is not None:
            timer.cancel()

    def rooms(self) -> dict[str, int]:
        """Each room with local streams, and the highest sequence seen in it."""
        return {room: self._heads.get(room, 0) for room in self._rooms}

    def subscribers(self) -> list[Subscriber]:
        return [s for members in self._rooms.values() for s in members]

    def catch_up(self, room: str | None = None, *, through: int = 0) -> None:
        """Makes every stream (of one room, or of all) re-read its room from Postgres.

        `through` is the room's stored sequence when known: the re-read covers it, so it
        counts as seen and the next periodic check does not send every stream back again.
        """
        for subscriber in self.subscribers():
            if room is None or subscriber.room == room:
                subscriber.catch_up()
        for held in [room] if room is not None else list(self._early):
            self._drop_early(held)
        if room is not None and room in self._rooms and through > self._heads.get(room, 0):
            self._heads[room] = through

    def close_all(self, error: ServiceError) -> None:
        for subscriber in self.subscribers():
            subscriber.close(error)
