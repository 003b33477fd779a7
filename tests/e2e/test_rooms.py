"""Rooms, owners and members as a client sees them, over gRPC only.

The access matrix (public or private room, crossed with a caller who is a stranger, a member,
the owner or a `chat:admin` caller who is not a member, crossed with every room RPC) is
`parley.testing.room_access`, the table the in-process suite runs too: each cell runs against
a room of its own. Then
rooms that do not exist, direct rooms, access taken away from a stream on the other replica
(within a second, and nothing said afterwards reaches it), and a client that knows nothing of
rooms and still chats in `general`.

Runs unchanged against any stack (`parley-devstack run`, a kind cluster): it creates the users
it needs (deleted afterwards) and signs their tokens with PARLEY_JWT_SECRET, names its rooms
with a uuid and deletes them as their owner. Only direct rooms stay behind: they have no owner,
so nobody can delete them (their names hold the ids of users this run made and deleted).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from parley.proto import chat_pb2, chat_pb2_grpc, user_pb2, user_pb2_grpc
from parley.proto.contract import ROOM_KEY
from parley.testing.room_access import CALL_NAMES, MATRIX, ROLES, VISIBILITIES, uncovered_rpcs

CALL_TIMEOUT = 10.0
OK = grpc.StatusCode.OK
DENIED = grpc.StatusCode.PERMISSION_DENIED
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
NOT_FOUND = grpc.StatusCode.NOT_FOUND
INVALID = grpc.StatusCode.INVALID_ARGUMENT
ADMIN_SCOPE = "chat:admin"
GHOST_ID = 2**31 - 1  # a user id no stack has
# How soon after RemoveMember (UpdateRoom, DeleteRoom) returns a shut-out stream must end.
ACCESS_LATENCY = 1.0

Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Person:
    """A user of UserService and a token for them."""

    id: int
    name: str
    token: str

    @property
    def auth(self) -> Metadata:
        return (("authorization", f"Bearer {self.token}"),)

    def in_room(self, room: str | None) -> Metadata:
        return self.auth if room is None else (*self.auth, (ROOM_KEY, room))


@pytest.fixture(scope="module")
def cast(
    user_addr: str,
    token: str,
    sign_token: Callable[..., str],
    chat_addr: str,
) -> Iterator[dict[str, Person]]:
    """The people of the room tests, by role: the owner of the test rooms, a member, a
    stranger, an admin (`chat:admin`, a member of nothing) and `third`, whom they add.
    Created for this module and deleted after it."""
    auth = (("authorization", f"Bearer {token}"),)
    people: dict[str, Person] = {}
    with grpc.insecure_channel(user_addr) as channel:
        users = user_pb2_grpc.UserServiceStub(channel)
        try:
            for role in (*ROLES, "third"):
                user = users.CreateUser(
                    user_pb2.CreateUserRequest(
                        name=f"{role.title()} {uuid.uuid4().hex[:8]}",
                        email=f"e2e-rooms-{uuid.uuid4().hex}@example.com",
                        age=30,
                    ),
                    metadata=auth,
                    timeout=CALL_TIMEOUT,
                ).user
                scope = ADMIN_SCOPE if role == "admin" else ""
                people[role] = Person(user.id, user.name, sign_token(str(user.id), scope))
            yield people
        finally:
            for person in people.values():
                try:
                    users.DeleteUser(
                        user_pb2.DeleteUserRequest(id=person.id),
                        metadata=auth,
                        timeout=CALL_TIMEOUT,
                    )
                except grpc.RpcError as error:
                    if error.code() != grpc.StatusCode.NOT_FOUND:
                        raise


@pytest.fixture(scope="module")
def chat(chat_addr: str) -> Iterator[chat_pb2_grpc.ChatServiceStub]:
    with grpc.insecure_channel(chat_addr) as channel:
        yield chat_pb2_grpc.ChatServiceStub(channel)


def _code(call: Callable[[], Any]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    return OK


def _status(rpc: Callable[..., Any], request: Any, caller: Person) -> grpc.StatusCode:
    return _code(lambda: rpc(request, metadata=caller.auth, timeout=CALL_TIMEOUT))


class Rooms:
    """Makes rooms owned by the cast's owner, named `e2e-room-<uuid>`, deleted afterwards."""

    def __init__(self, stub: chat_pb2_grpc.ChatServiceStub, cast: dict[str, Person]) -> None:
        self.stub = stub
        self.cast = cast
        self.names: list[str] = []

    def new(self, *, private: bool, with_member: bool = True) -> str:
        name = f"e2e-room-{uuid.uuid4().hex}"
        owner = self.cast["owner"]
        room = self.stub.CreateRoom(
            chat_pb2.CreateRoomRequest(
                name=name, visibility=chat_pb2.Room.PRIVATE if private else chat_pb2.Room.PUBLIC
            ),
            metadata=owner.auth,
            timeout=CALL_TIMEOUT,
        )
        self.names.append(name)
        assert (room.name, room.owner_id, room.member_count) == (name, owner.id, 1), room
        if with_member:
            self.stub.AddMember(
                chat_pb2.AddMemberRequest(room=name, user_id=self.cast["member"].id),
                metadata=owner.auth,
                timeout=CALL_TIMEOUT,
            )
        return name

    def delete_all(self) -> None:
        for name in self.names:
            code = _code(
                lambda name=name: self.stub.DeleteRoom(
                    chat_pb2.DeleteRoomRequest(name=name),
                    metadata=self.cast["owner"].auth,
                    timeout=CALL_TIMEOUT,
                )
            )
            # PERMISSION_DENIED: the test deleted it already (a room that does not exist
            # answers like a private one).
            assert code in (OK, DENIED), f"deleting {name}: {code}"


