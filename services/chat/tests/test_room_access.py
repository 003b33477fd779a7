"""Who may read and change a room, on real servers: the access matrix, and access taken away
from open streams on every replica.

The matrix is one table (parley.testing.room_access, shared with tests/e2e): public or
private room, crossed with a caller who is not a member, a member, the owner and a
`chat:admin` caller who is not a member, crossed with every chat RPC. Each cell is run
against a fresh room.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from parley.proto import chat_pb2, chat_pb2_grpc
from parley.proto.contract import RESUME_KEY, ROOM_ID_KEY, ROOM_KEY
from parley.testing import bearer
from parley.testing.room_access import CALL_NAMES, MATRIX, ROLES, VISIBILITIES, uncovered_rpcs
from parley.testing.stack import Person, Stack

OK = grpc.StatusCode.OK
DENIED = grpc.StatusCode.PERMISSION_DENIED
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
_rooms = itertools.count(1)


@dataclass
class World:
    stack: Stack
    stub: chat_pb2_grpc.ChatServiceStub
    people: dict[str, Person]  # by role, and "third": a user who is nobody in the room

    def md(self, role: str) -> list[tuple[str, str]]:
        return bearer(self.people[role].token)

    async def room(self, private: bool) -> str:
        """A new room owned by the owner, with the member in it."""
        name = f"matrix-{next(_rooms)}"
        await self.stub.CreateRoom(
            chat_pb2.CreateRoomRequest(
                name=name, visibility=chat_pb2.Room.PRIVATE if private else chat_pb2.Room.PUBLIC
            ),
            metadata=self.md("owner"),
            timeout=10,
        )
        await self.stub.AddMember(
            chat_pb2.AddMemberRequest(room=name, user_id=self.people["member"].id),
            metadata=self.md("owner"),
            timeout=10,
        )
        return name


async def _code(call: Awaitable[Any]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return OK


async def _stream_code(world: World, role: str, room: str) -> grpc.StatusCode:
    """OK when a stream in `room` gets its own message back; else the status it ends with."""
    call = world.stub.StreamChat(metadata=[*world.md(role), (ROOM_KEY, room)], timeout=10)
    try:
        # A new client id each time: a resent one is answered with the stored message,
        # which a stream that started after it does not get again.
        await call.write(chat_pb2.ChatMessage(text="hello", client_message_id=f"m{next(_rooms)}"))
        reply = await call.read()
        if reply is grpc.aio.EOF:
            return await call.code()
        return OK
    except grpc.aio.AioRpcError as error:
        return error.code()
    finally:
        call.cancel()


async def _listed(world: World, role: str, room: str) -> grpc.StatusCode:
    """OK when ListRooms shows the room to the caller, else PERMISSION_DENIED."""
    token = ""
    while True:
        reply = await world.stub.ListRooms(
            chat_pb2.ListRoomsRequest(page_size=500, page_token=token),
            metadata=world.md(role),
            timeout=10,
        )
        if any(r.name == room for r in reply.rooms):
            return OK
        token = reply.next_page_token
        if not token:
            return DENIED


Call = Callable[[World, str, str], Awaitable[grpc.StatusCode]]
CALLS: dict[str, Call] = {
    "StreamChat": _stream_code,
    "ListRooms (sees it)": _listed,
    "ListMessages": lambda w, role, room: _code(
        w.stub.ListMessages(
            chat_pb2.ListMessagesRequest(room=room), metadata=w.md(role), timeout=10
        )
    ),
    "ListPresence": lambda w, role, room: _code(
        w.stub.ListPresence(
            chat_pb2.ListPresenceRequest(room=room), metadata=w.md(role), timeout=10
        )
    ),
    "ListMembers": lambda w, role, room: _code(
        w.stub.ListMembers(chat_pb2.ListMembersRequest(room=room), metadata=w.md(role), timeout=10)
    ),
    "GetRoom": lambda w, role, room: _code(
        w.stub.GetRoom(chat_pb2.GetRoomRequest(name=room), metadata=w.md(role), timeout=10)
    ),
    "UpdateRoom": lambda w, role, room: _code(
        w.stub.UpdateRoom(
            chat_pb2.UpdateRoomRequest(name=room, title="renamed"), metadata=w.md(role), timeout=10
        )
    ),
    "DeleteRoom": lambda w, role, room: _code(
        w.stub.DeleteRoom(chat_pb2.DeleteRoomRequest(name=room), metadata=w.md(role), timeout=10)
    ),
    "AddMember": lambda w, role, room: _code(
        w.stub.AddMember(
            chat_pb2.AddMemberRequest(room=room, user_id=w.people["third"].id),
            metadata=w.md(role),
            timeout=10,
        )
    ),
    "RemoveMember (the member)": lambda w, role, room: _code(
        w.stub.RemoveMember(
            chat_pb2.RemoveMemberRequest(room=room, user_id=w.people["member"].id),
            metadata=w.md(role),
            timeout=10,
        )
    ),
    "RemoveMember (leave)": lambda w, role, room: _code(
        w.stub.RemoveMember(
            chat_pb2.RemoveMemberRequest(room=room), metadata=w.md(role), timeout=10
        )
    ),
}


@pytest.fixture
async def world(make_stack, token) -> World:
    stack = await make_stack(
        replicas=1, people=("Owner", "Member", "Stranger", "Admin", "Third"), in_process=True
    )
    people = {
        "owner": stack.people["Owner"],
        "member": stack.people["Member"],
        "stranger": stack.people["Stranger"],
        "third": stack.people["Third"],
    }
    admin = stack.people["Admin"]
    people["admin"] = Person(admin.id, admin.name, token(str(admin.id), scope="chat:admin"))
    channel = grpc.aio.insecure_channel(stack.replicas[0].target)
    try:
        yield World(stack, chat_pb2_grpc.ChatServiceStub(channel), people)
    finally:
        await channel.close()


def test_the_matrix_covers_every_rpc_visibility_and_role() -> None:
    assert {call for _, call in MATRIX} == set(CALLS) == set(CALL_NAMES)
    assert {v for v, _ in MATRIX} == set(VISIBILITIES)
    assert all(set(row) == set(ROLES) for row in MATRIX.values())
    methods = set(chat_pb2.DESCRIPTOR.services_by_name["ChatService"].methods_by_name)
    assert not uncovered_rpcs(methods), uncovered_rpcs(methods)


async def test_the_access_matrix(world: World, subtests) -> None:
    for (visibility, rpc), row in MATRIX.items():
        for role, expected in row.items():
            with subtests.test(visibility=visibility, rpc=rpc, role=role):
                room = await world.room(private=visibility == "private")
                assert await CALLS[rpc](world, role, room) == expected


async def test_a_room_that_does_not_exist_answers_like_a_private_one(world: World) -> None:
    private = await world.room(private=True)
    for rpc in ("ListMembers", "GetRoom", "UpdateRoom", "DeleteRoom", "AddMember"):
        missing, hidden = "never-made-room", private
        got_missing, got_hidden = await asyncio.gather(
            CALLS[rpc](world, "stranger", missing), CALLS[rpc](world, "stranger", hidden)
        )
        assert got_missing == got_hidden == DENIED, rpc


async def test_direct_rooms(world: World) -> None:
    owner, member = world.people["owner"], world.people["member"]
    one = await world.stub.OpenDirectRoom(
        chat_pb2.OpenDirectRoomRequest(user_id=member.id), metadata=world.md("owner"), timeout=10
    )
    other_way = await world.stub.OpenDirectRoom(
        chat_pb2.OpenDirectRoomRequest(user_id=owner.id), metadata=world.md("member"), timeout=10
    )
    assert one == other_way
    assert one.direct and one.visibility == chat_pb2.Room.PRIVATE and one.member_count == 2
    assert (
        one.owner_id == 0
        and one.name == f"dm-{min(owner.id, member.id)}-{max(owner.id, member.id)}"
    )
    assert await _stream_code(world, "member", one.name) == OK
    assert await _stream_code(world, "stranger", one.name) == DENIED
    assert await CALLS["AddMember"](world, "admin", one.name) == PRECONDITION
    assert await CALLS["RemoveMember (leave)"](world, "member", one.name) == PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await world.stub.OpenDirectRoom(
            chat_pb2.OpenDirectRoomRequest(user_id=2**31 - 1),
            metadata=world.md("owner"),
            timeout=10,
        )
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as reserved:
        await world.stub.CreateRoom(
            chat_pb2.CreateRoomRequest(name="dm-1-2"), metadata=world.md("owner"), timeout=10
        )
    assert reserved.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_create_room_rules(world: World) -> None:
    room = await world.stub.CreateRoom(
        chat_pb2.CreateRoomRequest(name="made", title="Made here"),
        metadata=world.md("owner"),
        timeout=10,
    )
    assert (room.name, room.title, room.visibility, room.member_count) == (
        "made",
        "Made here",
        chat_pb2.Room.PUBLIC,
        1,
    )
    assert room.owner_id == world.people["owner"].id
    for request, code in (
        (chat_pb2.CreateRoomRequest(name="made"), grpc.StatusCode.ALREADY_EXISTS),
        (chat_pb2.CreateRoomRequest(name="Bad Name"), grpc.StatusCode.INVALID_ARGUMENT),
        (chat_pb2.CreateRoomRequest(name=""), grpc.StatusCode.INVALID_ARGUMENT),
        (chat_pb2.CreateRoomRequest(name="t", title="x" * 201), grpc.StatusCode.INVALID_ARGUMENT),
        (chat_pb2.CreateRoomRequest(name="t", title="a\x1b[2Jb"), grpc.StatusCode.INVALID_ARGUMENT),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await world.stub.CreateRoom(request, metadata=world.md("owner"), timeout=10)
        assert refused.value.code() == code, request


async def test_every_chat_rpc_needs_a_user_that_exists(world: World, stranger) -> None:
    room = await world.room(private=False)
    for person, code in (
        (stranger("999999"), grpc.StatusCode.FAILED_PRECONDITION),  # no such user
        (stranger("service-account"), DENIED),  # not a user id at all
    ):
        world.people["ghost"] = person
        for rpc, call in CALLS.items():
            if rpc.startswith("ListRooms"):
                got = await _code(
                    world.stub.ListRooms(chat_pb2.ListRoomsRequest(), metadata=world.md("ghost"))
                )
            else:
                got = await call(world, "ghost", room)
            assert got == code, (person.name, rpc)


async def _streaming(world: World, replica: int, role: str, room: str) -> Any:
    """A stream of `role` in `room` on the stack's replica `replica`, once it is in."""
    channel = grpc.aio.insecure_channel(world.stack.replicas[replica].target)
    stub = chat_pb2_grpc.ChatServiceStub(channel)
    call = stub.StreamChat(metadata=[*world.md(role), (ROOM_KEY, room)])
    await call.write(chat_pb2.ChatMessage(text=f"{role} is here", client_message_id=f"in-{role}"))
    while True:  # until its own message comes back: it is in, and checked
        reply = await asyncio.wait_for(call.read(), 10)
        assert reply is not grpc.aio.EOF
        if reply.client_message_id == f"in-{role}":
            return call, channel


