"""The chat metrics on a replica's metrics port count what happened, exactly."""

from __future__ import annotations

import math

ROOM = "metered"
CHAT_METRICS = (
    "parley_chat_streams",
    "parley_chat_messages_received_total",
    "parley_chat_messages_delivered_total",
    "parley_chat_delivery_latency_seconds_count",
    "parley_chat_delivery_latency_seconds_sum",
    "parley_chat_redis_reconnects_total",
    "parley_chat_publish_errors_total",
    "parley_chat_backfilled_messages_total",
    "parley_chat_slow_readers_total",
)


def latency_buckets(samples: dict[str, float]) -> list[tuple[float, float]]:
    prefix = 'parley_chat_delivery_latency_seconds_bucket{le="'
    buckets = [
        (float(key[len(prefix) : -2]), value)
        for key, value in samples.items()
        if key.startswith(prefix)
    ]
    return sorted(buckets)


async def test_chat_metrics_count_streams_messages_deliveries_latency_and_backfill(
    make_stack, chat, metrics, streams_joined, stream_counts, wait_for
):
    stack = await make_stack(replicas=1, people=("Ada", "Grace"))
    replica = stack.replicas[0]
    ada, grace = stack.people["Ada"], stack.people["Grace"]

    async def scrape() -> dict[str, float]:
        return await metrics(replica.metrics_port)

    start = await scrape()
    assert {name: start[name] for name in CHAT_METRICS} == dict.fromkeys(CHAT_METRICS, 0.0)

    clients = [
        await chat(ada, replica, room=ROOM),
        await chat(grace, replica, room=ROOM),
        await chat(grace, replica, room=ROOM),
    ]
    await streams_joined(replica, ada, ROOM, stream_counts(clients))
    assert (await scrape())["parley_chat_streams"] == 3

    for i in range(5):
        await clients[0].send(f"metered {i}")
    await wait_for(lambda: all(len(c.received) == 5 for c in clients), 10, "five messages")

    now = await scrape()
    assert now["parley_chat_messages_received_total"] == 5
    assert now["parley_chat_messages_delivered_total"] == 15
    assert now["parley_chat_delivery_latency_seconds_count"] == 15
    assert 0 < now["parley_chat_delivery_latency_seconds_sum"] < 15 * 5
    buckets = latency_buckets(now)
    assert buckets[-1] == (math.inf, 15)
    counts = [count for _, count in buckets]
    assert counts == sorted(counts), "histogram buckets are cumulative"
    assert now["parley_chat_backfilled_messages_total"] == 0

    # A stream resuming from the start is filled from Postgres.
    late = await chat(grace, replica, room=ROOM, resume_after=0)
    await wait_for(lambda: len(late.received) == 5, 10, "the backfill")
    now = await scrape()
    assert now["parley_chat_backfilled_messages_total"] == 5
    assert now["parley_chat_messages_delivered_total"] == 20
    assert now["parley_chat_streams"] == 4
    assert now["parley_chat_messages_received_total"] == 5

    await late.close()
    await clients[2].close()

    async def streams_now() -> float:
        return (await scrape())["parley_chat_streams"]

    await wait_for(lambda: _equals(streams_now, 2), 10, "two streams left")
    assert now["parley_chat_redis_reconnects_total"] == 0
    assert now["parley_chat_publish_errors_total"] == 0


async def _equals(get, expected: float) -> bool:
    return await get() == expected
