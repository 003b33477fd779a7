"""Each room's new messages, read from Postgres for this replica's streams whenever something
says there may be some: a hint from Redis, a restored subscription, the periodic check.

What comes out of Redis is untrusted input: anything that reaches the Redis server can publish
on a room's channel. So a hint only says "room R may have a message numbered N". The feed
reads what Postgres holds after the highest sequence the room's streams were offered and
offers those rows; a hint whose sequence Postgres does not hold delivers nothing and moves
nothing, and the text and sender that reach a stream are always Postgres's.

A room has at most one read in flight. Hints that arrive meanwhile wait for the next read,
which judges them all at once, so a flood of hints costs a read per round trip to Postgres,
not a read per hint or per stream; a round that disproved a hint pauses before the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from opentelemetry import trace

from parley.chassis import tracing
from parley.chassis.tasks import cancel_and_wait, detached_task
from parley.proto import chat_pb2

from .hub import Outgoing, RoomHub, outgoing
from .metrics import ChatMetrics

__all__ = [
    "BAD_SEQUENCE",
    "REJECT_REASONS",
    "TOO_LARGE",
    "UNCONFIRMED",
    "UNREADABLE",
    "WRONG_ROOM",
    "RoomFeed",
]

_log = logging.getLogger("parley.chat.feed")

# Why a message from Redis was dropped: the `reason` label of parley_chat_bus_rejected_total.
TOO_LARGE = "too_large"  # longer than any message Parley publishes
UNREADABLE = "unreadable"  # not a ChatMessage (proto/chat_bus.proto)
WRONG_ROOM = "wrong_room"  # its room is not its channel's
BAD_SEQUENCE = "bad_sequence"  # not a positive sequence number
UNCONFIRMED = "unconfirmed"  # its sequence is above what Postgres holds for the room
REJECT_REASONS = (TOO_LARGE, UNREADABLE, WRONG_ROOM, BAD_SEQUENCE, UNCONFIRMED)

# Rows a read asks for at once.
PAGE = 100
# After a read that disproved a hint, the room's next read waits this long: a steady stream of
# forged hints costs a room at most this many reads a second, and real messages this delay.
FORGERY_PAUSE = 0.02
# How far ahead of a room's position its waiting hints are kept exactly (see _Hints).
_HINTS_KEPT = 1024
# The sends a delivery span links to at most (the spans of further hints are not linked).
MAX_LINKS = 32
# At most one warning in this many seconds about dropped messages, with the counts since the last.
_REJECT_LOG_INTERVAL = 30.0
_RETRY_FIRST, _RETRY_LAST = 0.1, 2.0

# `await read_after(room, sequence, limit)`: up to `limit` messages after `sequence` and the
# room's (id, access version), from one snapshot; None for those when there is no such room.
ReadAfter = Callable[
    [str, int, int], Awaitable[tuple[list[chat_pb2.ChatMessage], tuple[int, int] | None]]
]
ReadLast = Callable[[str], Awaitable[int]]


class _Hints:
    """The sequences hinted for one room since its last read started, in bounded memory.

    Hints within _HINTS_KEPT of the room's position (where real ones are) are kept exactly,
    with a count each: a flood that repeats one sequence costs one entry. So are the first
    _HINTS_KEPT distinct ones further ahead; beyond those, only a count and the lowest.
    """

    __slots__ = ("extra", "extra_low", "far", "highest", "near", "sent", "wake")

    def __init__(self) -> None:
        # The traced sends the hints came from (tracing on only), up to MAX_LINKS.
        self.sent: list[trace.SpanContext] = []
        self.near: Counter[int] = Counter()
        self.far: Counter[int] = Counter()
        self.extra = 0
        self.extra_low = 0
        self.highest = 0
        # Read to the end of the room whatever the hints say (a reconnect, the periodic check).
        self.wake = False

    def __bool__(self) -> bool:
        return self.wake or bool(self.near) or bool(self.far) or self.extra > 0

    def add(self, sequence: int, position: int | None, count: int = 1) -> None:
        if position is not None and sequence <= position + _HINTS_KEPT:
            self.near[sequence] += count
        elif sequence in self.far or len(self.far) < _HINTS_KEPT:
            self.far[sequence] += count
        else:
            self._summarise(sequence, count)
        self.highest = max(self.highest, sequence)

    def _summarise(self, low: int, count: int) -> None:
        self.extra_low = low if self.extra == 0 else min(self.extra_low, low)
        self.extra += count

    def merge(self, other: _Hints) -> None:
        """Adds the hints of `other` to these."""
        self.near.update(other.near)
        for sequence, count in other.far.items():
            self.add(sequence, None, count)
        if other.extra:
            self._summarise(other.extra_low, other.extra)
        self.highest = max(self.highest, other.highest)
        self.wake = self.wake or other.wake
        self.sent = (self.sent + other.sent)[:MAX_LINKS]

    def above(self, confirmed: int) -> int:
        """How many hints named a sequence above `confirmed` (summarised ones only when all of
        them are above it: a few real ones among them are not counted as forged)."""
        count = sum(n for sequence, n in self.near.items() if sequence > confirmed)
        count += sum(n for sequence, n in self.far.items() if sequence > confirmed)
        if self.extra and self.extra_low > confirmed:
            count += self.extra
        return count


class _Room:
    __slots__ = ("hints", "task")

    def __init__(self) -> None:
        self.hints = _Hints()
        self.task: asyncio.Task[None] | None = None


class _RejectLog:
    """Counts dropped messages and warns about them at most once an interval."""

    def __init__(self, metrics: ChatMetrics, interval: float) -> None:
        self._counters = {reason: metrics.bus_rejected.labels(reason) for reason in REJECT_REASONS}
        self._interval = interval
        self._since: Counter[str] = Counter()
        self._next = 0.0

    def add(self, reason: str, count: int) -> None:
        self._counters[reason].inc(count)
        self._since[reason] += count
        now = time.monotonic()
        if now < self._next:
            return
        _log.warning(
            "dropped %d message(s) on the chat channels in Redis that this deployment's replicas "
            "did not publish (%s); whatever reaches this Redis can publish there: give it a "
            "password or an ACL user, and each deployment its own PARLEY_REDIS_PREFIX",
            sum(self._since.values()),
            ", ".join(f"{reason}: {n}" for reason, n in sorted(self._since.items())),
        )
        self._since.clear()
        self._next = now + self._interval


_tracer = tracing.tracer("parley.chat.feed")


def _delivering(room: str, sent: list[trace.SpanContext]) -> contextlib.AbstractContextManager[Any]:
    """A consumer span around a read prompted by traced sends, linked to each of them; the
    read's Postgres queries are its children. Nothing without such sends."""
    if not sent:
        return contextlib.nullcontext()
    return _tracer.start_as_current_span(
        "chat deliver",
        kind=trace.SpanKind.CONSUMER,
        links=[trace.Link(context) for context in sent],
        attributes={"chat.room": room, "messaging.system": "redis"},
    )


