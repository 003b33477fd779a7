"""A message resent with the same client_message_id is stored once and delivered once."""

from __future__ import annotations

import asyncio

ROOM = "retries"


async def test_a_resent_message_is_stored_and_delivered_once_on_the_same_stream_and_after_moving(
    make_stack, chat, stored, streams_joined, stream_counts, conversation_intact, wait_for
):
    stack = await make_stack(replicas=2, people=("Ada", "Grace"), in_process=True)
    a, b = stack.replicas
    ada, grace = stack.people["Ada"], stack.people["Grace"]
    sender = await chat(ada, a, room=ROOM)
    listeners = [await chat(grace, a, room=ROOM), await chat(grace, b, room=ROOM)]
    clients = [sender, *listeners]
    await streams_joined(a, ada, ROOM, stream_counts(clients))

    def everyone_has(count: int):
        return lambda: all(len(c.received) >= count for c in clients)

    await sender.send("hello", "m1")
    await wait_for(everyone_has(1), 10, "the first message")
    # The same message again on the same stream (say its acknowledgement was slow), then more.
    await sender.send("hello", "m1")
    await sender.send("hello, edited", "m1")
    await sender.send("again", "m2")
    await wait_for(everyone_has(2), 10, "the second message")

    # The sender reconnects on the other replica and resends everything it had sent.
    await sender.close()
    await sender.resume(b)
    await sender.send("hello", "m1")
    await sender.send("again", "m2")
    await sender.send("third", "m3")
    await wait_for(everyone_has(3), 10, "the third message")
    # A last message: anything delivered twice would have come before it.
    await listeners[0].send("done", "g1")
    await wait_for(everyone_has(4), 10, "the last message")

    rows = await stored(stack.database, ROOM)
    assert [(r.sequence, r.text, r.client_message_id) for r in rows] == [
        (1, "hello", "m1"),
        (2, "again", "m2"),
        (3, "third", "m3"),
        (4, "done", "g1"),
    ]
    conversation_intact(clients, rows)
    assert sender.connections == 2


async def test_the_same_message_raced_on_two_replicas_is_stored_once(
    make_stack, chat, stored, streams_joined, stream_counts, conversation_intact, wait_for
):
    stack = await make_stack(replicas=2, people=("Ada", "Grace"), in_process=True)
    a, b = stack.replicas
    ada, grace = stack.people["Ada"], stack.people["Grace"]
    # Ada has a stream on each replica and, as a client unsure of its connection might,
    # sends every message on both at once.
    twins = [await chat(ada, a, room=ROOM), await chat(ada, b, room=ROOM)]
    listeners = [await chat(grace, a, room=ROOM), await chat(grace, b, room=ROOM)]
    clients = twins + listeners
    await streams_joined(b, grace, ROOM, stream_counts(clients))

    count = 30

    async def send_all(client) -> None:
        for i in range(count):
            await client.send(f"message {i}", f"race-{i}")

    await asyncio.gather(*(send_all(twin) for twin in twins))
    await wait_for(lambda: all(len(c.received) >= count for c in clients), 20, "every message")
    await listeners[1].send("done", "g1")
    await wait_for(lambda: all(len(c.received) >= count + 1 for c in clients), 10, "the last")

    rows = await stored(stack.database, ROOM)
    assert [r.client_message_id for r in rows] == [f"race-{i}" for i in range(count)] + ["g1"]
    conversation_intact(clients, rows)


async def test_client_ids_are_per_sender_and_room(make_stack, chat, stored, wait_for):
    stack = await make_stack(replicas=1, people=("Ada", "Grace"), in_process=True)
    replica = stack.replicas[0]
    ada, grace = stack.people["Ada"], stack.people["Grace"]
    ada_here = await chat(ada, replica, room="here", resume_after=0)
    grace_here = await chat(grace, replica, room="here", resume_after=0)
    ada_there = await chat(ada, replica, room="there", resume_after=0)

    await ada_here.send("from Ada", "same-id")
    await grace_here.send("from Grace", "same-id")
    await ada_there.send("from Ada, elsewhere", "same-id")
    await ada_here.send("no id twice", "")
    await ada_here.send("no id twice", "")
    await wait_for(lambda: len(ada_here.received) == 4, 10, "the four messages in here")
    await wait_for(lambda: len(ada_there.received) == 1, 10, "the message in there")

    here = await stored(stack.database, "here")
    assert sorted((r.user_id, r.text) for r in here) == sorted(
        [
            (ada.id, "from Ada"),
            (grace.id, "from Grace"),
            (ada.id, "no id twice"),
            (ada.id, "no id twice"),
        ]
    )
    there = await stored(stack.database, "there")
    assert [(r.user_id, r.text) for r in there] == [(ada.id, "from Ada, elsewhere")]
