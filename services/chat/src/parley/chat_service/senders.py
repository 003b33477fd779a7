"""Ends the open streams whose token expired, and those of users UserService no longer has.

A token is checked when its call starts, and a user when it joins and when it sends; a
stream may outlive both by days. Two checks run on every replica, each every `interval`:

- Tokens: a stream whose token is past its exp (plus the clock-skew leeway) ends with
  UNAUTHENTICATED, reason TOKEN_EXPIRED; its client reconnects with a fresh token and resumes.
  A comparison with the clock per stream, whatever UserService is doing.
- Users: the users of the streams are asked for again, each with the token of one of their
  own streams, through the name cache, so UserService is called only for users whose entry is
  older than PARLEY_USER_CACHE_TTL, at most `concurrency` at a time. A user it no longer has
  loses every stream here with FAILED_PRECONDITION, reason UNKNOWN_SENDER, as their next call
  would. When UserService cannot answer, the round stops there (it is not asked once per user
  while it is down) and the streams stay: they were confirmed when they joined, and only a
  deletion, which needs UserService up, would end them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from parley.chassis import ServiceError, Unauthenticated
from parley.chassis.tasks import cancel_and_wait

from .hub import RoomHub, Subscriber
from .users import UserDirectory, unknown_sender

__all__ = ["SenderCheck"]

_log = logging.getLogger("parley.chat")
# Streams looked at between two yields to the event loop.
_BATCH = 1000


class SenderCheck:
    def __init__(
        self,
        hub: RoomHub,
        users: UserDirectory,
        *,
        interval: float,
        concurrency: int = 8,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._hub = hub
        self._users = users
        self._interval = interval
        self._concurrency = concurrency
        self._clock = clock
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._every(self.end_expired), name="chat-token-check"),
            asyncio.create_task(self._every(self.end_deleted), name="chat-user-check"),
        ]

    async def stop(self) -> None:
        await cancel_and_wait(*self._tasks)

    async def _every(self, check: Callable[[], Awaitable[int]]) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await check()
            except Exception:  # a bug must not end the checks for the life of the process
                _log.exception("checking the open streams failed")

    def _open(self) -> list[Subscriber]:
        return [s for s in self._hub.subscribers() if not s.closed and s.token]

    async def end_expired(self) -> int:
        """Ends the streams whose token expired; returns how many."""
        now = self._clock()
        ended = 0
        for index, subscriber in enumerate(self._open(), 1):
            if 0 < subscriber.valid_until <= now:
                subscriber.close(
                    Unauthenticated(
                        "token has expired: the stream ends; reconnect with a fresh token",
                        reason="TOKEN_EXPIRED",
                    )
                )
                ended += 1
            if index % _BATCH == 0:
                await asyncio.sleep(0)
        return ended

    async def end_deleted(self) -> int:
        """Ends the streams of users UserService no longer has; returns how many."""
        streams: dict[int, list[Subscriber]] = {}
        for subscriber in self._open():
            streams.setdefault(subscriber.user_id, []).append(subscriber)
        pending = list(streams.items())
        ended = 0

        async def worker() -> None:
            nonlocal ended
            while pending:
                user_id, subscribers = pending.pop()
                try:
                    if await self._users.exists(user_id, subscribers[0].token):
                        continue
                except ServiceError as error:
                    _log.debug("checking user %d failed: %s", user_id, error.message)
                    pending.clear()  # UserService cannot answer: the next round asks again
                    return
                gone = [s for s in subscribers if not s.closed]
                for subscriber in gone:
                    subscriber.close(unknown_sender(user_id))
                ended += len(gone)
                _log.info("user %d no longer exists: ended %d stream(s)", user_id, len(gone))

        await asyncio.gather(*(worker() for _ in range(self._concurrency)))
        return ended
