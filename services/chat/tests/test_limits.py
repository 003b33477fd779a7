"""Bad input and floods: each ends the stream with the right status and stores nothing bad."""

from __future__ import annotations

import grpc
import pytest

from parley.proto import chat_pb2, chat_pb2_grpc
from parley.proto.contract import RESUME_KEY, ROOM_KEY

INVALID = grpc.StatusCode.INVALID_ARGUMENT
ROOM = "limits"


@pytest.fixture
async def stack(make_stack):
    return await make_stack(
        replicas=1,
        people=("Ada", "Grace"),
        in_process=True,
        PARLEY_CHAT_RATE_LIMIT="5",
        PARLEY_CHAT_RATE_BURST="5",
    )


async def ends_with(client, code) -> None:
    assert await client.wait_until_ended() == code, client.error


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "must not be empty"),
        ("   ", "must not be empty"),
        ("\t\n \u3000\u2003", "must not be empty"),
        ("a" * 4097, "at most 4096 bytes"),
        ("é" * 2049, "at most 4096 bytes"),
        ("🙂" * 1025, "at most 4096 bytes"),
    ],
    ids=["empty", "spaces", "unicode-white-space", "4097-ascii", "4098-utf8", "4100-emoji"],
)
async def test_empty_blank_or_oversized_text_is_invalid_argument(
    stack, chat, stored, details, text, problem
):
    ada = stack.people["Ada"]
    client = await chat(ada, stack.replicas[0], room=ROOM)
    await client.send(text)
    await ends_with(client, INVALID)
    error = details(client.error)
    assert error.fields == ["text"]
    assert problem in error.violations[0][1]
    assert await stored(stack.database, ROOM) == []


async def test_text_of_exactly_4096_bytes_is_accepted(stack, chat, stored, wait_for):
    ada = stack.people["Ada"]
    client = await chat(ada, stack.replicas[0], room=ROOM)
    texts = ["a" * 4096, "é" * 2048, "🙂" * 1024, " x "]
    for text in texts:
        await client.send(text)
    await wait_for(lambda: len(client.received) == len(texts) or client.ended, 10, "the acks")
    assert client.error is None
    assert [m.text for m in client.received] == texts
    assert [r.text for r in await stored(stack.database, ROOM)] == texts


async def test_a_client_message_id_over_64_characters_is_invalid_argument(
    stack, chat, stored, details
):
    client = await chat(stack.people["Ada"], stack.replicas[0], room=ROOM)
    await client.send("hello", "i" * 65)
    await ends_with(client, INVALID)
    assert details(client.error).fields == ["client_message_id"]
    assert await stored(stack.database, ROOM) == []


async def test_more_messages_a_second_than_the_rate_limit_is_resource_exhausted(
    stack, chat, stored, details, wait_for
):
    ada, grace = stack.people["Ada"], stack.people["Grace"]
    flooder = await chat(ada, stack.replicas[0], room=ROOM)
    for i in range(12):
        try:
            await flooder.send(f"flood {i}")
        except grpc.aio.AioRpcError:
            break  # the server already ended the stream
    await ends_with(flooder, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert details(flooder.error).reason == "RATE_LIMITED"
    rows = await stored(stack.database, ROOM)
    # The burst of 5 went through; the bucket refills at 5 a second, far slower than a flood.
    assert 5 <= len(rows) < 12
    assert [r.text for r in rows] == [f"flood {i}" for i in range(len(rows))]

    # Someone else in the room is not limited by Ada's flood.
    calm = await chat(grace, stack.replicas[0], room=ROOM, resume_after=len(rows))
    await calm.send("hello")
    await wait_for(lambda: calm.received or calm.ended, 10, "Grace's message")
    assert calm.error is None and calm.received[0].text == "hello"


@pytest.mark.parametrize(
    "room",
    ["General", "-general", "_general", "a" * 65, "with space", "room/1", "room.1"],
)
async def test_a_bad_room_name_is_invalid_argument(stack, chat, channels, details, room):
    ada = stack.people["Ada"]
    client = await chat(ada, stack.replicas[0], room=room)
    await ends_with(client, INVALID)
    error = details(client.error)
    assert error.reason == "INVALID_ROOM"
    assert error.fields == [ROOM_KEY]

    stub = chat_pb2_grpc.ChatServiceStub(channels.get(stack.replicas[0].target))
    auth = [("authorization", f"Bearer {ada.token}")]
    for call, request in (
        (stub.ListMessages, chat_pb2.ListMessagesRequest(room=room)),
        (stub.ListPresence, chat_pb2.ListPresenceRequest(room=room)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(request, metadata=auth, timeout=5)
        assert caught.value.code() == INVALID
        assert details(caught.value).fields == ["room"]


async def test_good_room_names_work(stack, chat, wait_for):
    ada = stack.people["Ada"]
    for room in ("a" * 64, "0-_", "9lives", "general"):
        client = await chat(ada, stack.replicas[0], room=room)
        await client.send(f"hello {room}")
        await wait_for(lambda c=client: c.received or c.ended, 10, f"a message in {room}")
        assert client.error is None
        assert client.received[0].room == room


@pytest.mark.parametrize(
    "resume_after",
    ["abc", "-1", "1.5", "1e3", "0x10", " ", "9223372036854775808"],
)
async def test_a_bad_resume_point_is_invalid_argument(stack, chat, details, resume_after):
    client = await chat(stack.people["Ada"], stack.replicas[0], resume_after=resume_after)
    await ends_with(client, INVALID)
    assert details(client.error).fields == [RESUME_KEY]


async def test_bad_history_requests_are_invalid_argument(stack, channels, details):
    stub = chat_pb2_grpc.ChatServiceStub(channels.get(stack.replicas[0].target))
    auth = [("authorization", f"Bearer {stack.people['Ada'].token}")]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListMessages(
            chat_pb2.ListMessagesRequest(page_size=-1, after_sequence=-2, before_sequence=-3),
            metadata=auth,
            timeout=5,
        )
    assert caught.value.code() == INVALID
    assert sorted(details(caught.value).fields) == [
        "after_sequence",
        "before_sequence",
        "page_size",
    ]
    # Metadata is ASCII, but a room in a request message can be anything.
    for room in ("émoji", "ｇｅｎｅｒａｌ", "general\n"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListMessages(chat_pb2.ListMessagesRequest(room=room), metadata=auth)
        assert caught.value.code() == INVALID
        assert details(caught.value).reason == "INVALID_ROOM"
