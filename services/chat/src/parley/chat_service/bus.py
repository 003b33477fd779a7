"""Redis pub/sub between replicas: one subscription connection per replica.

Pub/sub is at-most-once, so it is only a fast path: every message is in Postgres first, and
whenever this replica may have missed something (the subscription dropped, or the periodic
check finds a room ahead of what was seen) its streams catch up from Postgres.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import redis.asyncio as redis
from redis.exceptions import RedisError

from parley.proto import chat_pb2

from .hub import Outgoing, RoomHub, outgoing
from .metrics import ChatMetrics
from .tasks import cancel_and_wait

__all__ = ["RedisBus"]

_log = logging.getLogger("parley.chat.bus")


class RedisBus:
    def __init__(
        self,
        url: str,
        prefix: str,
        hub: RoomHub,
        metrics: ChatMetrics,
        last_sequence: Callable[[str], Awaitable[int]],
        resync_interval: float,
    ) -> None:
        self._prefix = prefix
        self._hub = hub
        self._metrics = metrics
        self._last_sequence = last_sequence
        self._resync_interval = resync_interval
        self.client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
        self._subscriber_client = redis.Redis.from_url(
            url, socket_connect_timeout=2, health_check_interval=5
        )
        self._tasks: list[asyncio.Task[None]] = []
        self.subscribed = asyncio.Event()

    def channel(self, room: str) -> str:
        return f"{self._prefix}:chat:room:{room}"

    async def ping(self) -> None:
        await self.client.ping()

    async def publish(self, item: Outgoing) -> None:
        """Publishes a stored message; a failure is counted, not raised (Postgres has it)."""
        try:
            await self.client.publish(self.channel(item.message.room), item.payload)
        except (RedisError, OSError) as exc:
            self._metrics.publish_errors.inc()
            _log.warning("publish to redis failed, replicas will catch up: %s", exc)

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
                await pubsub.psubscribe(self.channel("*"))
                if not first:
                    self._metrics.redis_reconnects.inc()
                    _log.info("redis subscription restored; streams catch up from postgres")
                # Anything published while unsubscribed is gone: re-read it from Postgres.
                self._hub.catch_up()
                first = False
                backoff = 0.1
                self.subscribed.set()
                async for item in pubsub.listen():
                    if item.get("type") == "pmessage":
                        self._on_message(item["data"])
            except (RedisError, OSError) as exc:
                self.subscribed.clear()
                _log.warning("redis subscription lost: %s; retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _on_message(self, data: bytes) -> None:
        message = chat_pb2.ChatMessage()
        try:
            message.ParseFromString(data)
        except Exception:  # a foreign publisher on our channel; ignore its bytes
            _log.warning("ignored an unreadable message on the chat channel")
            return
        self._hub.deliver(outgoing(message, data))

    async def _resync_forever(self) -> None:
        """A safety net for messages that were stored but never published."""
        while True:
            await asyncio.sleep(self._resync_interval)
            for room, seen in self._hub.rooms().items():
                try:
                    stored = await self._last_sequence(room)
                except Exception as exc:  # postgres down: the next round tries again
                    _log.debug("resync of %s skipped: %s", room, exc)
                    continue
                if stored > seen:
                    self._hub.catch_up(room, through=stored)
