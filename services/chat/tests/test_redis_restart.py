"""Redis, the fast path between replicas, stops and comes back mid-conversation (same port):
Postgres keeps every message and every stream catches up, with nothing lost or duplicated."""

from __future__ import annotations

from parley.testing import chat_client
from parley.testing.chat_client import everyone_has

ROOM = "weather"
EACH = 10
NOT_SERVING = 2


async def send_round(senders, round_name: str) -> None:
    await chat_client.send_round(senders, round_name, EACH)


async def conversation(make_stack, private_redis, chat, streams_joined, stream_counts, resync):
    """Two replicas on a private Redis: a sender on each, and two listeners on each."""
    redis = await private_redis()
    stack = await make_stack(
        replicas=2,
        people=("Ada", "Grace", "Linus"),
        redis_url=redis.url,
        PARLEY_CHAT_RESYNC_INTERVAL=resync,
    )
    a, b = stack.replicas
    ada, grace, linus = (stack.people[n] for n in ("Ada", "Grace", "Linus"))
    senders = [await chat(ada, a, room=ROOM), await chat(grace, b, room=ROOM)]
    listeners = [await chat(linus, replica, room=ROOM) for replica in (a, b, a, b)]
    await streams_joined(a, linus, ROOM, stream_counts(senders + listeners))
    return redis, stack, senders, listeners


async def status_is(status, expected: int) -> bool:
    return await status == expected


async def count_is(get, expected: int) -> bool:
    return len(await get()) == expected


async def check_end(
    stack, clients, stored, metrics, conversation_intact, wait_for, total: int
) -> None:
    rows = await stored(stack.database, ROOM)
    assert len(rows) == total
    conversation_intact(clients, rows)
    assert all(c.connections == 1 and not c.ended for c in clients), "no stream had to reconnect"
    # Resubscribing backs off while Redis is down (up to 2 s), so it may come after the talk.
    for replica in stack.replicas:

        async def resubscribed(port=replica.metrics_port) -> bool:
            return (await metrics(port))["parley_chat_redis_reconnects_total"] >= 1

        await wait_for(resubscribed, 15, f"replica {replica.port} to count its reconnect")


async def test_messages_sent_while_redis_is_down_are_stored_and_resynced_to_every_stream(
    make_stack,
    private_redis,
    chat,
    stored,
    metrics,
    health,
    streams_joined,
    stream_counts,
    conversation_intact,
    wait_for,
):
    redis, stack, senders, listeners = await conversation(
        make_stack, private_redis, chat, streams_joined, stream_counts, "0.5s"
    )
    clients = senders + listeners
    await send_round(senders, "before")
    await wait_for(everyone_has(clients, 2 * EACH), 20, "the messages sent before the outage")

    await redis.stop()
    await send_round(senders, "during")
    rows = lambda: stored(stack.database, ROOM)  # noqa: E731
    await wait_for(lambda: count_is(rows, 4 * EACH), 20, "the messages of the outage stored")
    # Without pub/sub, the periodic check against Postgres brings them to the other replica.
    await wait_for(everyone_has(clients, 4 * EACH), 20, "the outage's messages on every stream")
    for replica in stack.replicas:
        await wait_for(
            lambda r=replica: status_is(health(r.port, "chat.ChatService"), NOT_SERVING),
            10,
            "readiness to follow Redis down",
        )
    assert redis.process is None

    await redis.start()
    await send_round(senders, "after")
    await wait_for(everyone_has(clients, 6 * EACH), 30, "the messages sent after the outage")
    await check_end(stack, clients, stored, metrics, conversation_intact, wait_for, 6 * EACH)


async def test_streams_catch_up_from_postgres_when_the_redis_subscription_is_back(
    make_stack,
    private_redis,
    chat,
    stored,
    metrics,
    streams_joined,
    stream_counts,
    conversation_intact,
    wait_for,
):
    # No periodic resync during the test: only the restored subscription can fill the gap.
    redis, stack, senders, listeners = await conversation(
        make_stack, private_redis, chat, streams_joined, stream_counts, "3600s"
    )
    clients = senders + listeners
    await send_round(senders, "before")
    await wait_for(everyone_has(clients, 2 * EACH), 20, "the messages sent before the outage")

    await redis.stop()
    await send_round(senders[:1], "during")  # Ada, on replica A
    rows = lambda: stored(stack.database, ROOM)  # noqa: E731
    await wait_for(lambda: count_is(rows, 3 * EACH), 20, "the messages of the outage stored")
    on_a = [c for c in clients if c.service is stack.replicas[0]]
    await wait_for(everyone_has(on_a, 3 * EACH), 20, "the outage's messages on replica A")
    on_b = [c for c in clients if c.service is stack.replicas[1]]
    assert [len(c.received) for c in on_b] == [2 * EACH] * len(on_b), "B had no way to know yet"

    await redis.start()
    await wait_for(everyone_has(clients, 3 * EACH), 30, "the outage's messages on every stream")
    await send_round(senders, "after")
    await wait_for(everyone_has(clients, 5 * EACH), 30, "the messages sent after the outage")
    await check_end(stack, clients, stored, metrics, conversation_intact, wait_for, 5 * EACH)