@pytest.fixture
def rooms(chat: chat_pb2_grpc.ChatServiceStub, cast: dict[str, Person]) -> Iterator[Rooms]:
    made = Rooms(chat, cast)
    try:
        yield made
    finally:
        made.delete_all()


# --- The access matrix ----------------------------------------------------------------------


def _stream_code(stub: chat_pb2_grpc.ChatServiceStub, person: Person, room: str) -> Any:
    """OK when a stream in `room` gets its own message back; else the status it ends with."""
    client_id = f"e2e-{uuid.uuid4().hex[:12]}"
    call = stub.StreamChat(
        iter([chat_pb2.ChatMessage(text="hello", client_message_id=client_id)]),
        metadata=person.in_room(room),
        timeout=CALL_TIMEOUT,
    )
    try:
        for reply in call:
            if reply.client_message_id == client_id and reply.user_id == person.id:
                return OK
        return f"the stream ended ({call.code()}) before the echo"
    except grpc.RpcError as error:
        return error.code()
    finally:
        call.cancel()


def _listed(stub: chat_pb2_grpc.ChatServiceStub, person: Person, room: str) -> grpc.StatusCode:
    """OK when ListRooms shows the room to the caller (through every page), else DENIED."""
    token = ""
    while True:
        reply = stub.ListRooms(
            chat_pb2.ListRoomsRequest(page_size=500, page_token=token),
            metadata=person.auth,
            timeout=CALL_TIMEOUT,
        )
        if any(r.name == room for r in reply.rooms):
            return OK
        token = reply.next_page_token
        if not token:
            return DENIED


Call = Callable[[chat_pb2_grpc.ChatServiceStub, dict[str, Person], Person, str], Any]


def _unary(method: str, request: Callable[[str, dict[str, Person]], Any]) -> Call:
    def call(
        stub: chat_pb2_grpc.ChatServiceStub, cast: dict[str, Person], caller: Person, room: str
    ) -> grpc.StatusCode:
        rpc = getattr(stub, method)
        return _code(lambda: rpc(request(room, cast), metadata=caller.auth, timeout=CALL_TIMEOUT))

    return call


CALLS: dict[str, Call] = {
    "StreamChat": lambda stub, cast, caller, room: _stream_code(stub, caller, room),
    "ListRooms (sees it)": lambda stub, cast, caller, room: _listed(stub, caller, room),
    "ListMessages": _unary("ListMessages", lambda room, _: chat_pb2.ListMessagesRequest(room=room)),
    "ListPresence": _unary("ListPresence", lambda room, _: chat_pb2.ListPresenceRequest(room=room)),
    "ListMembers": _unary("ListMembers", lambda room, _: chat_pb2.ListMembersRequest(room=room)),
    "GetRoom": _unary("GetRoom", lambda room, _: chat_pb2.GetRoomRequest(name=room)),
    "UpdateRoom": _unary(
        "UpdateRoom", lambda room, _: chat_pb2.UpdateRoomRequest(name=room, title="renamed")
    ),
    "DeleteRoom": _unary("DeleteRoom", lambda room, _: chat_pb2.DeleteRoomRequest(name=room)),
    "AddMember": _unary(
        "AddMember",
        lambda room, cast: chat_pb2.AddMemberRequest(room=room, user_id=cast["third"].id),
    ),
    "RemoveMember (the member)": _unary(
        "RemoveMember",
        lambda room, cast: chat_pb2.RemoveMemberRequest(room=room, user_id=cast["member"].id),
    ),
    "RemoveMember (leave)": _unary(
        "RemoveMember", lambda room, _: chat_pb2.RemoveMemberRequest(room=room)
    ),
}

