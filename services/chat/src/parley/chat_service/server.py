"""Builds the ChatService gRPC server on the chassis."""

from __future__ import annotations

import os
import socket
import uuid

import grpc

from parley.chassis import DependencyCheck, GrpcApp, TokenVerifier, Unavailable
from parley.proto import chat_pb2
from parley.proto.contract import CHAT_SERVICE

from .bus import RedisBus
from .feed import RoomFeed
from .hub import RoomHub
from .metrics import ChatMetrics
from .migrations import MIGRATIONS
from .presence import Presence
from .retention import RetentionSweeper
from .room_store import RoomStore
from .senders import SenderCheck
from .servicer import CHAT_LIMITS, ChatServicer
from .settings import ChatSettings, UserServiceTls
from .store import MessageStore
from .users import USER_SERVICE, UserDirectory

__all__ = ["SERVICE_NAME", "create_server"]

SERVICE_NAME = CHAT_SERVICE


def create_server(settings: ChatSettings) -> GrpcApp:
    """A ready-to-start server bound to its port (read `.port`; port 0 picks a free one)."""
    # The app owns the metrics registry, so it is built before the parts that count.
    app = GrpcApp(
        settings.server,
        services=[chat_pb2.DESCRIPTOR.services_by_name["ChatService"]],
        verifier=TokenVerifier(settings.auth),
    )
    db = app.use_database(settings.database, application_name="parley-chat", migrations=MIGRATIONS)
    store = MessageStore(
        db,
        rate=settings.rate_limit,
        burst=settings.rate_burst,
        max_messages=settings.retention.max_messages,
    )
    rooms = RoomStore(db, max_rooms_per_user=settings.max_rooms_per_user)
    users = UserDirectory(
        settings.user_service,
        timeout=settings.user_timeout,
        cache_ttl=settings.user_cache_ttl,
        max_stale=settings.user_cache_max_stale,
        credentials=_user_credentials(settings.user_tls),
    )

    async def last_sequence(room: str) -> int:
        return await store.last_sequence(room)

    async def messages_after(
        room: str, sequence: int, limit: int
    ) -> tuple[list[chat_pb2.ChatMessage], tuple[int, int] | None]:
        return await store.after(room, sequence, limit)

    metrics = ChatMetrics(app.metrics.registry)
    app.metrics.initialize_limits(CHAT_LIMITS)
    # Access checks share the pool with the calls too: a flood of forged access hints takes a
    # quarter of it at most.
    hub = RoomHub(
        metrics, settings.queue_limit, check_concurrency=max(1, settings.database.pool_max // 4)
    )
    hub.check_access_with(rooms.readers)
    feed = RoomFeed(
        hub,
        metrics,
        messages_after,
        last_sequence,
        backlog=settings.queue_limit,
        # Leaves most of the pool to the calls (a flood of hints must not starve them).
        concurrency=max(1, settings.database.pool_max // 2),
    )
    bus = RedisBus(
        settings.redis_url,
        settings.redis_prefix,
        hub,
        feed,
        metrics,
        settings.resync_interval,
        cluster=settings.redis_cluster,
        linger=settings.subscription_linger,
    )
    bus.check_access_with(rooms.versions)
    replica = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    presence = Presence(bus.client, settings.redis_prefix, replica, hub, settings.presence_ttl)
    app.monitor.add(DependencyCheck("redis", bus.ping))
    app.monitor.add(DependencyCheck(USER_SERVICE, users.probe, critical=False))
    servicer = ChatServicer(
        store,
        rooms,
        hub,
        bus,
        presence,
        users,
        metrics,
        rate_limit=settings.rate_limit,
        rate_burst=settings.rate_burst,
        max_streams_per_user=settings.max_streams_per_user,
        auto_create_rooms=settings.auto_create_rooms,
        max_rooms_per_user=settings.max_rooms_per_user,
        max_members=settings.max_members,
    )
    servicer.add_to_server(app.server)
    # Streams whose token expired end within the interval; those of users deleted from
    # UserService within PARLEY_USER_CACHE_TTL plus the interval.
    senders = SenderCheck(hub, users, interval=settings.resync_interval)
    # Bounded history: one replica at a time deletes what is over the limits, in batches.
    retention = RetentionSweeper(db, settings.retention, metrics.retention)

    async def drain() -> None:
        # Ends every stream so its client reconnects to another replica and resumes.
        hub.close_all(Unavailable("this chat replica", "it is shutting down; reconnect and resume"))

    app.on_start(bus.start)
    app.on_start(presence.start)
    app.on_start(senders.start)
    app.on_start(retention.start)
    app.on_drain(drain)
    app.on_stop(retention.stop)
    app.on_stop(senders.stop)
    app.on_stop(presence.stop)
    app.on_stop(bus.stop)
    app.on_stop(feed.stop)
    app.on_stop(hub.stop)
    app.on_stop(users.close)
    return app


def _user_credentials(tls: UserServiceTls | None) -> grpc.ChannelCredentials | None:
    if tls is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=tls.root_ca, private_key=tls.key, certificate_chain=tls.cert
    )
