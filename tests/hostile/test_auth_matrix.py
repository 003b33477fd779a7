"""Every bad credential against every RPC of both services, on real servers.

Each call must end UNAUTHENTICATED (or PERMISSION_DENIED where the token is good but not
enough), with no response message and no stream message, and nothing may be written.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from parley import testing
from parley.proto import chat_pb2, user_pb2
from parley.proto.contract import ROOM_KEY
from parley.testing import bearer

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
WRITES = ("CreateUser", "UpdateUser", "DeleteUser", "ImportUsers")
RPCS = (
    "GetUser",
    "ListUsers",
    *WRITES,
    "StreamChat",
    "ListMessages",
    "ListPresence",
)
# The room RPCs, each against the target's private room (or, for CreateRoom, a new name).
ROOM_RPCS = (
    "CreateRoom",
    "GetRoom",
    "ListRooms",
    "UpdateRoom",
    "DeleteRoom",
    "AddMember",
    "RemoveMember",
    "ListMembers",
    "OpenDirectRoom",
)
CHAT_RPCS = ("StreamChat", "ListMessages", "ListPresence", *ROOM_RPCS)


def unsigned_token(sub: str, scope: str) -> str:
    """`alg: none`, no signature: the classic forgery."""
    return testing.make_token(None, sub, scope, algorithm="none")


# name -> metadata for a call by user `sub` (the chat user) asking for `scope`.
BAD_CREDENTIALS: dict[str, Callable[[Any, str, str], list[tuple[str, str]]]] = {
    "no token": lambda tok, sub, scope: [],
    "empty bearer": lambda tok, sub, scope: [("authorization", "Bearer ")],
    "malformed": lambda tok, sub, scope: [("authorization", "Bearer not-a-jwt")],
    "garbage segments": lambda tok, sub, scope: [("authorization", "Bearer e30.e30.e30")],
    "wrong signature": lambda tok, sub, scope: bearer(
        testing.make_token("another-secret-" + "x" * 32, sub, scope)
    ),
    "alg none": lambda tok, sub, scope: bearer(unsigned_token(sub, scope)),
    "expired": lambda tok, sub, scope: bearer(tok(sub, scope, ttl=-3600)),
    "not yet valid": lambda tok, sub, scope: bearer(tok(sub, scope, nbf=int(time.time()) + 3600)),
    "wrong audience": lambda tok, sub, scope: bearer(tok(sub, scope, aud="elsewhere")),
    "wrong issuer": lambda tok, sub, scope: bearer(tok(sub, scope, iss="elsewhere")),
    "no subject": lambda tok, sub, scope: bearer(tok("", scope)),
    "x-token key": lambda tok, sub, scope: [("x-token", tok(sub, scope))],
    "no Bearer prefix": lambda tok, sub, scope: [("authorization", tok(sub, scope))],
    "Basic scheme": lambda tok, sub, scope: [("authorization", "Basic " + tok(sub, scope))],
}


def call(stack: Any, rpc: str, metadata: list[tuple[str, str]], env: dict[str, Any]) -> Any:
    """Calls `rpc`; returns (responses, code) where code is None for OK."""
    users, chats = stack.users(), stack.chats()
    try:
        if rpc == "GetUser":
            reply = users.GetUser(
                user_pb2.GetUserRequest(id=env["victim"]), metadata=metadata, timeout=5
            )
            return [reply], None
        if rpc == "ListUsers":
            return list(
                users.ListUsers(user_pb2.ListUsersRequest(), metadata=metadata, timeout=5)
            ), None
        if rpc == "CreateUser":
            request = user_pb2.CreateUserRequest(name="Intruder", email=env["email"], age=1)
            return [users.CreateUser(request, metadata=metadata, timeout=5)], None
        if rpc == "UpdateUser":
            request = user_pb2.UpdateUserRequest(
                user=user_pb2.User(id=env["victim"], name="Defaced"),
                update_mask=field_mask_pb2.FieldMask(paths=["name"]),
            )
            return [users.UpdateUser(request, metadata=metadata, timeout=5)], None
        if rpc == "DeleteUser":
            request = user_pb2.DeleteUserRequest(id=env["victim"])
            return [users.DeleteUser(request, metadata=metadata, timeout=5)], None
        if rpc == "ImportUsers":
            rows = [user_pb2.CreateUserRequest(name="Intruder", email=env["email"], age=1)]
            return [users.ImportUsers(iter(rows), metadata=metadata, timeout=5)], None
        if rpc == "ListMessages":
            request = chat_pb2.ListMessagesRequest(room=env["room"])
            return [chats.ListMessages(request, metadata=metadata, timeout=5)], None
        if rpc == "ListPresence":
            request = chat_pb2.ListPresenceRequest(room=env["room"])
            return [chats.ListPresence(request, metadata=metadata, timeout=5)], None
        if rpc in ROOM_RPCS:
            private, victim = env["private_room"], env["victim"]
            request = {
                "CreateRoom": chat_pb2.CreateRoomRequest(name=f"new-{uuid.uuid4().hex[:12]}"),
                "GetRoom": chat_pb2.GetRoomRequest(name=private),
                "ListRooms": chat_pb2.ListRoomsRequest(),
                "UpdateRoom": chat_pb2.UpdateRoomRequest(name=private, title="defaced"),
                "DeleteRoom": chat_pb2.DeleteRoomRequest(name=private),
                "AddMember": chat_pb2.AddMemberRequest(room=private, user_id=victim),
                "RemoveMember": chat_pb2.RemoveMemberRequest(room=private, user_id=victim),
                "ListMembers": chat_pb2.ListMembersRequest(room=private),
                "OpenDirectRoom": chat_pb2.OpenDirectRoomRequest(user_id=victim),
            }[rpc]
            return [getattr(chats, rpc)(request, metadata=metadata, timeout=5)], None
    except grpc.RpcError as error:
        return [], error.code()
    assert rpc == "StreamChat"
    return stack.stream_chat(
        [chat_pb2.ChatMessage(text="intruder was here")],
        expect=1,
        metadata=[*metadata, (ROOM_KEY, env["room"])],
    )


@pytest.fixture(scope="module")
def target(stack: Any) -> dict[str, Any]:
    """A user to attack and a room with one message and one listener-free history."""
    victim = stack.create_user("Victim")
    room = f"auth-{uuid.uuid4().hex[:12]}"
    received, code = stack.stream_chat(
        [chat_pb2.ChatMessage(text="secret")],
        expect=1,
        token=stack.chatter_token,
        metadata=[(ROOM_KEY, room)],
    )
    assert code is None and [m.text for m in received] == ["secret"]
    # A private room of the chat user's with the victim in it: what the room RPCs go after.
    private = f"private-{uuid.uuid4().hex[:12]}"
    owner = bearer(stack.chatter_token)
    stack.chats().CreateRoom(
        chat_pb2.CreateRoomRequest(name=private, visibility=chat_pb2.Room.PRIVATE),
        metadata=owner,
        timeout=5,
    )
    stack.chats().AddMember(
        chat_pb2.AddMemberRequest(room=private, user_id=victim.id), metadata=owner, timeout=5
    )
    return {"victim": victim.id, "room": room, "private_room": private}


def snapshot(stack: Any) -> tuple[list[tuple[Any, ...]], ...]:
    return (
        stack.sql("SELECT id, name, email, age, update_time FROM users ORDER BY id"),
        stack.sql("SELECT room, sequence, text FROM chat_messages ORDER BY room, sequence"),
        stack.sql(
            "SELECT name, title, private, owner_id, member_count, access_version"
            " FROM chat_rooms ORDER BY name"
        ),
        stack.sql("SELECT room, user_id FROM chat_room_members ORDER BY room, user_id"),
    )


@pytest.mark.parametrize("rpc", (*RPCS, *ROOM_RPCS))
@pytest.mark.parametrize("credential", list(BAD_CREDENTIALS))
def test_bad_credentials_get_no_data(
    stack: Any, target: dict[str, Any], token: Any, credential: str, rpc: str
) -> None:
    scope = "users:write" if rpc in WRITES else ""
    metadata = BAD_CREDENTIALS[credential](token, str(stack.chatter_id), scope)
    env = {**target, "email": f"intruder-{uuid.uuid4().hex[:8]}@example.com"}
    before = snapshot(stack)
    responses, code = call(stack, rpc, metadata, env)
    assert code == UNAUTHENTICATED, f"{credential} on {rpc}: {code}"
    assert responses == []
    assert snapshot(stack) == before, f"{credential} on {rpc} changed stored data"


@pytest.mark.parametrize("rpc", WRITES)
def test_missing_scope_is_permission_denied(
    stack: Any, target: dict[str, Any], token: Any, rpc: str
) -> None:
    env = {**target, "email": f"intruder-{uuid.uuid4().hex[:8]}@example.com"}
    before = snapshot(stack)
    responses, code = call(stack, rpc, bearer(token(str(stack.chatter_id), "users:read")), env)
    assert code == PERMISSION_DENIED, code
    assert responses == []
    assert snapshot(stack) == before


@pytest.mark.parametrize("rpc", CHAT_RPCS)
def test_chat_subject_that_is_no_user_id_is_permission_denied(
    stack: Any, target: dict[str, Any], token: Any, rpc: str
) -> None:
    before = snapshot(stack)
    for subject in ("admin", "0", "-1", "2147483648", "１"):
        responses, code = call(stack, rpc, bearer(token(subject, "chat:admin")), target)
        assert code == PERMISSION_DENIED, (rpc, subject, code)
        assert responses == []
    assert snapshot(stack) == before


@pytest.mark.parametrize("rpc", CHAT_RPCS)
def test_chat_subject_that_is_no_user_is_refused(
    stack: Any, target: dict[str, Any], token: Any, rpc: str
) -> None:
    """A well-formed user id that UserService does not have: refused, nothing written."""
    before = snapshot(stack)
    responses, code = call(stack, rpc, bearer(token("2147483000", "chat:admin")), target)
    assert code == grpc.StatusCode.FAILED_PRECONDITION, (rpc, code)
    assert responses == []
    assert snapshot(stack) == before


@pytest.mark.parametrize(
    "rpc", ("GetRoom", "UpdateRoom", "DeleteRoom", "AddMember", "ListMembers", "ListMessages")
)
def test_a_user_outside_a_private_room_gets_nothing(
    stack: Any, target: dict[str, Any], token: Any, rpc: str
) -> None:
    outsider = stack.create_user("Outsider")
    before = snapshot(stack)
    env = {**target, "room": target["private_room"]}
    responses, code = call(stack, rpc, bearer(token(str(outsider.id))), env)
    assert code == PERMISSION_DENIED, (rpc, code)
    assert responses == []
    assert snapshot(stack) == before


@pytest.mark.parametrize("rpc", ("GetUser", "ListUsers", "ListMessages"))
def test_control_a_good_token_gets_the_data(
    stack: Any, target: dict[str, Any], token: Any, rpc: str
) -> None:
    """The same calls with a valid token do return data, so the matrix above can fail."""
    responses, code = call(stack, rpc, bearer(token(str(stack.chatter_id))), target)
    assert code is None
    if rpc == "ListMessages":
        assert [m.text for m in responses[0].messages] == ["secret"]
    else:
        assert responses and (rpc != "GetUser" or responses[0].user.id == target["victim"])