@pytest.fixture
async def two_replicas(make_stack) -> World:
    stack = await make_stack(replicas=2, people=("Owner", "Member", "Stranger", "Third"))
    people = {
        "owner": stack.people["Owner"],
        "member": stack.people["Member"],
        "stranger": stack.people["Stranger"],
        "third": stack.people["Third"],
        "admin": stack.people["Third"],
    }
    channel = grpc.aio.insecure_channel(stack.replicas[0].target)
    try:
        yield World(stack, chat_pb2_grpc.ChatServiceStub(channel), people)
    finally:
        await channel.close()


async def _ended(call: Any, limit: float) -> tuple[grpc.StatusCode, list[str], float]:
    """Reads until the stream ends: its status, the texts it got, and how long that took."""
    texts: list[str] = []
    started = time.monotonic()
    try:
        while True:
            reply = await asyncio.wait_for(call.read(), limit)
            if reply is grpc.aio.EOF:
                return await call.code(), texts, time.monotonic() - started
            texts.append(reply.text)
    except grpc.aio.AioRpcError as error:
        return error.code(), texts, time.monotonic() - started


@pytest.mark.parametrize("change", ["remove the member", "make it private", "delete it"])
async def test_a_change_of_access_ends_streams_on_the_other_replica_within_a_second(
    two_replicas: World, change: str
) -> None:
    world = two_replicas
    private = change != "make it private"
    room = await world.room(private=private)
    # The member and (in the public room) a stranger stream on replica 1; the owner on 0.
    member_call, member_channel = await _streaming(world, 1, "member", room)
    stranger = None if private else await _streaming(world, 1, "stranger", room)
    owner_call, owner_channel = await _streaming(world, 0, "owner", room)
    shut_out = stranger[0] if change == "make it private" else member_call
    try:
        started = time.monotonic()
        if change == "remove the member":
            await world.stub.RemoveMember(
                chat_pb2.RemoveMemberRequest(room=room, user_id=world.people["member"].id),
                metadata=world.md("owner"),
                timeout=10,
            )
        elif change == "make it private":
            await world.stub.UpdateRoom(
                chat_pb2.UpdateRoomRequest(name=room, visibility=chat_pb2.Room.PRIVATE),
                metadata=world.md("owner"),
                timeout=10,
            )
        else:
            await world.stub.DeleteRoom(
                chat_pb2.DeleteRoomRequest(name=room), metadata=world.md("owner"), timeout=10
            )
        changed = time.monotonic()
        if change != "delete it":
            # Stored after the change: it must never reach the stream that was shut out.
            await owner_call.write(chat_pb2.ChatMessage(text="after the change"))
        code, texts, _ = await _ended(shut_out, 5)
        took = time.monotonic() - changed
        assert code == DENIED
        assert "after the change" not in texts
        assert took < 1.0, (
            f"the stream ended {took:.3f}s after the change ({changed - started:.3f}s to make it)"
        )
        if change == "make it private":
            # The member stays and gets what was said after the change.
            while True:
                reply = await asyncio.wait_for(member_call.read(), 5)
                assert reply is not grpc.aio.EOF
                if reply.text == "after the change":
                    break
    finally:
        for call in (member_call, owner_call, *(stranger[:1] if stranger else ())):
            call.cancel()
        await member_channel.close()
        await owner_channel.close()
        if stranger:
            await stranger[1].close()


