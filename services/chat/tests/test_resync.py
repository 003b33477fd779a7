"""The periodic check against Postgres is a safety net, not a load: an idle room costs a query
per check, not a query per stream per check."""

from __future__ import annotations

import time

ROOM = "quiet"
RESYNC = 0.2
STREAMS = 20
WINDOW = 1.0


async def test_idle_streams_in_a_room_with_history_are_not_re_read_at_every_check(
    make_stack, chat, metrics, streams_joined, wait_for
):
    stack = await make_stack(
        replicas=1,
        people=("Ada",),
        PARLEY_CHAT_RESYNC_INTERVAL=f"{RESYNC}s",
        PARLEY_CHAT_MAX_STREAMS_PER_USER="1000",
    )
    replica = stack.replicas[0]
    ada = stack.people["Ada"]
    first = await chat(ada, replica, room=ROOM, resume_after=0)
    await first.send("old news")
    await wait_for(lambda: first.received, 10, "the first message")
    await first.close()

    listeners = [await chat(ada, replica, room=ROOM) for _ in range(STREAMS)]
    await streams_joined(replica, ada, ROOM, {ada.id: STREAMS})
    # Let the first checks see the room's history once.
    first_scrape = await metrics(replica.metrics_port)
    started = time.monotonic()
    await wait_for(lambda: time.monotonic() - started >= WINDOW, WINDOW + 5, "a first window")

    requests = "parley_db_pool_requests_total"
    before = await metrics(replica.metrics_port)
    started = time.monotonic()
    await wait_for(lambda: time.monotonic() - started >= WINDOW, WINDOW + 5, "a quiet window")
    after = await metrics(replica.metrics_port)
    checks = (time.monotonic() - started) / RESYNC
    # Each check reads the room's sequence once; the readiness probe adds about as many.
    # Sending every stream back to Postgres would cost STREAMS more queries per check.
    spent = after[requests] - before[requests]
    assert spent <= 4 * checks, f"{spent:.0f} queries in {checks:.0f} checks of an idle room"
    assert (
        after["parley_chat_backfilled_messages_total"]
        == first_scrape["parley_chat_backfilled_messages_total"]
    )

    # The streams are still live.
    await first.resume(replica)
    await first.send("new news")
    await wait_for(lambda: all(len(c.received) == 1 for c in listeners), 10, "the new message")
    assert {c.received[0].text for c in listeners} == {"new news"}
