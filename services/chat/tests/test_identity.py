"""The sender of a message is the token's subject, named by UserService, never the client."""

from __future__ import annotations

import grpc
from google.protobuf import timestamp_pb2

from parley.proto import chat_pb2, chat_pb2_grpc


async def test_messages_carry_the_token_users_name_and_id_whatever_the_client_claims(
    make_stack, chat, channels, stored, wait_for
):
    stack = await make_stack(replicas=1, people=("Ada Lovelace", "Grace Hopper"), in_process=True)
    replica = stack.replicas[0]
    ada, grace = stack.people["Ada Lovelace"], stack.people["Grace Hopper"]
    sender = await chat(ada, replica, room="lobby", resume_after=0)
    listener = await chat(grace, replica, room="lobby", resume_after=0)

    forged = chat_pb2.ChatMessage(
        user="mallory",
        user_id=grace.id,
        text="trust me",
        room="elsewhere",
        sequence=77,
        create_time=timestamp_pb2.Timestamp(seconds=1),
        client_message_id="forged-1",
    )
    await sender.call.write(forged)
    await wait_for(lambda: sender.received and listener.received, 10, "the message")

    for client in (sender, listener):
        (message,) = client.received
        assert message.user == "Ada Lovelace"
        assert message.user_id == ada.id
        assert message.text == "trust me"
        assert message.room == "lobby"
        assert message.sequence == 1
        assert message.create_time.seconds > 1
        assert message.client_message_id == "forged-1"
    (row,) = await stored(stack.database, "lobby")
    assert (row.user_id, row.user_name) == (ada.id, "Ada Lovelace")
    assert await stored(stack.database, "elsewhere") == []

    stub = chat_pb2_grpc.ChatServiceStub(channels.get(replica.target))
    history = await stub.ListMessages(
        chat_pb2.ListMessagesRequest(room="lobby"),
        metadata=[("authorization", f"Bearer {grace.token}")],
    )
    assert [(m.user, m.user_id) for m in history.messages] == [("Ada Lovelace", ada.id)]


async def test_a_token_whose_subject_is_not_a_user_id_is_permission_denied(
    make_stack, chat, stranger, details
):
    stack = await make_stack(replicas=1, people=("Ada",), in_process=True)
    replica = stack.replicas[0]
    for subject in ("ada", "12abc", "-3", "0", "١٢", str(2**31)):
        client = await chat(stranger(subject), replica)
        await client.wait_until_ended()
        assert client.code == grpc.StatusCode.PERMISSION_DENIED, subject
        assert details(client.error).reason == "SUBJECT_NOT_A_USER"


async def test_a_token_for_a_user_unknown_to_user_service_is_failed_precondition(
    make_stack, chat, stranger, details
):
    stack = await make_stack(replicas=1, people=("Ada",), in_process=True)
    client = await chat(stranger("987654"), stack.replicas[0])
    assert await client.wait_until_ended() == grpc.StatusCode.FAILED_PRECONDITION
    assert details(client.error).reason == "UNKNOWN_SENDER"


async def test_calls_without_a_valid_token_are_unauthenticated(make_stack, channels):
    stack = await make_stack(replicas=1, people=(), in_process=True)
    stub = chat_pb2_grpc.ChatServiceStub(channels.get(stack.replicas[0].target))
    for metadata in ([], [("authorization", "Bearer not-a-jwt")]):
        call = stub.StreamChat(metadata=metadata)
        try:
            await call.read()
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        else:
            raise AssertionError("StreamChat accepted a call without a valid token")
        try:
            await stub.ListMessages(chat_pb2.ListMessagesRequest(), metadata=metadata)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        else:
            raise AssertionError("ListMessages accepted a call without a valid token")
