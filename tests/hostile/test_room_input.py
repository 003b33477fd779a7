"""Hostile input to the room RPCs: bytes that do not parse, oversized requests, forged page
tokens and names. Each gets its precise status (never INTERNAL or UNKNOWN) and stores
nothing; the chat server keeps serving.
"""

from __future__ import annotations

import base64
import uuid
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parley.proto import chat_pb2
from parley.testing import bearer

from .servers import MAX_MESSAGE_BYTES

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
MARK = "QQQQ"
BAD_UTF8 = b"\xc3\x28\xff\xfe"  # as long as MARK: the length prefix stays right


def _with_bad_utf8(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    assert data.count(MARK.encode()) == 1
    return data.replace(MARK.encode(), BAD_UTF8)


def rooms_state(stack: Any) -> list[tuple[Any, ...]]:
    return stack.sql(
        "SELECT name, title, private, owner_id, member_count FROM chat_rooms ORDER BY name"
    ) + stack.sql("SELECT room, user_id, 0, 0, 0 FROM chat_room_members ORDER BY room, user_id")


def code_of(call: Any, *args: Any, **kwargs: Any) -> tuple[grpc.StatusCode, str]:
    try:
        call(*args, **kwargs)
    except grpc.RpcError as error:
        failed: Any = error
        return failed.code(), failed.details() or ""
    return grpc.StatusCode.OK, ""


MALFORMED = [
    ("CreateRoom", _with_bad_utf8(chat_pb2.CreateRoomRequest(name=MARK)), "name"),
    ("CreateRoom", _with_bad_utf8(chat_pb2.CreateRoomRequest(name="ok", title=MARK)), "title"),
    ("GetRoom", _with_bad_utf8(chat_pb2.GetRoomRequest(name=MARK)), "name"),
    ("ListRooms", _with_bad_utf8(chat_pb2.ListRoomsRequest(page_token=MARK)), "page_token"),
    ("UpdateRoom", _with_bad_utf8(chat_pb2.UpdateRoomRequest(name="ok", title=MARK)), "title"),
    ("AddMember", _with_bad_utf8(chat_pb2.AddMemberRequest(room=MARK, user_id=1)), "room"),
    ("ListMembers", _with_bad_utf8(chat_pb2.ListMembersRequest(room=MARK)), "room"),
    ("CreateRoom", b"\x0a\xff\xff\xff\xff", "request"),  # a length past the end
    ("OpenDirectRoom", b"\x08", "request"),  # a varint field cut short
]


@pytest.mark.parametrize(("method", "payload", "field"), MALFORMED)
def test_room_requests_that_do_not_parse_are_invalid_argument(
    stack: Any, method: str, payload: bytes, field: str
) -> None:
    before = rooms_state(stack)
    channel = stack.channel(stack.chat.target)
    with pytest.raises(grpc.RpcError) as failed:
        channel.unary_unary(f"/chat.ChatService/{method}")(
            payload, metadata=bearer(stack.chatter_token), timeout=10
        )
    error: Any = failed.value
    assert error.code() == INVALID_ARGUMENT, error.details()
    assert f"{field}: " in error.details()
    assert rooms_state(stack) == before


def test_oversized_room_requests_are_resource_exhausted(stack: Any) -> None:
    before = rooms_state(stack)
    big = "x" * (MAX_MESSAGE_BYTES + 1)
    chats, me = stack.chats(), bearer(stack.chatter_token)
    for call, request in (
        (chats.CreateRoom, chat_pb2.CreateRoomRequest(name="big", title=big)),
        (chats.UpdateRoom, chat_pb2.UpdateRoomRequest(name="big", title=big)),
        (chats.ListRooms, chat_pb2.ListRoomsRequest(page_token=big)),
    ):
        code, _ = code_of(call, request, metadata=me, timeout=10)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, request.DESCRIPTOR.name
    assert rooms_state(stack) == before
    stack.assert_serving()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    name=st.text(max_size=80),
    title=st.text(max_size=250),
    token=st.one_of(
        st.text(max_size=100),
        st.binary(max_size=60).map(lambda b: base64.urlsafe_b64encode(b).decode()),
    ),
    page_size=st.integers(min_value=-(2**31), max_value=2**31 - 1),
)
def test_any_room_input_gets_a_precise_answer(
    stack: Any, name: str, title: str, token: str, page_size: int
) -> None:
    """Whatever the strings, the answer is a status of the contract, never INTERNAL or UNKNOWN;
    a room is made only from a valid name and title, and only as asked."""
    chats, me = stack.chats(), bearer(stack.chatter_token)
    allowed = {
        grpc.StatusCode.OK,
        INVALID_ARGUMENT,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
    unique = f"{name}{uuid.uuid4().hex[:6]}" if name else name
    code, details = code_of(
        chats.CreateRoom,
        chat_pb2.CreateRoomRequest(name=unique, title=title),
        metadata=me,
        timeout=10,
    )
    assert code in allowed, (code, details)
    if code == grpc.StatusCode.OK:
        stored = stack.sql("SELECT title, owner_id FROM chat_rooms WHERE name = %s", unique)
        assert stored == [(title, stack.chatter_id)]
        chats.DeleteRoom(chat_pb2.DeleteRoomRequest(name=unique), metadata=me, timeout=10)
    for call, request in (
        (chats.ListRooms, chat_pb2.ListRoomsRequest(page_token=token, page_size=page_size)),
        (chats.ListMembers, chat_pb2.ListMembersRequest(room="general", page_token=token)),
        (chats.GetRoom, chat_pb2.GetRoomRequest(name=name)),
    ):
        code, details = code_of(call, request, metadata=me, timeout=10)
        assert code in allowed, (request, code, details)