CELLS = [
    pytest.param(visibility, rpc, role, expected, id=f"{visibility}-{rpc}-{role}")
    for (visibility, rpc), row in MATRIX.items()
    for role, expected in row.items()
]


def test_the_matrix_covers_every_rpc_visibility_and_role() -> None:
    assert {call for _, call in MATRIX} == set(CALLS) == set(CALL_NAMES)
    assert {v for v, _ in MATRIX} == set(VISIBILITIES)
    assert all(set(row) == set(ROLES) for row in MATRIX.values())
    methods = set(chat_pb2.DESCRIPTOR.services_by_name["ChatService"].methods_by_name)
    assert not uncovered_rpcs(methods), uncovered_rpcs(methods)


@pytest.mark.parametrize(("visibility", "rpc", "role", "expected"), CELLS)
def test_the_access_matrix(
    chat: chat_pb2_grpc.ChatServiceStub,
    cast: dict[str, Person],
    rooms: Rooms,
    visibility: str,
    rpc: str,
    role: str,
    expected: grpc.StatusCode,
) -> None:
    room = rooms.new(private=visibility == "private")
    assert CALLS[rpc](chat, cast, cast[role], room) == expected


def test_the_effects_of_the_calls_the_matrix_allows(
    chat: chat_pb2_grpc.ChatServiceStub, cast: dict[str, Person], rooms: Rooms
) -> None:
    owner, member, third, admin = cast["owner"], cast["member"], cast["third"], cast["admin"]
    room = rooms.new(private=True)

    def members() -> list[tuple[int, bool]]:
        reply = chat.ListMembers(
            chat_pb2.ListMembersRequest(room=room, page_size=1), metadata=owner.auth
        )
        found = [(m.user_id, m.owner) for m in reply.members]
        while reply.next_page_token:
            reply = chat.ListMembers(
                chat_pb2.ListMembersRequest(
                    room=room, page_size=1, page_token=reply.next_page_token
                ),
                metadata=owner.auth,
                timeout=CALL_TIMEOUT,
            )
            found.extend((m.user_id, m.owner) for m in reply.members)
        return found

    assert members() == sorted([(owner.id, True), (member.id, False)])
    added = chat.AddMember(
        chat_pb2.AddMemberRequest(room=room, user_id=third.id),
        metadata=admin.auth,
        timeout=CALL_TIMEOUT,
    )
    assert (added.member.user_id, added.member.owner) == (third.id, False)
    assert members() == sorted([(owner.id, True), (member.id, False), (third.id, False)])
    assert _stream_code(chat, third, room) == OK
    chat.RemoveMember(
        chat_pb2.RemoveMemberRequest(room=room), metadata=third.auth, timeout=CALL_TIMEOUT
    )
    assert _stream_code(chat, third, room) == DENIED
    chat.RemoveMember(
        chat_pb2.RemoveMemberRequest(room=room, user_id=member.id),
        metadata=admin.auth,
        timeout=CALL_TIMEOUT,
    )
    assert members() == [(owner.id, True)]
    updated = chat.UpdateRoom(
        chat_pb2.UpdateRoomRequest(name=room, title="Now public", visibility=chat_pb2.Room.PUBLIC),
        metadata=owner.auth,
        timeout=CALL_TIMEOUT,
    )
    assert (updated.title, updated.visibility, updated.member_count) == (
        "Now public",
        chat_pb2.Room.PUBLIC,
        1,
    )
    assert _stream_code(chat, member, room) == OK  # public now: anyone may
    got = chat.GetRoom(chat_pb2.GetRoomRequest(name=room), metadata=member.auth, timeout=10)
    assert got == updated
    chat.DeleteRoom(chat_pb2.DeleteRoomRequest(name=room), metadata=owner.auth, timeout=10)
    assert CALLS["GetRoom"](chat, cast, owner, room) == DENIED
    assert _listed(chat, owner, room) == DENIED


