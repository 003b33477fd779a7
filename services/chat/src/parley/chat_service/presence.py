"""Who is connected to each room, across replicas: a Redis sorted set per room whose
members expire unless their replica keeps refreshing them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict

import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from parley.chassis.tasks import cancel_and_wait
from parley.proto import chat_pb2

from .bus import presence_key
from .hub import RoomHub

__all__ = ["Presence"]

_log = logging.getLogger("parley.chat.presence")


def _member(raw: object) -> tuple[int, str] | None:
    """The user id and name of a presence entry; None when it is not one."""
    if not isinstance(raw, bytes | str):
        return None
    try:
        text = raw.decode() if isinstance(raw, bytes) else raw
        _replica, _stream, user_id, name = text.split("|", 3)
        uid = int(user_id)
    except ValueError:  # UnicodeDecodeError is one
        return None
    if not 0 < uid < 2**31 or not user_id.isdigit():
        return None
    return uid, name


class Presence:
    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        prefix: str,
        replica: str,
        hub: RoomHub,
        ttl: float,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._replica = replica
        self._hub = hub
        self._ttl = ttl
        self._task: asyncio.Task[None] | None = None

    def _key(self, room: str) -> str:
        return presence_key(self._prefix, room)

    def _member(self, stream_id: int, user_id: int, name: str) -> str:
        return f"{self._replica}|{stream_id}|{user_id}|{name}"

    async def announce(self, room: str, stream_id: int, user_id: int, name: str) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._client.zadd(
                self._key(room), {self._member(stream_id, user_id, name): time.time() + self._ttl}
            )

    async def withdraw(self, room: str, stream_id: int, user_id: int, name: str) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._client.zrem(self._key(room), self._member(stream_id, user_id, name))

    async def members(self, room: str) -> list[chat_pb2.RoomMember]:
        key = self._key(room)
        now = time.time()
        await self._client.zremrangebyscore(key, "-inf", now)
        entries = await self._client.zrangebyscore(key, now, "+inf")
        counts: dict[int, int] = defaultdict(int)
        names: dict[int, str] = {}
        for raw in entries:
            member = _member(raw)
            if member is None:
                continue  # not written by a replica (what is in Redis is untrusted input)
            user_id, name = member
            counts[user_id] += 1
            names[user_id] = name
        return [
            chat_pb2.RoomMember(user_id=uid, user=names[uid], stream_count=counts[uid])
            for uid in sorted(counts)
        ]

    async def start(self) -> None:
        self._task = asyncio.create_task(self._refresh_forever(), name="chat-presence")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._ttl / 3)
            for subscriber in self._hub.subscribers():
                # Skip streams not yet named, or that left while earlier ones were announced.
                if subscriber.user_name and subscriber.active:
                    await self.announce(
                        subscriber.room, subscriber.id, subscriber.user_id, subscriber.user_name
                    )
