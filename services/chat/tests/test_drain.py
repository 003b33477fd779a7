"""Draining ends every stream at once, whatever its client was doing: the replica does not
sit out its grace period."""

from __future__ import annotations

import asyncio
import sys
import time

import grpc

GRACE = 10.0
ROOM = "closing-time"
PEOPLE = 4
STREAMS = 12
EACH = 80


async def test_a_replica_drained_mid_conversation_ends_its_streams_at_once(
    make_stack, launcher, chat, streams_joined, stream_counts, wait_for
):
    names = [f"Talker {i}" for i in range(PEOPLE)]
    stack = await make_stack(
        replicas=2,
        people=names,
        in_process=True,
        PARLEY_SHUTDOWN_GRACE=f"{GRACE:g}",
        PARLEY_DB_POOL_MAX="2",
    )
    a, b = stack.replicas
    people = [stack.people[name] for name in names]
    clients = await asyncio.gather(
        *(chat(people[i % PEOPLE], (a, b)[i % 2], room=ROOM) for i in range(STREAMS))
    )
    await streams_joined(b, people[0], ROOM, stream_counts(clients))
    senders = clients[:PEOPLE]
    for sender in senders:
        sender.queue([f"{sender.name} line {k}" for k in range(EACH)])
    sending = [asyncio.create_task(sender.send_pending()) for sender in senders]
    await wait_for(lambda: any(len(c.received) >= 60 for c in clients), 20, "the talk")

    started = time.monotonic()
    await launcher.stop(a)
    took = time.monotonic() - started
    await asyncio.gather(*sending)
    assert took < GRACE / 3, f"draining took {took:.1f}s of a {GRACE:g}s grace"
    for client in clients:
        if client.service is a:
            assert await client.wait_until_ended(5) == grpc.StatusCode.UNAVAILABLE
            assert "shutting down; reconnect and resume" in client.error.details()


async def test_a_task_that_drops_its_cancellation_is_still_stopped():
    """As redis-py's and psycopg_pool's calls do on Python 3.11: `asyncio.wait_for` returns
    normally when the cancellation lands just as the operation it waits for completes."""
    from parley.chassis.tasks import cancel_and_wait

    operation = asyncio.get_running_loop().create_future()
    waiting = asyncio.Event()
    carried_on = asyncio.Event()

    async def reader() -> None:
        waiting.set()
        await asyncio.wait_for(operation, timeout=60)
        carried_on.set()  # on 3.11 the cancellation was dropped: on to the next read
        await asyncio.Event().wait()

    task = asyncio.create_task(reader())
    await waiting.wait()
    operation.set_result(None)  # completes, and the cancellation follows in the same turn
    await asyncio.wait_for(cancel_and_wait(task), timeout=5)
    assert task.cancelled()
    if sys.version_info < (3, 12):
        assert carried_on.is_set(), "the first cancellation was expected to be dropped"