async def test_a_room_deleted_and_made_again_under_its_name_is_another_room(
    two_replicas: World,
) -> None:
    """The owner deletes a private room and a stranger at once makes a public one under the
    same name (StreamChat makes it on first use): the old room's streams end, and nothing of
    the new room reaches them; the new room starts from sequence 1."""
    world = two_replicas
    room = await world.room(private=True)
    member_call, member_channel = await _streaming(world, 1, "member", room)
    try:
        await world.stub.DeleteRoom(
            chat_pb2.DeleteRoomRequest(name=room), metadata=world.md("owner"), timeout=10
        )
        squatter, squatter_channel = await _streaming(world, 1, "stranger", room)
        try:
            await squatter.write(chat_pb2.ChatMessage(text="in the new room"))
            code, texts, took = await _ended(member_call, 5)
            assert code == DENIED, code
            assert "in the new room" not in texts and "stranger is here" not in texts
            assert took < 1.0
            listed = await world.stub.ListMessages(
                chat_pb2.ListMessagesRequest(room=room), metadata=world.md("stranger"), timeout=10
            )
            assert [m.sequence for m in listed.messages][:1] == [1]
            assert all(m.user_id == world.people["stranger"].id for m in listed.messages)
        finally:
            squatter.cancel()
            await squatter_channel.close()
    finally:
        member_call.cancel()
        await member_channel.close()


