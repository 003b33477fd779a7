"""ChatService metrics, registered in the server's own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["ChatMetrics"]


class ChatMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.streams = Gauge(
            "parley_chat_streams",
            "StreamChat streams connected to this replica.",
            registry=registry,
        )
        self.received = Counter(
            "parley_chat_messages_received_total",
            "Chat messages received from clients and stored.",
            registry=registry,
        )
        self.delivered = Counter(
            "parley_chat_messages_delivered_total",
            "Chat messages written to streams.",
            registry=registry,
        )
        self.latency = Histogram(
            "parley_chat_delivery_latency_seconds",
            "Time from a message being stored to its delivery on a stream.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self.redis_reconnects = Counter(
            "parley_chat_redis_reconnects_total",
            "Times the Redis subscription was lost and set up again.",
            registry=registry,
        )
        self.subscribed_rooms = Gauge(
            "parley_chat_subscribed_rooms",
            "Rooms whose Redis channel this replica is subscribed to (confirmed by Redis): "
            "those with streams here, and those whose last stream left within "
            "PARLEY_CHAT_SUBSCRIPTION_LINGER.",
            registry=registry,
        )
        self.subscription_changes = Counter(
            "parley_chat_subscription_changes_total",
            "SUBSCRIBE and UNSUBSCRIBE of room channels sent to Redis, by change.",
            ["change"],
            registry=registry,
        )
        for change in ("subscribe", "unsubscribe"):
            self.subscription_changes.labels(change)
        self.publish_errors = Counter(
            "parley_chat_publish_errors_total",
            "Messages stored but not published to Redis (other replicas catch up from Postgres).",
            registry=registry,
        )
        self.backfilled = Counter(
            "parley_chat_backfilled_messages_total",
            "Messages delivered from Postgres to fill a gap or catch up a stream.",
            registry=registry,
        )
        self.slow_readers = Counter(
            "parley_chat_slow_readers_total",
            "Times a stream's queue overflowed and it fell back to catching up from Postgres.",
            registry=registry,
        )
        self.bus_rejected = Counter(
            "parley_chat_bus_rejected_total",
            "Messages on the Redis chat channels dropped as not this deployment's: too large, "
            "unreadable, for another room, a bad sequence, or a sequence Postgres does not hold.",
            ["reason"],
            registry=registry,
        )
        self.room_reads = Counter(
            "parley_chat_room_reads_total",
            "Reads of a room from Postgres for this replica's streams: when its first stream "
            "joins, on a hint from Redis, and on a check.",
            registry=registry,
        )
        self.refusals = Counter(
            "parley_chat_refusals_total",
            "ChatService calls answered with an error, by RPC and reason (the ErrorInfo reason: "
            "ROOM_ACCESS_DENIED, NOT_ROOM_OWNER, RATE_LIMITED, ...).",
            ["rpc", "reason"],
            registry=registry,
        )
        self.access_revoked = Counter(
            "parley_chat_access_revoked_total",
            "Open streams ended with PERMISSION_DENIED because their user may no longer read "
            "the room (removed, the room made private or deleted).",
            registry=registry,
        )
        self.access_checks = Counter(
            "parley_chat_access_checks_total",
            "Reads of who may read a room, for this replica's streams, by whether they found a "
            "change (a flood of 'unchanged' ones is forged access announcements).",
            ["outcome"],
            registry=registry,
        )
        for outcome in ("changed", "unchanged"):
            self.access_checks.labels(outcome)
