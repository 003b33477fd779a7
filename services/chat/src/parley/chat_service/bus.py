"""Redis pub/sub between replicas: one subscription connection per replica.

A replica publishes each message it stores on its room's channel. What another replica reads
there is untrusted input (anything that reaches Redis can publish) and only a hint: it is
checked for shape (a ChatMessage no larger than Parley's, of the channel's room, with a
positive sequence) and handed to the room feed, which reads the room's messages from
Postgres. Pub/sub is at-most-once, so it is only a fast path: whenever this replica may have
missed something (the subscription dropped, or the periodic check) the feed reads its rooms
to the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import redis.asyncio as redis
from google.protobuf.message import DecodeError
from redis.exceptions import AuthenticationError, RedisError, ResponseError

from parley.chassis.tasks import cancel_and_wait
from parley.proto import chat_pb2

from .feed import BAD_SEQUENCE, TOO_LARGE, UNREADABLE, WRONG_ROOM, RoomFeed
from .hub import Outgoing, RoomHub
from .metrics import ChatMetrics

__all__ = ["MAX_HINT_BYTES", "AccessVersions", "RedisBus"]

_log = logging.getLogger("parley.chat.bus")

# The largest message Parley publishes is well below this (4 KiB of text, a 64-character
# client id, a display name and a room name); anything longer is not parsed.
MAX_HINT_BYTES = 64 * 1024
# `await versions(rooms)`: (room id, access version) of each of `rooms` that still exists.
AccessVersions = Callable[[list[str]], Awaitable[dict[str, tuple[int, int]]]]
# Hints handled in a row before the subscription lets other tasks run.
_BATCH = 256


class RedisBus:
    def __init__(
        self,
        url: str,
        prefix: str,
        hub: RoomHub,
        feed: RoomFeed,
        metrics: ChatMetrics,
        resync_interval: float,
    ) -> None:
        self._prefix = prefix
        self._channels = f"{prefix}:chat:room:".encode()
        self._access_channels = f"{prefix}:chat:access:".encode()
        self._versions: AccessVersions | None = None
        self._hub = hub
        self._feed = feed
        self._metrics = metrics
        self._resync_interval = resync_interval
        self.client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
        self._subscriber_client = redis.Redis.from_url(
            url, socket_connect_timeout=2, health_check_interval=5
        )
        self._tasks: list[asyncio.Task[None]] = []
        # This replica's own messages being published: the local fan-out offers them.
        self._publishing: set[tuple[str, int]] = set()
        self.subscribed = asyncio.Event()

    def channel(self, room: str) -> str:
        return f"{self._prefix}:chat:room:{room}"

    def access_channel(self, room: str) -> str:
        return f"{self._prefix}:chat:access:{room}"

    def check_access_with(self, versions: AccessVersions) -> None:
        """The periodic check also compares each room's access version with `versions`."""
        self._versions = versions

    async def announce(self, room: str) -> None:
        """Tells the other replicas that who may read `room` changed. Like a message, the
        announcement is only a hint (they ask Postgres); one that is lost is made up for by
        the periodic check. A failure is counted, not raised: Postgres has the change."""
        try:
            await self.client.publish(self.access_channel(room), b"")
        except (RedisError, OSError) as exc:
            self._metrics.publish_errors.inc()
            _log.warning("announcing an access change to redis failed: %s", exc)

    async def ping(self) -> None:
        """The readiness probe; a refusal of the URL's credentials says so (never them)."""
        try:
            await self.client.ping()
        except (AuthenticationError, ResponseError) as exc:
            if isinstance(exc, ResponseError) and not str(exc).startswith(("NOAUTH", "NOPERM")):
                raise
            if not self.client.connection_pool.connection_kwargs.get("password"):
                raise ConnectionError(
                    "Redis requires a password or an ACL user, and PARLEY_REDIS_URL has none "
                    f"(redis://[USER]:PASSWORD@HOST:PORT/0): {exc}"
                ) from None
            raise ConnectionError(
                f"Redis refused the credentials in PARLEY_REDIS_URL: {exc}"
            ) from None

    async def publish(self, item: Outgoing) -> None:
        """Publishes a stored message; a failure is counted, not raised (Postgres has it)."""
        key = (item.message.room, item.message.sequence)
        self._publishing.add(key)
        try:
            await self.client.publish(self.channel(item.message.room), item.payload)
        except (RedisError, OSError) as exc:
            self._metrics.publish_errors.inc()
            _log.warning("publish to redis failed, replicas will catch up: %s", exc)
        finally:
            self._publishing.discard(key)

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._subscribe_forever(), name="chat-redis-subscriber"),
            asyncio.create_task(self._resync_forever(), name="chat-resync"),
        ]

    async def stop(self) -> None:
        await cancel_and_wait(*self._tasks)
        await self.client.aclose()
        await self._subscriber_client.aclose()

    async def _subscribe_forever(self) -> None:
        backoff = 0.1
        first = True
        while True:
            pubsub = self._subscriber_client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.psubscribe(self.channel("*"), self.access_channel("*"))
                if not first:
                    self._metrics.redis_reconnects.inc()
                    _log.info("redis subscription restored; rooms are read from postgres")
                # Anything published while unsubscribed is gone: read the rooms to their end,
                # and check who may still read them.
                self._feed.wake(self._hub.rooms())
                for room in self._hub.rooms():
                    self._hub.recheck(room)
                first = False
                backoff = 0.1
                self.subscribed.set()
                handled = 0
                async for item in pubsub.listen():
                    if item.get("type") == "pmessage":
                        self._on_message(item["channel"], item["data"])
                        handled += 1
                        if handled % _BATCH == 0:
                            await asyncio.sleep(0)  # a flood must not keep the loop to itself
            except (RedisError, OSError) as exc:
                self.subscribed.clear()
                _log.warning("redis subscription lost: %s; retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _on_message(self, channel: bytes, data: bytes) -> None:
        """Checks a message from a room's channel and passes its room and sequence on as a
        hint; its text, sender and the like are never used."""
        feed = self._feed
        if channel.startswith(self._access_channels):
            # Only the room name counts: the hub reads the truth from Postgres.
            room = channel[len(self._access_channels) :].decode("utf-8", "replace")
            self._hub.recheck(room)
            return
        if len(data) > MAX_HINT_BYTES:
            feed.reject(TOO_LARGE)
            return
        message = chat_pb2.ChatMessage()
        try:
            message.ParseFromString(data)
        except DecodeError:
            feed.reject(UNREADABLE)
            return
        room = message.room
        if not room or channel != self._channels + room.encode():
            feed.reject(WRONG_ROOM)
            return
        sequence = message.sequence
        if sequence <= 0:
            feed.reject(BAD_SEQUENCE)
            return
        if (room, sequence) in self._publishing:
            return  # this replica's own message, on its way to the local streams
        feed.hint(room, sequence)

    async def _resync_forever(self) -> None:
        """A safety net for messages that were stored but never published."""
        while True:
            await asyncio.sleep(self._resync_interval)
            rooms = self._hub.rooms()
            self._feed.wake(rooms)
            if self._versions is not None and rooms:
                try:
                    versions = await self._versions(list(rooms))
                except Exception as exc:  # Postgres unavailable: the next round tries again
                    _log.debug("reading the rooms' access versions failed: %s", exc)
                    continue
                self._hub.verify(versions)
