"""A chat replica dies (SIGKILL) or drains (SIGTERM) mid-conversation: its clients resume on
the other replica with `x-chat-resume-after`, resend what was not acknowledged, and nothing
is lost or duplicated on any stream."""

from __future__ import annotations

import asyncio

import grpc

ROOM = "failover"
SENDERS = 6
MESSAGES_EACH = 50
LISTENERS_PER_REPLICA = 5
GRACE = 5.0


async def start_conversation(make_stack, chat, streams_joined, stream_counts, **overrides):
    names = [f"Speaker {i}" for i in range(SENDERS)]
    stack = await make_stack(replicas=2, people=names, **overrides)
    a, b = stack.replicas
    people = [stack.people[name] for name in names]
    clients = await asyncio.gather(
        *(chat(people[i], (a, b)[i % 2], room=ROOM) for i in range(SENDERS)),
        *(
            chat(people[i % SENDERS], replica, room=ROOM)
            for replica in (a, b)
            for i in range(LISTENERS_PER_REPLICA)
        ),
    )
    senders, listeners = clients[:SENDERS], clients[SENDERS:]
    await streams_joined(b, people[0], ROOM, stream_counts(clients))
    for sender in senders:
        sender.queue([f"{sender.name} line {k}" for k in range(MESSAGES_EACH)])
    return stack, senders, listeners


async def fail_over(stack, clients, sending, stop_replica, wait_for):
    """Stops replica A once its listeners are well into the conversation, then moves A's
    clients to B; returns the errors A's streams ended with."""
    a, b = stack.replicas
    on_a = [c for c in clients if c.service is a]
    total = SENDERS * MESSAGES_EACH
    await wait_for(
        lambda: any(len(c.received) >= total // 4 for c in on_a), 30, "a quarter of the talk"
    )
    assert not all(len(c.received) >= total for c in clients), "the talk ended too soon"
    await stop_replica(a)

    for client in on_a:
        await client.wait_until_ended(15)
    errors = [client.error for client in on_a]
    # Senders whose stream broke stop writing; they resend everything unacknowledged.
    await asyncio.gather(*sending)
    for client in on_a:
        await client.resume(b)
    await asyncio.gather(*(client.send_pending() for client in on_a if client.outbox))
    return errors


async def finish(stack, clients, stored, conversation_intact, wait_for):
    total = SENDERS * MESSAGES_EACH
    await wait_for(
        lambda: all(len(c.received) >= total for c in clients), 60, "every message everywhere"
    )
    rows = await stored(stack.database, ROOM)
    assert len(rows) == total, "every message is stored exactly once"
    conversation_intact(clients, rows)
    b = stack.replicas[1]
    assert all(c.service is b and not c.ended for c in clients)


async def test_sigkill_of_a_replica_loses_and_duplicates_nothing(
    make_stack, launcher, chat, streams_joined, stream_counts, stored, conversation_intact, wait_for
):
    stack, senders, listeners = await start_conversation(
        make_stack, chat, streams_joined, stream_counts, PARLEY_CHAT_PRESENCE_TTL="1s"
    )
    clients = senders + listeners
    sending = [asyncio.create_task(s.send_pending()) for s in senders]

    errors = await fail_over(stack, clients, sending, launcher.kill, wait_for)
    assert {error.code() for error in errors} == {grpc.StatusCode.UNAVAILABLE}
    await finish(stack, clients, stored, conversation_intact, wait_for)
    resumed = [c for c in clients if c.connections == 2]
    assert len(resumed) == SENDERS // 2 + LISTENERS_PER_REPLICA
    # The dead replica never withdrew its streams from presence: they expire instead.
    await streams_joined(stack.replicas[1], senders[0].person, ROOM, stream_counts(clients))


async def test_sigterm_drains_streams_as_unavailable_and_exits_0_within_the_grace(
    make_stack, launcher, chat, streams_joined, stream_counts, stored, conversation_intact, wait_for
):
    stack, senders, listeners = await start_conversation(
        make_stack, chat, streams_joined, stream_counts, PARLEY_SHUTDOWN_GRACE=f"{GRACE:g}"
    )
    clients = senders + listeners
    sending = [asyncio.create_task(s.send_pending()) for s in senders]
    exit_codes: list[int] = []
    durations: list[float] = []

    async def terminate(replica) -> None:
        duration, code = await launcher.terminate(replica, GRACE + 10)
        exit_codes.append(code)
        durations.append(duration)

    errors = await fail_over(stack, clients, sending, terminate, wait_for)
    assert exit_codes == [0], stack.replicas[0].log_text()
    assert durations[0] < GRACE, f"took {durations[0]:.1f}s to exit"
    # Each stream was ended by the drain itself, with a status telling the client what to do.
    for error in errors:
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down; reconnect and resume" in error.details()
    await finish(stack, clients, stored, conversation_intact, wait_for)
