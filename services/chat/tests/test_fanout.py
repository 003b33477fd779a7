"""One room, many streams, two replicas: every stream gets every message once, in order."""

from __future__ import annotations

import asyncio

SENDERS = 10
MESSAGES_EACH = 10
STREAMS = 100
ROOM = "townhall"


async def test_a_hundred_streams_on_two_replicas_each_receive_every_message_once_in_order(
    make_stack, chat, stored, streams_joined, stream_counts, conversation_intact, wait_for
):
    names = [f"Member {i}" for i in range(SENDERS)]
    stack = await make_stack(replicas=2, people=names)
    a, b = stack.replicas
    people = [stack.people[name] for name in names]

    # Stream i belongs to person i % 10 and runs on replica i % 2, over one of 10 connections
    # per replica; the first ten streams are the senders, five on each replica.
    clients = await asyncio.gather(
        *(
            chat(people[i % SENDERS], (a, b)[i % 2], room=ROOM, channel_key=i % 10)
            for i in range(STREAMS)
        )
    )
    await streams_joined(a, people[0], ROOM, stream_counts(clients))
    senders = clients[:SENDERS]
    assert {c.service.port for c in senders} == {a.port, b.port}

    async def talk(client) -> None:
        for k in range(MESSAGES_EACH):
            await client.send(f"{client.person.name} says {k}", f"{client.name}-{k}")

    await asyncio.gather(*(talk(sender) for sender in senders))
    total = SENDERS * MESSAGES_EACH

    def everyone_has_everything() -> bool:
        return all(len(c.received) >= total for c in clients)

    await wait_for(everyone_has_everything, 60, f"{total} messages on each of {STREAMS} streams")
    # One more message: a late duplicate of anything earlier would arrive before it.
    await senders[0].send("that is all", "last")
    await wait_for(lambda: all(len(c.received) >= total + 1 for c in clients), 30, "the last one")

    rows = await stored(stack.database, ROOM)
    assert len(rows) == total + 1
    conversation_intact(clients, rows)
    assert all(c.error is None and not c.ended for c in clients)
    # Each sender's messages keep the order they were sent in.
    for sender in senders:
        mine = [m.client_message_id for m in clients[-1].received if m.user_id == sender.person.id]
        expected = [f"{sender.name}-{k}" for k in range(MESSAGES_EACH)]
        assert [m for m in mine if m != "last"] == expected
