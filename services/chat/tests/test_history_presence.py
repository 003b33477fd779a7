"""ListMessages pages through a room's history both ways; ListPresence sees every replica."""

from __future__ import annotations

import psycopg

from parley.proto import chat_pb2, chat_pb2_grpc

ROOM = "history"


def history_stub(channels, service):
    return chat_pb2_grpc.ChatServiceStub(channels.get(service.target))


async def page(stub, person, **request):
    reply = await stub.ListMessages(
        chat_pb2.ListMessagesRequest(**request),
        metadata=[("authorization", f"Bearer {person.token}")],
        timeout=10,
    )
    return [m.sequence for m in reply.messages], reply.has_more, reply.last_sequence


async def test_list_messages_pages_forward_and_backward(make_stack, chat, channels, wait_for):
    stack = await make_stack(replicas=2, people=("Ada", "Grace"), in_process=True)
    a, b = stack.replicas
    ada, grace = stack.people["Ada"], stack.people["Grace"]
    sender = await chat(ada, a, room=ROOM, resume_after=0)
    for i in range(1, 13):
        await sender.send(f"message {i}")
    await wait_for(lambda: len(sender.received) == 12, 10, "twelve messages")

    stub = history_stub(channels, b)  # any replica reads the same history
    forward = [
        await page(stub, grace, room=ROOM, page_size=5),
        await page(stub, grace, room=ROOM, page_size=5, after_sequence=5),
        await page(stub, grace, room=ROOM, page_size=5, after_sequence=10),
        await page(stub, grace, room=ROOM, page_size=5, after_sequence=12),
    ]
    assert forward == [
        ([1, 2, 3, 4, 5], True, 12),
        ([6, 7, 8, 9, 10], True, 12),
        ([11, 12], False, 12),
        ([], False, 12),
    ]
    assert await page(stub, grace, room=ROOM, page_size=4, after_sequence=8) == (
        [9, 10, 11, 12],
        False,
        12,
    )

    backward = [
        await page(stub, grace, room=ROOM, page_size=5, before_sequence=13),
        await page(stub, grace, room=ROOM, page_size=5, before_sequence=8),
        await page(stub, grace, room=ROOM, page_size=5, before_sequence=3),
        await page(stub, grace, room=ROOM, page_size=5, before_sequence=1),
    ]
    assert backward == [
        ([8, 9, 10, 11, 12], True, 12),
        ([3, 4, 5, 6, 7], True, 12),
        ([1, 2], False, 12),
        ([], False, 12),
    ]
    # before_sequence wins over after_sequence; a far-future bound reads the newest page.
    assert await page(
        stub, grace, room=ROOM, page_size=3, before_sequence=99, after_sequence=2
    ) == (
        [10, 11, 12],
        True,
        12,
    )
    # The default page is 50: everything here, oldest first.
    assert await page(stub, grace, room=ROOM) == (list(range(1, 13)), False, 12)

    full = await stub.ListMessages(
        chat_pb2.ListMessagesRequest(room=ROOM, page_size=1),
        metadata=[("authorization", f"Bearer {grace.token}")],
    )
    (first,) = full.messages
    assert (first.user, first.user_id, first.text, first.room) == (
        "Ada",
        ada.id,
        "message 1",
        ROOM,
    )
    assert first == sender.received[0]

    assert await page(stub, grace, room="empty-room") == ([], False, 0)
    assert await page(stub, grace, room="empty-room", before_sequence=10) == ([], False, 0)


async def test_page_sizes_default_to_50_and_stop_at_500(make_stack, channels):
    stack = await make_stack(replicas=1, people=("Ada",), in_process=True)
    ada = stack.people["Ada"]
    async with await psycopg.AsyncConnection.connect(stack.database, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO chat_rooms (name, last_sequence) VALUES ('big', 600)",
        )
        await conn.execute(
            "INSERT INTO chat_messages (room, sequence, user_id, user_name, text)"
            " SELECT 'big', g, %s, 'Ada', 'line ' || g FROM generate_series(1, 600) AS g",
            (ada.id,),
        )
    stub = history_stub(channels, stack.replicas[0])
    sequences, more, last = await page(stub, ada, room="big")
    assert (sequences, more, last) == (list(range(1, 51)), True, 600)
    sequences, more, last = await page(stub, ada, room="big", page_size=10_000)
    assert (sequences, more, last) == (list(range(1, 501)), True, 600)
    sequences, more, last = await page(stub, ada, room="big", page_size=10_000, after_sequence=500)
    assert (sequences, more, last) == (list(range(501, 601)), False, 600)
    sequences, more, last = await page(stub, ada, room="big", page_size=501, before_sequence=601)
    assert (sequences, more, last) == (list(range(101, 601)), True, 600)


async def test_presence_lists_each_connected_user_across_replicas_until_they_leave(
    make_stack, chat, list_presence, wait_for
):
    stack = await make_stack(replicas=2, people=("Ada", "Grace", "Linus"), in_process=True)
    a, b = stack.replicas
    ada, grace, linus = (stack.people[n] for n in ("Ada", "Grace", "Linus"))
    room = "lobby"

    async def members(replica):
        return await list_presence(replica, linus, room)

    async def both_show(expected) -> bool:
        return await members(a) == expected and await members(b) == expected

    assert await members(a) == {}
    ada_streams = [
        await chat(ada, a, room=room),
        await chat(ada, a, room=room),
        await chat(ada, b, room=room),
    ]
    grace_stream = await chat(grace, b, room=room)
    elsewhere = await chat(linus, a, room="elsewhere")

    expected = {ada.id: ("Ada", 3), grace.id: ("Grace", 1)}
    await wait_for(lambda: both_show(expected), 10, f"presence {expected}")
    reply = await members(a)
    assert list(reply) == sorted(reply), "members are ordered by user id"
    await wait_for(
        lambda: _is(list_presence(b, linus, "elsewhere"), {linus.id: ("Linus", 1)}),
        10,
        "Linus elsewhere",
    )

    await ada_streams[2].close()  # the one on replica B
    expected = {ada.id: ("Ada", 2), grace.id: ("Grace", 1)}
    await wait_for(lambda: both_show(expected), 10, f"presence {expected}")

    await grace_stream.close()
    expected = {ada.id: ("Ada", 2)}
    await wait_for(lambda: both_show(expected), 10, f"presence {expected}")

    for stream in ada_streams[:2]:
        await stream.close()
    await wait_for(lambda: both_show({}), 10, "an empty room")
    await elsewhere.close()
    await wait_for(lambda: _is(list_presence(b, linus, "elsewhere"), {}), 10, "nobody elsewhere")


async def _is(members, expected) -> bool:
    return await members == expected
