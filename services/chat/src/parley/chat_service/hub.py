"""In-process fan-out: each replica's streams, by room, with bounded per-stream buffers.

The hub also keeps access control true for the streams it holds. Every message comes with the
room's access version as Postgres read it together with the message (see the 0003
migration). A message with a version newer than the one the room's streams were last checked
at waits while the hub asks Postgres who of the room's streams may still read it, ends the
others with PERMISSION_DENIED, and only then goes out: nothing stored after a change reaches a
stream that the change shut out, whatever order Redis and Postgres answer in.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from parley.chassis import PermissionDenied, ServiceError
from parley.chassis.tasks import cancel_and_wait, detached_task
from parley.proto import chat_pb2

from .metrics import ChatMetrics

__all__ = ["Outgoing", "Readers", "RoomHub", "Stamp", "Subscriber", "denied", "outgoing"]

_ids = itertools.count(1)
_log = logging.getLogger("parley.chat.hub")

# (room id, access version): which room a name stands for, and who may read it as of when.
Stamp = tuple[int, int]
# `await readers(room, user_ids)`: the room's id and access version and which of the users may
# read it, from one snapshot; None when there is no such room.
Readers = Callable[[str, list[int]], Awaitable[tuple[int, int, set[int]] | None]]
# After a check that found nothing new (a forged hint, say), the room's next one waits this long.
_CHECK_PAUSE = 0.02
_RETRY_FIRST, _RETRY_LAST = 0.1, 2.0


def denied(room: str) -> PermissionDenied:
    """The one answer for a room a caller may not read, whether or not it exists."""
    return PermissionDenied(
        f"room {room!r} does not exist, or it is private and you are not a member",
        reason="ROOM_ACCESS_DENIED",
    )


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
    version: int  # the room's access version read with the message (0: not checked)
    room_id: int  # which room the name stood for (0: not known)


def outgoing(
    message: chat_pb2.ChatMessage,
    payload: bytes | None = None,
    *,
    version: int = 0,
    room_id: int = 0,
) -> Outgoing:
    """`message` ready for fan-out; `payload` is its serialized form when already at hand."""
    return Outgoing(
        message,
        message.SerializeToString() if payload is None else payload,
        message.create_time.seconds + message.create_time.nanos / 1e9,
        version,
        room_id,
    )


class Subscriber:
    """One stream's inbox. It never holds more than `limit` messages: on overflow it drops
    them all and becomes `lagging`, and its stream catches up from Postgres instead."""

    def __init__(self, room: str, user_id: int, limit: int, metrics: ChatMetrics) -> None:
        self.id = next(_ids)
        self.room = room
        self.user_id = user_id
        self.user_name = ""
        # The stream's bearer token (to ask UserService about its user again) and when it
        # stops being accepted (seconds since the epoch; 0: never checked).
        self.token = ""
        self.valid_until = 0.0
        # Which room the name stood for when this stream joined, and the access version its
        # user was last found allowed at.
        self.room_id = 0
        self.version = 0
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

    @property
    def closed(self) -> bool:
        return self._error is not None

    def raise_if_closed(self) -> None:
        """Raises the error the stream was closed with, if it was."""
        if self._error is not None:
            raise self._error

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
        self,
        metrics: ChatMetrics,
        queue_limit: int,
        reorder_wait: float = REORDER_WAIT,
        *,
        check_concurrency: int = 4,
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
        # Told when a room gets its first stream here, and when its last one leaves.
        self._watchers: list[tuple[Callable[[str], None], Callable[[str], None] | None]] = []
        # Access control (see the module's docstring): which room each name's streams were
        # last checked in and at what access version, messages waiting for a check, the
        # running checks, and the rooms whose check must run once more.
        self._readers: Readers | None = None
        self._checked: dict[str, Stamp] = {}
        self._waiting: dict[str, list[Outgoing]] = {}
        self._checks: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()
        self._check_slots = asyncio.Semaphore(check_concurrency)

    def check_access_with(self, readers: Readers) -> None:
        """Turns on access checks, asking `readers` (see Readers)."""
        self._readers = readers

    def note_access(self, room: str, room_id: int, version: int) -> None:
        """Postgres showed `room` as room `room_id` at access `version`: its streams are
        checked again unless they were checked at exactly that."""
        if self._readers is None or not self._rooms.get(room):
            return
        if (room_id, version) != self._checked.get(room):
            self._check(room)

    def recheck(self, room: str) -> None:
        """Checks the room's streams against Postgres now (an announcement, the periodic
        check): a change may have happened that no message has shown yet."""
        if self._readers is not None and self._rooms.get(room):
            self._check(room)

    def verify(self, stamps: dict[str, Stamp]) -> None:
        """The periodic check: `stamps` holds (room id, access version) of every room with
        streams here that still exists. A room that is gone, another room now, newer, or
        with a stream checked at less, is checked again."""
        for room, members in list(self._rooms.items()):
            stamp = stamps.get(room)
            if (
                stamp is None
                or stamp != self._checked.get(room)
                or any(
                    s.room_id != stamp[0] or s.version < stamp[1]
                    for s in members
                    if s.room_id and not s.closed
                )
            ):
                self.recheck(room)

    def _covered(self, room: str, item: Outgoing) -> bool:
        """Whether the room's streams were checked for `item`: in its room, at its version."""
        room_id, version = self._checked.get(room, (0, 0))
        return item.room_id in (0, room_id) and item.version <= version and room_id != 0

    @property
    def checking(self) -> bool:
        """Whether an access check of any room is under way (or queued to run again)."""
        return bool(self._checks)

    def _check(self, room: str) -> None:
        if room in self._checks:
            self._again.add(room)
        else:
            # Not in the context of the stream that asked for the check.
            self._checks[room] = detached_task(self._run_checks(room), name=f"chat-access-{room}")

    async def _run_checks(self, room: str) -> None:
        assert self._readers is not None
        retry = _RETRY_FIRST
        try:
            while self._rooms.get(room):
                self._again.discard(room)
                # The streams this read judges: stamped by their own check after joining, and
                # not ended. Any other stream stamped meanwhile is judged by the next read.
                judged = {s for s in self._rooms[room] if s.room_id and not s.closed}
                try:
                    async with self._check_slots:
                        found = await self._readers(room, sorted({s.user_id for s in judged}))
                except Exception as exc:  # Postgres unavailable: messages wait, try again
                    _log.debug("checking access to room %s failed: %s", room, exc)
                    await asyncio.sleep(retry)
                    retry = min(retry * 2, _RETRY_LAST)
                    continue
                retry = _RETRY_FIRST
                members = self._rooms.get(room, set())
                room_id, version, allowed = found if found is not None else (0, 0, set[int]())
                before = self._checked.get(room)
                changed = (room_id, version) != before
                self._metrics.access_checks.labels("changed" if changed else "unchanged").inc()
                if before is not None and room_id != before[0]:
                    # Deleted, or another room under the name now: nothing of the old one
                    # goes out, and whatever stays re-reads the room from Postgres.
                    self._heads.pop(room, None)
                    self._settled.discard(room)
                    self._drop_early(room)
                late = False
                for subscriber in list(members):
                    if subscriber.closed:
                        continue
                    if subscriber.room_id == 0:
                        continue  # its own check after joining is under way; see _offer_to
                    if subscriber not in judged:
                        late = True  # stamped during the read: judged by the next one
                    elif subscriber.room_id != room_id or subscriber.user_id not in allowed:
                        self._metrics.access_revoked.inc()
                        subscriber.close(denied(room))
                    else:
                        subscriber.version = max(subscriber.version, version)
                if found is None:
                    self._checked.pop(room, None)
                    self._waiting.pop(room, None)
                    if not late:
                        return
                    self._again.add(room)
                    continue
                if before is None or room_id != before[0] or version > before[1]:
                    self._checked[room] = (room_id, version)
                if late:
                    # Nothing goes out before every stream of the room has been judged.
                    self._again.add(room)
                else:
                    self._release_waiting(room)
                if room not in self._again:
                    return
                if not changed and not late:
                    await asyncio.sleep(_CHECK_PAUSE)  # a flood of hints costs a read per pause
        finally:
            self._checks.pop(room, None)
            self._again.discard(room)

    def _release_waiting(self, room: str) -> None:
        """Delivers the messages that waited for the room's check and are covered by it;
        drops those of a room the name no longer stands for."""
        room_id, _ = self._checked.get(room, (0, 0))
        waiting = self._waiting.pop(room, [])
        later = [
            item
            for item in waiting
            if item.room_id in (0, room_id) and not self._covered(room, item)
        ]
        if later:
            self._waiting[room] = later
            self._again.add(room)
        for item in waiting:
            if self._covered(room, item):
                self._deliver_in_order(item)

    def watch_rooms(
        self, opened: Callable[[str], None], closed: Callable[[str], None] | None = None
    ) -> None:
        """Calls `opened(room)` whenever a room gets its first stream on this replica, and
        `closed(room)` when its last one leaves; watchers are told in the order they came."""
        self._watchers.append((opened, closed))

    def join(self, room: str, user_id: int) -> Subscriber:
        subscriber = Subscriber(room, user_id, self._queue_limit, self._metrics)
        new = room not in self._rooms
        self._rooms[room].add(subscriber)
        self._metrics.streams.inc()
        if new:
            for opened, _ in self._watchers:
                opened(room)
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
                self._checked.pop(subscriber.room, None)
                self._waiting.pop(subscriber.room, None)
                for _, closed in self._watchers:
                    if closed is not None:
                        closed(subscriber.room)

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
        if newest is None:
            return
        if self._readers is not None and not self._covered(room, newest):
            # Not offered before a check: the streams re-read Postgres, which checks each.
            self._check(room)
            for subscriber in members:
                subscriber.catch_up()
            return
        for subscriber in members:
            self._offer_to(subscriber, newest)

    def deliver(self, item: Outgoing) -> None:
        """Offers a stored message to every local stream of its room, in sequence order.

        A message more than one ahead of the room's last one waits up to `reorder_wait` for
        those before it; then it goes out anyway and the streams fill the gap from Postgres.
        """
        message = item.message
        room = message.room
        if not self._rooms.get(room):
            return
        if self._readers is not None and not self._covered(room, item):
            # Stored after the streams' last check (or in another room under the name): it
            # waits for a check.
            waiting = self._waiting.setdefault(room, [])
            if len(waiting) >= self._queue_limit:
                # More than a stream could buffer: the streams re-read Postgres instead, where
                # each read checks the stream's own access.
                waiting.clear()
                for subscriber in self._rooms[room]:
                    subscriber.catch_up()
            else:
                waiting.append(item)
            self._check(room)
            return
        self._deliver_in_order(item)

    def _deliver_in_order(self, item: Outgoing) -> None:
        room = item.message.room
        if not self._rooms.get(room):
            return
        message = item.message
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
            self._offer_to(subscriber, item)

    def _offer_to(self, subscriber: Subscriber, item: Outgoing) -> None:
        """Offers `item` to one stream, if that stream's user is known to be allowed to read
        it: checked in its room at its version or later. A stream that is not (it joined a
        moment ago and its own check is under way or older) re-reads the room from Postgres
        instead, where each read checks its access, and the room is checked again."""
        if subscriber.closed:
            return
        if self._readers is not None and (
            item.room_id not in (0, subscriber.room_id) or item.version > subscriber.version
        ):
            subscriber.catch_up()
            if subscriber.room_id:  # a stream still joining asks for its check itself
                self._check(subscriber.room)
            return
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

    async def stop(self) -> None:
        await cancel_and_wait(*self._checks.values())