def test_a_room_that_does_not_exist_answers_like_a_private_one(
    chat: chat_pb2_grpc.ChatServiceStub, cast: dict[str, Person], rooms: Rooms
) -> None:
    hidden = rooms.new(private=True)
    missing = f"e2e-missing-{uuid.uuid4().hex}"
    stranger, admin = cast["stranger"], cast["admin"]
    for rpc in ("ListMembers", "GetRoom", "UpdateRoom", "DeleteRoom", "AddMember"):
        got = (CALLS[rpc](chat, cast, stranger, missing), CALLS[rpc](chat, cast, stranger, hidden))
        assert got == (DENIED, DENIED), rpc
    # An admin may manage any room that exists, so to them a missing one is NOT_FOUND.
    assert CALLS["AddMember"](chat, cast, admin, missing) == NOT_FOUND
    assert CALLS["RemoveMember (the member)"](chat, cast, admin, missing) == NOT_FOUND
    # A room that is made on first use is empty until then, and reading it does not make it.
    page = chat.ListMessages(
        chat_pb2.ListMessagesRequest(room=missing), metadata=stranger.auth, timeout=CALL_TIMEOUT
    )
    assert (list(page.messages), page.has_more, page.last_sequence) == ([], False, 0)
    presence = chat.ListPresence(
        chat_pb2.ListPresenceRequest(room=missing), metadata=stranger.auth, timeout=CALL_TIMEOUT
    )
    assert list(presence.members) == []
    assert CALLS["GetRoom"](chat, cast, stranger, missing) == DENIED
    assert _listed(chat, stranger, missing) == DENIED


def test_create_room_refuses_a_taken_name_and_direct_room_names(
    chat: chat_pb2_grpc.ChatServiceStub, cast: dict[str, Person], rooms: Rooms
) -> None:
    taken = rooms.new(private=False, with_member=False)
    member = cast["member"]
    for name, code in (
        (taken, grpc.StatusCode.ALREADY_EXISTS),
        (f"dm-{cast['owner'].id}-{member.id}", INVALID),
        ("Not A Name", INVALID),
    ):
        got = _code(
            lambda name=name: chat.CreateRoom(
                chat_pb2.CreateRoomRequest(name=name), metadata=member.auth, timeout=CALL_TIMEOUT
            )
        )
        assert got == code, name
    room = chat.GetRoom(chat_pb2.GetRoomRequest(name=taken), metadata=member.auth, timeout=10)
    assert room.owner_id == cast["owner"].id  # still the first owner's


# --- Direct rooms ---------------------------------------------------------------------------


def test_direct_rooms(chat: chat_pb2_grpc.ChatServiceStub, cast: dict[str, Person]) -> None:
    one, two, stranger, admin = cast["owner"], cast["member"], cast["stranger"], cast["admin"]
    name = f"dm-{min(one.id, two.id)}-{max(one.id, two.id)}"
    # Its name is never made on first use: before it is opened nobody may use it.
    assert _stream_code(chat, one, name) == DENIED
    assert CALLS["ListMessages"](chat, cast, one, name) == DENIED
    assert CALLS["GetRoom"](chat, cast, one, name) == DENIED

    opened = chat.OpenDirectRoom(
        chat_pb2.OpenDirectRoomRequest(user_id=two.id), metadata=one.auth, timeout=CALL_TIMEOUT
    )
    other_way = chat.OpenDirectRoom(
        chat_pb2.OpenDirectRoomRequest(user_id=one.id), metadata=two.auth, timeout=CALL_TIMEOUT
    )
    assert opened == other_way
    assert (opened.name, opened.visibility, opened.owner_id, opened.member_count) == (
        name,
        chat_pb2.Room.PRIVATE,
        0,
        2,
    )
    assert opened.direct
    listed = chat.ListMembers(
        chat_pb2.ListMembersRequest(room=name), metadata=two.auth, timeout=CALL_TIMEOUT
    )
    assert [(m.user_id, m.owner) for m in listed.members] == sorted(
        [(one.id, False), (two.id, False)]
    )

    assert _stream_code(chat, one, name) == OK
    assert _stream_code(chat, two, name) == OK
    assert _stream_code(chat, stranger, name) == DENIED
    for role in ("stranger", "admin"):
        for rpc in ("GetRoom", "ListMessages", "ListMembers", "ListPresence"):
            assert CALLS[rpc](chat, cast, cast[role], name) == DENIED, (role, rpc)
    assert _listed(chat, one, name) == _listed(chat, two, name) == OK
    assert _listed(chat, stranger, name) == DENIED

    # Nobody changes its members, owns it, changes it or deletes it.
    cases: list[tuple[str, Person, Any, grpc.StatusCode]] = [
        (
            "AddMember",
            admin,
            chat_pb2.AddMemberRequest(room=name, user_id=stranger.id),
            PRECONDITION,
        ),
        ("AddMember", one, chat_pb2.AddMemberRequest(room=name, user_id=stranger.id), DENIED),
        (
            "RemoveMember",
            admin,
            chat_pb2.RemoveMemberRequest(room=name, user_id=two.id),
            PRECONDITION,
        ),
        ("RemoveMember", one, chat_pb2.RemoveMemberRequest(room=name, user_id=two.id), DENIED),
        ("RemoveMember", two, chat_pb2.RemoveMemberRequest(room=name), PRECONDITION),
        (
            "RemoveMember",
            one,
            chat_pb2.RemoveMemberRequest(room=name, user_id=one.id),
            PRECONDITION,
        ),
        ("UpdateRoom", one, chat_pb2.UpdateRoomRequest(name=name, title="ours"), DENIED),
        ("DeleteRoom", two, chat_pb2.DeleteRoomRequest(name=name), DENIED),
    ]
    for method, caller, request, code in cases:
        got = _status(getattr(chat, method), request, caller)
        assert got == code, (method, caller.name, request)
    again = chat.GetRoom(chat_pb2.GetRoomRequest(name=name), metadata=one.auth, timeout=10)
    assert (again.member_count, again.title, again.direct) == (2, "", True)

    for other, code in ((one.id, INVALID), (GHOST_ID, NOT_FOUND), (0, INVALID)):
        got = _code(
            lambda other=other: chat.OpenDirectRoom(
                chat_pb2.OpenDirectRoomRequest(user_id=other), metadata=one.auth, timeout=10
            )
        )
        assert got == code, other


