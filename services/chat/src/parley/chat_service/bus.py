"""Redis pub/sub between replicas: one subscription connection per replica, or one per
primary of a Redis Cluster.

A replica publishes each message it stores on its room's channel, and subscribes to a room's
channel only while it has streams in the room: it SUBSCRIBEs when the room's first stream
joins here and UNSUBSCRIBEs when the last one has been gone for PARLEY_CHAT_SUBSCRIPTION_LINGER
(a room whose streams come and go keeps its subscription). So a replica receives the
messages of its own rooms only, and the cluster's chat throughput grows with its replicas.
A room is read from Postgres for its starting position only after Redis confirmed the
subscription (see RoomFeed.settle_after), so nothing stored in between is missed.
Announcements that who may read a room changed are few: every replica receives all of them,
on one pattern subscription that also keeps the connection subscribed when it has no rooms.

On a Redis Cluster (PARLEY_REDIS_CLUSTER=true) a room's channel is a shard channel: SPUBLISH
and SSUBSCRIBE, so a message travels only through the primary that serves the room's hash
slot, and the cluster's pub/sub throughput grows with its shards. Room channels and presence
keys carry the room in a hash tag (`{room}`), so every key of a room lives in one slot. A
replica holds one subscription connection per primary (each also subscribed to the probe
channel, which keeps it subscribed and checks the node's ACL), made from the topology read at
connect time. When any of them fails, or Redis ends a room's subscription because its slot
moved (a failover, a resharding), every connection is made anew from a fresh topology and
every room is read to its end: a failover loses nothing, it only delays.

What another replica publishes is untrusted input (anything that reaches Redis can publish)
and only a hint: it is checked for shape (a ChatMessage no larger than Parley's, of the
channel's room, with a positive sequence) and handed to the room feed, which reads the
room's messages from Postgres. Pub/sub is at-most-once, so it is only a fast path: whenever
this replica may have missed something (the subscription dropped, or the periodic check) the
feed reads its rooms to the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as redis
from google.protobuf.message import DecodeError
from opentelemetry.trace import SpanContext
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import ConnectionPool, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import (
    AuthenticationError,
    MovedError,
    NoPermissionError,
    RedisClusterException,
    RedisError,
    ResponseError,
)

from parley.chassis import tracing
from parley.chassis.tasks import cancel_and_wait
from parley.proto import chat_bus_pb2, chat_pb2

from .feed import BAD_SEQUENCE, TOO_LARGE, UNREADABLE, WRONG_ROOM, RoomFeed
from .hub import Outgoing, RoomHub
from .metrics import ChatMetrics

__all__ = [
    "MAX_HINT_BYTES",
    "SUBSCRIPTION_LINGER",
    "AccessVersions",
    "RedisBus",
    "access_channel",
    "presence_key",
    "room_channel",
]

_log = logging.getLogger("parley.chat.bus")


def _sent(data: bytes) -> SpanContext | None:
    """The span of the send a published message came from, when it carried one (tracing on
    only: a second parse, of a message already read as a ChatMessage)."""
    hint = chat_bus_pb2.RoomHint()
    try:
        hint.ParseFromString(data)
    except DecodeError:
        return None
    return tracing.linked_context(hint.traceparent) if hint.traceparent else None


def room_channel(prefix: str, room: str) -> str:
    """The channel a room's messages are published on; the room is its hash tag (a room's
    channel and keys share a Redis Cluster slot). The empty room's is the probe channel."""
    return f"{prefix}:chat:room:{{{room}}}"


def presence_key(prefix: str, room: str) -> str:
    """The sorted set of who is connected to a room (see presence.py); in the room's slot."""
    return f"{prefix}:chat:presence:{{{room}}}"


def access_channel(prefix: str, room: str) -> str:
    """The channel on which a change of who may read a room is announced (classic pub/sub,
    which a cluster delivers to every node)."""
    return f"{prefix}:chat:access:{room}"


