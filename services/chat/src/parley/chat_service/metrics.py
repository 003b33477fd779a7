"""ChatService metrics, registered in the server's own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["RETENTION_REASONS", "ChatMetrics", "RetentionMetrics"]


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
        self.retention = RetentionMetrics(registry)


# Why the retention sweeper deleted a message: older than PARLEY_CHAT_RETENTION_MAX_AGE, or
# beyond PARLEY_CHAT_RETENTION_MAX_MESSAGES of its room (a message over both counts as count).
RETENTION_REASONS = ("age", "count")


class RetentionMetrics:
    """What the history retention sweeper (retention.py) did on this replica."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.deleted = Counter(
            "parley_chat_retention_deleted_messages_total",
            "Chat messages deleted by history retention on this replica, by reason: older than "
            "PARLEY_CHAT_RETENTION_MAX_AGE (age), or beyond PARLEY_CHAT_RETENTION_MAX_MESSAGES "
            "of their room (count).",
            ["reason"],
            registry=registry,
        )
        for reason in RETENTION_REASONS:
            self.deleted.labels(reason)
        self.batch_seconds = Histogram(
            "parley_chat_retention_batch_duration_seconds",
            "Duration of one retention batch: one short transaction deleting at most "
            "PARLEY_CHAT_RETENTION_BATCH messages of one room.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=registry,
        )
        self.failures = Counter(
            "parley_chat_retention_sweep_failures_total",
            "Retention batches and scans that failed (Postgres unavailable, a statement "
            "timeout), and sweeps that could not start; the sweep goes on with the other rooms, "
            "and the next one, after PARLEY_CHAT_RETENTION_INTERVAL, tries again.",
            registry=registry,
        )
        self.yielded = Counter(
            "parley_chat_retention_sweeps_yielded_total",
            "Retention sweeps this replica left to another one, which held the sweep lock.",
            registry=registry,
        )
        self.last_sweep = Gauge(
            "parley_chat_retention_last_sweep_timestamp_seconds",
            "When this replica last completed a retention sweep (seconds since the epoch; 0: "
            "never). Alert when the newest across replicas is older than a few intervals.",
            registry=registry,
        )