# --- Access taken away from a stream on the other replica -----------------------------------


async def _streaming(addr: str, person: Person, room: str | None) -> tuple[Any, Any]:
    """A stream of `person` in `room` on the replica at `addr`, once it is in (its own
    message came back): the call and its channel."""
    channel = grpc.aio.insecure_channel(addr)
    stub = chat_pb2_grpc.ChatServiceStub(channel)
    call = stub.StreamChat(metadata=person.in_room(room), timeout=60)
    client_id = f"in-{uuid.uuid4().hex[:12]}"
    text = f"{person.name} is here {client_id}"
    await call.write(chat_pb2.ChatMessage(text=text, client_message_id=client_id))
    reply = await _read_until(call, text, f"the stream of {person.name} in {room}")
    assert (reply.client_message_id, reply.user_id) == (client_id, person.id), reply
    return call, channel


async def _read_until(call: Any, text: str, what: str) -> chat_pb2.ChatMessage:
    """Reads until a message with `text` comes; fails if the stream ends first."""
    seen: list[str] = []
    started = time.monotonic()
    try:
        while True:
            reply = await asyncio.wait_for(call.read(), CALL_TIMEOUT)
            assert reply is not grpc.aio.EOF, f"{what} ended after {seen} without {text!r}"
            if reply.text == text:
                return reply
            seen.append(reply.text)
    except grpc.aio.AioRpcError as error:
        pytest.fail(
            f"{what} ended with {error.code().name} ({error.details()}) "
            f"{time.monotonic() - started:.3f}s into waiting for {text!r}, after {seen}"
        )


async def _ended(call: Any, limit: float) -> tuple[grpc.StatusCode, list[str]]:
    """Reads until the stream ends: its status and the texts it got on the way."""
    texts: list[str] = []
    try:
        while True:
            reply = await asyncio.wait_for(call.read(), limit)
            if reply is grpc.aio.EOF:
                return await call.code(), texts
            texts.append(reply.text)
    except grpc.aio.AioRpcError as error:
        return error.code(), texts