async def test_a_chat_admin_may_delete_a_room_made_on_first_use(world: World) -> None:
    made = f"first-use-{next(_rooms)}"
    assert await _stream_code(world, "stranger", made) == OK  # made, with no owner
    for role in ("stranger", "member", "owner"):
        assert await CALLS["DeleteRoom"](world, role, made) == DENIED, role
    assert await CALLS["DeleteRoom"](world, "admin", made) == OK
    assert await CALLS["GetRoom"](world, "stranger", made) == DENIED  # gone
    direct = await world.stub.OpenDirectRoom(
        chat_pb2.OpenDirectRoomRequest(user_id=world.people["member"].id),
        metadata=world.md("owner"),
        timeout=10,
    )
    assert await CALLS["DeleteRoom"](world, "admin", direct.name) == DENIED  # not direct ones


@pytest.fixture
async def two_rooms_each(make_stack) -> World:
    stack = await make_stack(
        replicas=1, people=("Maker", "Other"), in_process=True, PARLEY_CHAT_MAX_ROOMS_PER_USER="2"
    )
    people = {"maker": stack.people["Maker"], "other": stack.people["Other"]}
    channel = grpc.aio.insecure_channel(stack.replicas[0].target)
    try:
        yield World(stack, chat_pb2_grpc.ChatServiceStub(channel), people)
    finally:
        await channel.close()