# The largest message Parley publishes is well below this (4 KiB of text, a 64-character
# client id, a display name and a room name); anything longer is not parsed.
MAX_HINT_BYTES = 64 * 1024
# `await versions(rooms)`: (room id, access version) of each of `rooms` that still exists.
AccessVersions = Callable[[list[str]], Awaitable[dict[str, tuple[int, int]]]]
# Hints handled in a row before the subscription lets other tasks run.
_BATCH = 256
# Channels named in one SUBSCRIBE or UNSUBSCRIBE (after a reconnect, every room's at once).
_COMMAND_BATCH = 500
# How long a room whose last stream left here stays subscribed (PARLEY_CHAT_SUBSCRIPTION_LINGER).
SUBSCRIPTION_LINGER = 2.0
# How long a newly opened room waits for Redis to confirm its subscription before the
# connection is taken for dead: the room is read anyway, and again once subscribed anew.
_CONFIRM_TIMEOUT = 5.0
_CONFIRM_SLICE = 0.5
# Waits before subscribing again: doubling from the first to the last, and back to the first
# once a connection had worked for _HEALTHY_FOR seconds.
_BACKOFF_FIRST, _BACKOFF_LAST = 0.1, 2.0
_HEALTHY_FOR = 10.0
# Every connection is PINGed this often; one whose node has not answered for twice as long
# is taken for dead (a node that hangs, or is cut off, keeps its TCP connection open: nothing
# else would notice). On a cluster, the topology is read again as often: a slot served by
# another primary now ends the round.
_LIVENESS_INTERVAL = 5.0
_LIVENESS_MESSAGE = b"parley-liveness"


def _explained(exc: BaseException) -> Exception:
    """What went wrong with Redis, in words: redis-py's cluster client wraps what a node
    answered (a refused command, refused credentials) in an exception that hides it."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, NoPermissionError) or (
            isinstance(seen, ResponseError) and str(seen).startswith("NOPERM")
        ):
            return ConnectionError(
                f"Redis refused a command chat needs: {seen} (an ACL user on a Redis Cluster "
                "also needs +cluster|slots +spublish +ssubscribe +sunsubscribe)"
            )
        if isinstance(seen, AuthenticationError):
            return ConnectionError(f"Redis refused the credentials in PARLEY_REDIS_URL: {seen}")
        seen = seen.__cause__ or seen.__context__
    if isinstance(exc, MovedError):
        return ConnectionError(
            f"the cluster serves slot {exc.slot_id} from {exc.host}:{exc.port} now"
        )
    return exc if isinstance(exc, Exception) else ConnectionError(str(exc))


class _Room:
    """This replica's subscription to one room's channel, on the current connection."""

    __slots__ = ("acks", "confirmed", "linger", "link", "sent", "wake", "wanted")

    def __init__(self) -> None:
        self.wanted = True
        """The room has streams here, or had them less than the linger ago."""
        self.sent: bool | None = None
        """The last command sent for the channel on this connection: SUBSCRIBE (True),
        UNSUBSCRIBE (False), or none yet."""
        self.acks = 0
        """Confirmations of those commands still to come."""
        self.confirmed = asyncio.Event()
        """Set while Redis has confirmed the subscription on this connection."""
        self.wake = False
        """Read the room to its end once confirmed: it may have missed messages meanwhile."""
        self.linger: asyncio.TimerHandle | None = None
        self.link = ""
        """The connection the last command for the channel went on."""


class _Links:
    """The subscription connections of one round: one to the Redis, or one per primary of a
    cluster; a room's commands go on the connection of the node that serves its slot."""

    def __init__(self, route: Callable[[str], str] | None) -> None:
        self.pubsubs: dict[str, PubSub] = {}
        self.clients: list[redis.Redis] = []
        self.answered: dict[str, float] = {}
        """When each connection's node last answered a liveness PING (monotonic)."""
        self._route = route

    def add(self, name: str, options: dict[str, Any]) -> None:
        """A connection named `name`, made with redis-py connection `options`."""
        client = redis.Redis.from_pool(ConnectionPool(**options))  # closes the pool too
        self.clients.append(client)
        self.pubsubs[name] = client.pubsub()
        self.answered[name] = time.monotonic()

    @property
    def first(self) -> PubSub:
        return next(iter(self.pubsubs.values()))

    def of(self, channel: str) -> str:
        """The name of the connection that serves `channel`."""
        if self._route is None:
            return next(iter(self.pubsubs))
        name = self._route(channel)
        if name not in self.pubsubs:
            raise ConnectionError(f"the cluster's slots moved: {name} serves {channel} now")
        return name

    async def close(self) -> None:
        for pubsub in self.pubsubs.values():
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
        for client in self.clients:
            with contextlib.suppress(Exception):
                await client.aclose()