@pytest.mark.parametrize("change", ["remove the member", "make it private", "delete it"])
async def test_a_change_of_access_ends_streams_on_the_other_replica_within_a_second(
    chat_addr: str,
    chat2_addr: str,
    chat: chat_pb2_grpc.ChatServiceStub,
    cast: dict[str, Person],
    rooms: Rooms,
    change: str,
) -> None:
    owner, member, stranger = cast["owner"], cast["member"], cast["stranger"]
    room = rooms.new(private=change != "make it private")
    after = f"after the change {uuid.uuid4().hex[:8]}"
    opened: list[tuple[Any, Any]] = []
    try:
        # The member (and, in the public room, a stranger) stream on the second replica; the
        # owner on the first, through which the change is made too.
        opened.append(await _streaming(chat2_addr, member, room))
        if change == "make it private":
            opened.append(await _streaming(chat2_addr, stranger, room))
        opened.append(await _streaming(chat_addr, owner, room))
        member_call, owner_call = opened[0][0], opened[-1][0]
        shut_out = opened[1][0] if change == "make it private" else member_call
        async with grpc.aio.insecure_channel(chat_addr) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            started = time.monotonic()
            if change == "remove the member":
                await stub.RemoveMember(
                    chat_pb2.RemoveMemberRequest(room=room, user_id=member.id),
                    metadata=owner.auth,
                    timeout=CALL_TIMEOUT,
                )
            elif change == "make it private":
                await stub.UpdateRoom(
                    chat_pb2.UpdateRoomRequest(name=room, visibility=chat_pb2.Room.PRIVATE),
                    metadata=owner.auth,
                    timeout=CALL_TIMEOUT,
                )
            else:
                await stub.DeleteRoom(
                    chat_pb2.DeleteRoomRequest(name=room), metadata=owner.auth, timeout=10
                )
            changed = time.monotonic()
            if change != "delete it":
                # Said after the change: it must never reach the stream that was shut out.
                await owner_call.write(chat_pb2.ChatMessage(text=after))
            code, texts = await _ended(shut_out, 5)
            took = time.monotonic() - changed
        print(f"\n{change}: the stream on the other replica ended {took * 1000:.0f} ms later")
        assert code == DENIED, f"the shut-out stream ended with {code}, got {texts}"
        assert after not in texts, f"{after!r} reached the shut-out stream {took:.3f}s after"
        assert took < ACCESS_LATENCY, (
            f"the stream on the other replica ended {took:.3f}s after the change returned "
            f"(limit {ACCESS_LATENCY}s; making the change took {changed - started:.3f}s)"
        )
        if change != "delete it":
            # It was said, and stored: the owner gets it (and, in the room made private, the
            # member who stays).
            stayers = [("owner", owner_call)]
            if change == "make it private":
                stayers.append(("member", member_call))
            for who, call in stayers:
                await _read_until(call, after, f"the {who}'s stream after the {change!r}")
            if change == "remove the member":
                assert CALLS["ListMessages"](chat, cast, member, room) == DENIED
                assert _stream_code(chat, member, room) == DENIED
    finally:
        for call, channel in opened:
            call.cancel()
            await channel.close()


# --- A client that knows nothing of rooms ---------------------------------------------------


async def test_a_client_that_sends_only_user_and_text_chats_in_general(
    chat_addr: str, cast: dict[str, Person]
) -> None:
    """The tutorial's client: no room metadata, messages with only `user` and `text`."""
    speaker, listener = cast["third"], cast["stranger"]
    # The listener asks for `general` by name, on the other replica when there is one.
    other = os.environ.get("PARLEY_CHAT2_ADDR", "").strip() or chat_addr
    text = f"hello general {uuid.uuid4().hex[:8]}"
    listening, listening_channel = await _streaming(other, listener, "general")
    try:
        async with grpc.aio.insecure_channel(chat_addr) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            call = stub.StreamChat(metadata=speaker.auth, timeout=60)
            try:
                await call.write(chat_pb2.ChatMessage(user="an impostor", text=text))
                while True:  # other clients may be talking in general too
                    echo = await asyncio.wait_for(call.read(), CALL_TIMEOUT)
                    assert echo is not grpc.aio.EOF
                    if echo.text == text:
                        break
            finally:
                call.cancel()
            assert (echo.room, echo.user, echo.user_id) == ("general", speaker.name, speaker.id)
            while True:
                heard = await asyncio.wait_for(listening.read(), CALL_TIMEOUT)
                assert heard is not grpc.aio.EOF
                if heard.text == text:
                    break
            assert heard == echo
            # The default room of ListMessages is `general` too.
            page = await stub.ListMessages(
                chat_pb2.ListMessagesRequest(before_sequence=echo.sequence + 1, page_size=1),
                metadata=speaker.auth,
                timeout=CALL_TIMEOUT,
            )
            assert list(page.messages) == [echo]
            general = await stub.GetRoom(
                chat_pb2.GetRoomRequest(name="general"), metadata=speaker.auth, timeout=10
            )
            assert (general.visibility, general.direct) == (chat_pb2.Room.PUBLIC, False)
    finally:
        listening.cancel()
        await listening_channel.close()