async def test_rooms_made_on_first_use_and_direct_rooms_count_against_the_quota(
    two_rooms_each: World,
) -> None:
    world = two_rooms_each
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await _stream_code(world, "maker", "quota-one") == OK  # made on first use: 1
    await world.stub.OpenDirectRoom(
        chat_pb2.OpenDirectRoomRequest(user_id=world.people["other"].id),
        metadata=world.md("maker"),
        timeout=10,
    )  # 2
    assert await _stream_code(world, "maker", "quota-three") == exhausted
    assert (
        await _code(
            world.stub.CreateRoom(
                chat_pb2.CreateRoomRequest(name="quota-four"),
                metadata=world.md("maker"),
                timeout=10,
            )
        )
        == exhausted
    )
    # Rooms that exist are not made again: streaming in them costs nothing.
    assert await _stream_code(world, "maker", "quota-one") == OK
    assert await _stream_code(world, "other", "quota-three") == OK  # someone else's quota
    assert await _stream_code(world, "maker", "quota-three") == OK


async def test_a_resume_point_past_the_rooms_end_is_out_of_range(world: World) -> None:
    """A client resuming at 50 in a room that was deleted and made again (now at 1) would
    skip the new room's first 50 messages: it is refused, and told to resume from 0."""
    room = await world.room(private=False)
    assert await _stream_code(world, "member", room) == OK  # the room is at 1
    call = world.stub.StreamChat(
        metadata=[*world.md("member"), (ROOM_KEY, room), (RESUME_KEY, "50")],
        timeout=10,
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call.read()
    assert refused.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "resume from 0" in (refused.value.details() or "")
    resumed = world.stub.StreamChat(
        metadata=[*world.md("member"), (ROOM_KEY, room), (RESUME_KEY, "1")],
        timeout=10,
    )
    try:
        await resumed.write(chat_pb2.ChatMessage(text="again"))
        assert (await resumed.read()).text == "again"
    finally:
        resumed.cancel()


async def test_a_resume_point_of_a_room_made_again_is_out_of_range(world: World) -> None:
    """Each message carries its room's id; a resume point sent with it (`x-chat-room-id`) is
    refused in a room deleted and made again, even one that has reached the point again."""

    async def say(text: str, room: str, *extra: tuple[str, str]) -> chat_pb2.ChatMessage:
        call = world.stub.StreamChat(
            metadata=[*world.md("owner"), (ROOM_KEY, room), *extra], timeout=10
        )
        try:
            await call.write(chat_pb2.ChatMessage(text=text, client_message_id=text))
            reply = await call.read()
            assert isinstance(reply, chat_pb2.ChatMessage), await call.code()
            return reply
        finally:
            call.cancel()

    room = await world.room(private=False)
    first = await say("old-1", room)
    await say("old-2", room)
    assert first.room_id > 0
    listed = await world.stub.ListMessages(
        chat_pb2.ListMessagesRequest(room=room), metadata=world.md("owner"), timeout=10
    )
    assert {m.room_id for m in listed.messages} == {first.room_id}

    await world.stub.DeleteRoom(
        chat_pb2.DeleteRoomRequest(name=room), metadata=world.md("owner"), timeout=10
    )
    await world.stub.CreateRoom(
        chat_pb2.CreateRoomRequest(name=room), metadata=world.md("owner"), timeout=10
    )
    for text in ("new-1", "new-2", "new-3"):
        newer = await say(text, room)
    assert newer.room_id not in (0, first.room_id)

    def resume(after: str, room_id: str) -> Any:
        return world.stub.StreamChat(
            metadata=[
                *world.md("member"),
                (ROOM_KEY, room),
                (RESUME_KEY, after),
                (ROOM_ID_KEY, room_id),
            ],
            timeout=10,
        )

    # Resuming after old-1 (sequence 1) would skip new-1: refused by its room id.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await resume("1", str(first.room_id)).read()
    assert refused.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "resume from 0" in (refused.value.details() or "")

    # The same point in the room it came from goes on from there.
    resumed = resume("1", str(newer.room_id))
    try:
        assert [(await resumed.read()).text for _ in range(2)] == ["new-2", "new-3"]
    finally:
        resumed.cancel()

    with pytest.raises(grpc.aio.AioRpcError) as malformed:
        await resume("", "-1").read()
    assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # 0 is no room id (what a message from a server without room ids carried).
    unknown = resume("1", "0")
    try:
        assert (await unknown.read()).text == "new-2"
    finally:
        unknown.cancel()

    # A resume point of a room that is gone never makes the room again.
    await world.stub.DeleteRoom(
        chat_pb2.DeleteRoomRequest(name=room), metadata=world.md("owner"), timeout=10
    )
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await resume("3", str(newer.room_id)).read()
    assert gone.value.code() == DENIED
    assert await CALLS["GetRoom"](world, "owner", room) == DENIED