class RedisBus:
    def __init__(
        self,
        url: str,
        prefix: str,
        hub: RoomHub,
        feed: RoomFeed,
        metrics: ChatMetrics,
        resync_interval: float,
        *,
        cluster: bool = False,
        linger: float = SUBSCRIPTION_LINGER,
        confirm_timeout: float = _CONFIRM_TIMEOUT,
        liveness_interval: float = _LIVENESS_INTERVAL,
    ) -> None:
        self._prefix = prefix
        self._cluster = cluster
        self._channels = f"{prefix}:chat:room:{{".encode()
        self._access_channels = f"{prefix}:chat:access:".encode()
        self._versions: AccessVersions | None = None
        self._hub = hub
        self._feed = feed
        self._metrics = metrics
        self._resync_interval = resync_interval
        self._linger = linger
        self._confirm_timeout = confirm_timeout
        self._liveness_interval = liveness_interval
        self.client: redis.Redis | RedisCluster
        if cluster:
            self.client = RedisCluster.from_url(url, socket_connect_timeout=2, socket_timeout=5)
        else:
            self.client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
        # The subscription connections' options: the URL's (credentials, TLS, a unix
        # socket), and no retries inside redis-py (it would reconnect and resubscribe
        # silently, missing what was published meanwhile): any error ends the subscription
        # round, which subscribes afresh and reads every room.
        self._subscriber_options: dict[str, Any] = {
            **parse_url(url),
            "socket_connect_timeout": 2,
            "health_check_interval": liveness_interval,
            "retry": Retry(NoBackoff(), 0, supported_errors=()),
        }
        self._tasks: list[asyncio.Task[None]] = []
        # This replica's own messages being published: the local fan-out offers them.
        self._publishing: set[tuple[str, int]] = set()
        self.subscribed = asyncio.Event()
        """Set while the subscription connection is up (its pattern subscription confirmed)."""
        self._rooms: dict[str, _Room] = {}
        self._changed: set[str] = set()  # rooms whose subscription may have to change
        self._change = asyncio.Event()
        self._confirmed = 0
        # Set when a subscription went unconfirmed: the connection is dropped and made again.
        self._stuck = asyncio.Event()
        # What Redis answered when it refused a subscription (an ACL without +subscribe, say):
        # the readiness probe reports it until a subscription succeeds.
        self._refused: str | None = None
        metrics.subscribed_rooms.set_function(lambda: self._confirmed)
        hub.watch_rooms(self._opened, self._closed)
        feed.settle_after(self.subscription)

    def channel(self, room: str) -> str:
        return room_channel(self._prefix, room)

    def access_channel(self, room: str) -> str:
        return access_channel(self._prefix, room)

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
        """The readiness probe; a refusal of the URL's credentials, or of a subscription,
        says so (never the credentials)."""
        if self._refused is not None:
            raise ConnectionError(
                f"Redis refused to subscribe this replica to a room's channel: {self._refused}"
                " (an ACL user needs +subscribe +unsubscribe +psubscribe, on a cluster also"
                " +ssubscribe +sunsubscribe, and the channels PREFIX:chat:room:* and"
                " PREFIX:chat:access:*)"
            )
        try:
            await self.client.ping()
        except RedisClusterException as exc:
            raise _explained(exc) from None
        except (AuthenticationError, ResponseError) as exc:
            if isinstance(exc, ResponseError) and not str(exc).startswith(("NOAUTH", "NOPERM")):
                raise
            if not self._subscriber_options.get("password"):
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
        channel = self.channel(item.message.room)
        payload = item.payload
        if tracing.active():
            # The send's trace context rides along (see proto/chat_bus.proto).
            traceparent = tracing.traceparent()
            if traceparent:
                payload += chat_bus_pb2.RoomHint(traceparent=traceparent).SerializeToString()
        try:
            if self._cluster:
                await self.client.spublish(channel, payload)
            else:
                await self.client.publish(channel, payload)
        except (RedisError, OSError) as exc:
            self._metrics.publish_errors.inc()
            _log.warning("publish to redis failed, replicas will catch up: %s", exc)
        finally:
            self._publishing.discard(key)

    async def subscription(self, room: str) -> None:
        """Returns once Redis has confirmed this replica's subscription to `room`'s channel,
        or at once while the connection is down (subscribing again reads every room), or
        after the confirmation timeout (the confirmation, when it comes, reads the room)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._confirm_timeout
        while True:
            # Read afresh each round: the room's state is made anew when it comes back.
            state = self._rooms.get(room)
            if state is None or state.confirmed.is_set():
                return
            if not self.subscribed.is_set():
                state.wake = True
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(state.confirmed.wait(), min(remaining, _CONFIRM_SLICE))
        state.wake = True
        self._stuck.set()
        _log.warning(
            "redis has not confirmed the subscription to room %s within %.1fs; subscribing "
            "again on a new connection",
            room,
            self._confirm_timeout,
        )

    def _opened(self, room: str) -> None:
        state = self._rooms.get(room)
        if state is None:
            self._rooms[room] = _Room()
            self._mark(room)
            return
        if state.linger is not None:
            state.linger.cancel()  # back before the linger ran out: still subscribed
            state.linger = None
        if not state.wanted:
            state.wanted = True
            self._mark(room)
        # Its confirmation may be on its way or already in; a room confirmed meanwhile is
        # not read again, so a new stream waits for its settle like the first.

    def _closed(self, room: str) -> None:
        state = self._rooms.get(room)
        if state is None:
            return
        if state.linger is not None:
            state.linger.cancel()
        state.linger = asyncio.get_running_loop().call_later(self._linger, self._expire, room)

    def _expire(self, room: str) -> None:
        state = self._rooms.get(room)
        if state is None or self._hub.has_streams(room):
            return
        state.linger = None
        state.wanted = False
        self._mark(room)

    def _mark(self, room: str) -> None:
        self._changed.add(room)
        self._change.set()

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._subscribe_forever(), name="chat-redis-subscriber"),
            asyncio.create_task(self._resync_forever(), name="chat-resync"),
        ]

    async def stop(self) -> None:
        await cancel_and_wait(*self._tasks)
        for state in self._rooms.values():
            if state.linger is not None:
                state.linger.cancel()
        await self.client.aclose()

    async def _connect(self) -> _Links:
        """The connections of a new round (not connected yet: each connects with its first
        command). On a cluster, the topology is read afresh first."""
        if not isinstance(self.client, RedisCluster):
            links = _Links(None)
            links.add("redis", self._subscriber_options)
            return links
        cluster = self.client
        await cluster.nodes_manager.initialize()

        def route(channel: str) -> str:
            node = cluster.get_node_from_key(channel)
            if node is None:
                raise ConnectionError(f"no node of the cluster serves {channel}")
            return str(node.name)

        links = _Links(route)
        for node in cluster.get_primaries():
            links.add(node.name, {**self._subscriber_options, "host": node.host, "port": node.port})
        return links

    async def _watch(self, links: _Links) -> None:
        """PINGs every connection, and ends the round when one has not answered for two
        rounds of PINGs; on a cluster, also when a subscribed room's slot has another
        primary."""
        while True:
            await asyncio.sleep(self._liveness_interval)
            now = time.monotonic()
            for name, pubsub in links.pubsubs.items():
                silent = now - links.answered[name]
                if silent > 2 * self._liveness_interval:
                    raise ConnectionError(f"redis at {name} has not answered for {silent:.0f}s")
                await pubsub.ping(_LIVENESS_MESSAGE)
            if isinstance(self.client, RedisCluster):
                await self.client.nodes_manager.initialize()
                for room, state in self._rooms.items():
                    if state.sent is True and state.link:
                        owner = links.of(self.channel(room))  # raises for a new primary
                        if owner != state.link:
                            raise ConnectionError(
                                f"room {room}'s slot moved from {state.link} to {owner}"
                            )

    async def _subscribe_forever(self) -> None:
        first = True
        backoff = _BACKOFF_FIRST
        while True:
            links: _Links | None = None
            tasks: list[asyncio.Task[Any]] = []
            began = time.monotonic()
            try:
                links = await self._connect()
                await links.first.psubscribe(self.access_channel("*"))
                # A channel no room has (the empty room name), on every connection: its
                # confirmation shows this replica may subscribe at all, before any stream
                # depends on it (see ping), and it keeps a cluster node's connection
                # subscribed (listening) while it serves no room.
                for pubsub in links.pubsubs.values():
                    await pubsub.subscribe(self.channel(""))
                if not first:
                    self._metrics.redis_reconnects.inc()
                    _log.info("redis subscription restored; rooms are read from postgres")
                first = False
                self._stuck.clear()
                self._restart_rooms()
                tasks = [
                    *(
                        asyncio.create_task(self._listen(links, name), name=f"chat-redis-{name}")
                        for name in links.pubsubs
                    ),
                    asyncio.create_task(self._send_commands(links), name="chat-redis-commands"),
                    asyncio.create_task(self._watch(links), name="chat-redis-watch"),
                    asyncio.create_task(self._stuck.wait(), name="chat-redis-stuck"),
                ]
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # raises what ended it
                raise ConnectionError("a subscription went unconfirmed, or redis ended them")
            except Exception as exc:  # a bug must not end the subscription for good
                error: Exception = exc
                if not isinstance(exc, RedisError | OSError | RedisClusterException):
                    _log.error("the redis subscription failed", exc_info=exc)
            finally:
                self._lost()  # first: the awaits below may be cancelled again (shutdown)
                await cancel_and_wait(*tasks)
                if links is not None:
                    await links.close()
            if isinstance(error, NoPermissionError):
                self._refused = str(error)
                _log.error("redis refused a subscription: %s", error)
            else:
                _log.warning(
                    "redis subscription lost: %s; retrying in %.1fs", _explained(error), backoff
                )
            if time.monotonic() - began >= _HEALTHY_FOR:
                backoff = _BACKOFF_FIRST  # it had worked for a while: try again soon
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_LAST)

    async def _listen(self, links: _Links, name: str) -> None:
        handled = 0
        async for item in links.pubsubs[name].listen():
            kind = item["type"]
            if kind in ("message", "smessage"):
                self._on_message(item["channel"], item["data"])
            elif kind == "pmessage":
                self._on_access(item["channel"])
            elif kind in ("subscribe", "unsubscribe", "ssubscribe", "sunsubscribe"):
                if not self._on_ack(
                    item["channel"],
                    subscribed=kind.endswith("subscribe") and not kind.endswith("unsubscribe"),
                ):
                    raise ConnectionError(
                        f"redis ended the subscription to {item['channel']!r} unasked"
                        " (its slot moved to another node)"
                    )
            elif kind == "pong" and item["data"] == _LIVENESS_MESSAGE:
                links.answered[name] = time.monotonic()
            elif kind == "psubscribe":
                # Connected. Rooms wait for their own confirmations (see subscription).
                self.subscribed.set()
                for room in self._hub.rooms():
                    self._hub.recheck(room)  # an access change may have gone unannounced
            handled += 1
            if handled % _BATCH == 0:
                await asyncio.sleep(0)  # a flood must not keep the loop to itself

    def _lost(self) -> None:
        if self.subscribed.is_set():
            self.subscribed.clear()
        for state in self._rooms.values():
            self._unconfirm(state)

    def _restart_rooms(self) -> None:
        """A new connection: every wanted room is subscribed afresh and, once confirmed,
        read to its end (it may have missed messages while there was no subscription)."""
        for room, state in list(self._rooms.items()):
            if not state.wanted:
                del self._rooms[room]
                continue
            state.sent, state.acks, state.link = None, 0, ""
            state.wake = True
            self._changed.add(room)
        self._change.set()

    async def _send_commands(self, links: _Links) -> None:
        """Brings the connections' room subscriptions in line with the rooms wanted, a batch
        of commands at a time; the listeners read their confirmations."""
        while True:
            await self._change.wait()
            self._change.clear()
            changed, self._changed = self._changed, set()
            subscribe: list[str] = []
            unsubscribe: list[str] = []
            for room in changed:
                state = self._rooms.get(room)
                if state is None:
                    continue
                if state.wanted and state.sent is not True:
                    if state.sent is None:
                        state.link = links.of(self.channel(room))
                    state.sent = True
                    state.acks += 1
                    subscribe.append(room)
                elif not state.wanted and (state.sent is not False or state.acks == 0):
                    if state.sent is not True:
                        # Never subscribed on this connection, or its unsubscribe confirmed.
                        del self._rooms[room]
                        continue
                    state.sent = False
                    state.acks += 1
                    self._unconfirm(state)
                    unsubscribe.append(room)
            for rooms, change in ((subscribe, "subscribe"), (unsubscribe, "unsubscribe")):
                for link, channels in self._batches(rooms).items():
                    pubsub = links.pubsubs[link]
                    command: Callable[..., Awaitable[Any]]
                    if self._cluster:  # one SSUBSCRIBE names channels of one slot only
                        command = (
                            pubsub.ssubscribe if change == "subscribe" else pubsub.sunsubscribe
                        )
                    else:
                        command = pubsub.subscribe if change == "subscribe" else pubsub.unsubscribe
                    for batch in channels:
                        await command(*batch)
                        self._metrics.subscription_changes.labels(change).inc(len(batch))

    def _batches(self, rooms: list[str]) -> dict[str, list[list[str]]]:
        """The channels of `rooms` by connection, in batches of at most _COMMAND_BATCH; on a
        cluster, each batch of one hash slot."""
        groups: dict[tuple[str, int], list[str]] = {}
        for room in rooms:
            slot = key_slot(self.channel(room).encode()) if self._cluster else 0
            groups.setdefault((self._rooms[room].link, slot), []).append(self.channel(room))
        batches: dict[str, list[list[str]]] = {}
        for (link, _slot), channels in groups.items():
            batches.setdefault(link, []).extend(
                channels[start : start + _COMMAND_BATCH]
                for start in range(0, len(channels), _COMMAND_BATCH)
            )
        return batches

    def _unconfirm(self, state: _Room) -> None:
        """The room's subscription no longer holds (its connection went, or it is being
        unsubscribed); `_confirmed` counts those that do."""
        if state.confirmed.is_set():
            state.confirmed.clear()
            self._confirmed -= 1

    def _on_ack(self, channel: bytes, *, subscribed: bool) -> bool:
        """Redis confirmed a SUBSCRIBE or UNSUBSCRIBE of a room's channel; False when it
        ended a room's subscription unasked (a cluster does when the room's slot moves)."""
        room = self._room_of(channel)
        if room is None:
            return True
        if not room:
            if subscribed:
                self._refused = None  # the probe (see _send_commands)
            return True
        state = self._rooms.get(room)
        if state is None or state.acks == 0:
            return subscribed or state is None or state.sent is not True
        state.acks -= 1
        if state.acks:
            return True  # a later command for the channel is still to be confirmed
        if state.sent is True and subscribed:
            state.confirmed.set()
            self._confirmed += 1
            self._refused = None
            if state.wake:
                state.wake = False
                self._feed.wake([room])
        elif state.sent is False and not state.wanted:
            del self._rooms[room]
        return True

    def _room_of(self, channel: bytes) -> str | None:
        """The room whose channel `channel` is ("" for the probe), None for any other."""
        if not channel.startswith(self._channels) or not channel.endswith(b"}"):
            return None
        return channel[len(self._channels) : -1].decode("utf-8", "replace")

    def _on_access(self, channel: bytes) -> None:
        """Who may read a room changed: only the room name counts, the hub reads the truth
        from Postgres."""
        if channel.startswith(self._access_channels):
            room = channel[len(self._access_channels) :].decode("utf-8", "replace")
            self._hub.recheck(room)

    def _on_message(self, channel: bytes, data: bytes) -> None:
        """Checks a message from a room's channel and passes its room and sequence on as a
        hint; its text, sender and the like are never used."""
        feed = self._feed
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
        if not room or channel != self.channel(room).encode():
            feed.reject(WRONG_ROOM)
            return
        sequence = message.sequence
        if sequence <= 0:
            feed.reject(BAD_SEQUENCE)
            return
        if (room, sequence) in self._publishing:
            return  # this replica's own message, on its way to the local streams
        feed.hint(room, sequence, _sent(data) if tracing.active() else None)

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