class RoomFeed:
    """Reads rooms' new messages from Postgres and offers them to the hub, one room at a time."""

    def __init__(
        self,
        hub: RoomHub,
        metrics: ChatMetrics,
        read_after: ReadAfter,
        read_last: ReadLast,
        *,
        backlog: int,
        concurrency: int,
        page: int = PAGE,
        pause: float = FORGERY_PAUSE,
        reject_log_interval: float = _REJECT_LOG_INTERVAL,
    ) -> None:
        self._hub = hub
        self._metrics = metrics
        self._read_after = read_after
        self._read_last = read_last
        self._backlog = backlog
        self._page = min(page, backlog)
        self._pause = pause
        # Reads of all rooms together hold at most this many pooled connections.
        self._reads = asyncio.Semaphore(concurrency)
        self._rooms: dict[str, _Room] = {}
        self._rejects = _RejectLog(metrics, reject_log_interval)
        self._subscribed: Callable[[str], Awaitable[None]] | None = None
        hub.watch_rooms(self._opened)

    def settle_after(self, subscribed: Callable[[str], Awaitable[None]]) -> None:
        """A newly opened room is read for its position only once `await subscribed(room)`
        returns: once hints for the room reach this replica, so none stored after that read
        can be missed."""
        self._subscribed = subscribed

    def reject(self, reason: str, count: int = 1) -> None:
        """Counts messages from Redis dropped for `reason` (one of REJECT_REASONS)."""
        self._rejects.add(reason, count)

    def hint(self, room: str, sequence: int, sent: trace.SpanContext | None = None) -> None:
        """Redis says `room` may have a message numbered `sequence` (a positive integer);
        `sent` is the span of its send when that was traced (see proto/chat_bus.proto)."""
        if not self._hub.has_streams(room):
            return  # nobody here to deliver to, so nothing to check
        position = self._hub.position(room)
        if position is not None and sequence <= position:
            return  # already offered (this replica's own message, or a repeat)
        state = self._room(room)
        state.hints.add(sequence, position)
        if sent is not None and len(state.hints.sent) < MAX_LINKS:
            state.hints.sent.append(sent)
        self._start(room, state)

    def wake(self, rooms: Iterable[str]) -> None:
        """Reads each room to its end: something may have been stored without a hint."""
        for room in rooms:
            if self._hub.has_streams(room):
                state = self._room(room)
                state.hints.wake = True
                self._start(room, state)

    async def stop(self) -> None:
        await cancel_and_wait(*(s.task for s in self._rooms.values() if s.task is not None))

    def _opened(self, room: str) -> None:
        # The first stream joined: find the room's position (see RoomHub.settle).
        self._start(room, self._room(room))

    def _room(self, room: str) -> _Room:
        state = self._rooms.get(room)
        if state is None:
            state = self._rooms[room] = _Room()
        return state

    def _start(self, room: str, state: _Room) -> None:
        if state.task is None:
            # Not in the context of the stream that happened to open the room.
            state.task = detached_task(self._run(room, state), name=f"chat-feed-{room}")

    async def _run(self, room: str, state: _Room) -> None:
        hub = self._hub
        retry = _RETRY_FIRST
        try:
            while hub.has_streams(room):
                hints = None
                try:
                    if hub.position(room) is None:
                        if self._subscribed is not None:
                            await self._subscribed(room)
                            if not hub.has_streams(room):
                                return
                        stored = await self._last(room)
                        hub.settle(room, stored, await self._message(room, stored))
                        continue
                    hints, state.hints = state.hints, _Hints()
                    if not hints:
                        return
                    if not hints.wake and hints.highest <= (hub.position(room) or 0):
                        continue  # offered meanwhile (read along with an earlier hint's message)
                    with _delivering(room, hints.sent):
                        confirmed = await self._read(room, 2**63 if hints.wake else hints.highest)
                except Exception as exc:  # Postgres unavailable: keep the hints, try again
                    if hints is not None:
                        hints.merge(state.hints)
                        state.hints = hints
                    _log.debug("reading room %s failed: %s; retrying in %.1fs", room, exc, retry)
                    await asyncio.sleep(retry)
                    retry = min(retry * 2, _RETRY_LAST)
                    continue
                retry = _RETRY_FIRST
                if confirmed is None:
                    continue  # the room's streams left during the read (and may be back)
                forged = hints.above(confirmed)
                if forged:
                    self.reject(UNCONFIRMED, forged)
                    await asyncio.sleep(self._pause)
        finally:
            state.task = None
            if self._rooms.get(room) is state:
                del self._rooms[room]

    async def _last(self, room: str) -> int:
        async with self._reads:
            self._metrics.room_reads.inc()
            return await self._read_last(room)

    async def _message(self, room: str, sequence: int) -> Outgoing | None:
        if sequence <= 0:
            return None
        async with self._reads:
            self._metrics.room_reads.inc()
            page, stamp = await self._read_after(room, sequence - 1, 1)
        if stamp is None:
            self._hub.recheck(room)  # deleted: its streams end
            return None
        return outgoing(page[0], room_id=stamp[0], version=stamp[1]) if page else None

    async def _read(self, room: str, wanted: int) -> int | None:
        """Offers the room's stored messages after its position, up to `wanted` at least (to
        the end when it is beyond the end). Returns the highest sequence known to be stored,
        or None when the room has no streams left."""
        hub = self._hub
        read = 0
        confirmed = hub.position(room)
        while confirmed is not None:
            async with self._reads:
                self._metrics.room_reads.inc()
                page, stamp = await self._read_after(room, confirmed, self._page)
            position = hub.position(room)  # own messages may have been offered meanwhile
            if position is None:
                return None
            if stamp is None:
                hub.recheck(room)  # the room was deleted: its streams end
                return None
            room_id, version = stamp
            hub.note_access(room, room_id, version)
            if not page:
                return max(confirmed, position)
            fresh = [message for message in page if message.sequence > position]
            read += len(fresh)
            if read > self._backlog:
                # More than a stream can buffer: each stream re-reads at its own pace instead.
                stored = await self._last(room)
                hub.catch_up(room, through=stored)
                return max(stored, page[-1].sequence)
            for message in fresh:
                hub.deliver(outgoing(message, version=version, room_id=room_id))
            confirmed = max(page[-1].sequence, position)
            if confirmed >= wanted:
                return confirmed
        return None
