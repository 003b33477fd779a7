"""A stream that never reads must not slow the room down nor grow the server's memory; once it
reads again it catches up from Postgres, every message once and in order."""

from __future__ import annotations

import asyncio
import time

ROOM = "firehose"
WARM_UP = 50
MESSAGES = 2000
TEXT = "x" * 4000
SLOW_READERS = 8
QUEUE_LIMIT = 16
MEMORY_BOUND = 50 * 1024 * 1024
# A client that does not read stops granting HTTP/2 window, so the server soon cannot write.
NO_WINDOW_GROWTH = [("grpc.http2.bdp_probe", 0)]


async def test_a_reader_that_never_reads_neither_slows_the_room_nor_grows_the_server(
    make_stack,
    chat,
    stored,
    metrics,
    rss,
    streams_joined,
    stream_counts,
    conversation_intact,
    wait_for,
):
    stack = await make_stack(
        replicas=1,
        people=("Ada", "Grace", "Sloth"),
        PARLEY_CHAT_QUEUE_LIMIT=str(QUEUE_LIMIT),
    )
    replica = stack.replicas[0]
    ada, grace, sloth = (stack.people[n] for n in ("Ada", "Grace", "Sloth"))
    sender = await chat(ada, replica, room=ROOM, channel_key="sender")
    fast = [await chat(grace, replica, room=ROOM, channel_key=f"fast-{i}") for i in range(3)]
    slow = [
        await chat(
            sloth,
            replica,
            room=ROOM,
            channel_key=f"slow-{i}",
            channel_options=NO_WINDOW_GROWTH,
            read=False,
        )
        for i in range(SLOW_READERS)
    ]
    readers = [sender, *fast]
    await streams_joined(replica, ada, ROOM, stream_counts([*readers, *slow]))

    def readers_have(count: int):
        return lambda: all(len(c.received) >= count for c in readers)

    for i in range(WARM_UP):
        await sender.send(f"warm-up {i}")
    await wait_for(readers_have(WARM_UP), 20, "the warm-up messages")
    before = await metrics(replica.metrics_port)
    rss_before = rss(replica.pid)

    started = time.monotonic()

    async def send_all() -> None:
        for i in range(MESSAGES):
            await sender.send(f"{i} {TEXT}")

    sending = asyncio.create_task(send_all())
    await wait_for(readers_have(WARM_UP + MESSAGES), 60, "every message on the reading streams")
    elapsed = time.monotonic() - started
    await sending
    rss_after = rss(replica.pid)
    after = await metrics(replica.metrics_port)

    assert elapsed < 45, f"the room slowed down: {MESSAGES} messages took {elapsed:.1f}s"
    assert rss_after - rss_before < MEMORY_BOUND, (
        f"server memory grew by {(rss_after - rss_before) / 2**20:.1f} MiB"
    )
    slow_readers = "parley_chat_slow_readers_total"
    assert after[slow_readers] >= before[slow_readers] + SLOW_READERS, (
        "a slow stream never overflowed"
    )
    assert all(not c.received and not c.ended for c in slow)

    backfilled = "parley_chat_backfilled_messages_total"
    for client in slow:
        client.start_reading()
    total = WARM_UP + MESSAGES
    await wait_for(
        lambda: all(len(c.received) >= total for c in slow), 60, "the slow streams to catch up"
    )
    await sender.send("the end")
    everyone = [*readers, *slow]
    await wait_for(lambda: all(len(c.received) > total for c in everyone), 20, "the end")

    rows = await stored(stack.database, ROOM)
    assert len(rows) == total + 1
    conversation_intact(everyone, rows)
    caught_up = await metrics(replica.metrics_port)
    assert caught_up[backfilled] > after[backfilled], (
        "the slow streams did not catch up from Postgres"
    )
