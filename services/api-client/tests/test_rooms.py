"""Rooms in the SDK against the real ChatService: every room method sync and async, private
rooms refusing outsiders with `PermissionDenied`, direct rooms, and sessions that end (never
reconnect) on PERMISSION_DENIED."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from parley.client import (
    AlreadyExists,
    AsyncChatClient,
    ChatClient,
    ConnectionEvent,
    ConnectionState,
    FailedPrecondition,
    InvalidArgument,
    MemberPage,
    NotFound,
    ParleyError,
    PermissionDenied,
    RoomPage,
    Visibility,
)
from parley.client.errors import CallContext, error_from_rpc
from parley.client.rooms import update_request
from parley.proto import chat_pb2

if TYPE_CHECKING:
    from conftest import Person, RunningStack

PRIVATE = chat_pb2.Room.PRIVATE
PUBLIC = chat_pb2.Room.PUBLIC


def direct_name(a: int, b: int) -> str:
    return f"dm-{min(a, b)}-{max(a, b)}"


# --- without a server ----------------------------------------------------------------------


def test_visibility_spellings() -> None:
    assert Visibility.parse("private") is Visibility.PRIVATE
    assert Visibility.parse("PUBLIC") is Visibility.PUBLIC  # type: ignore[arg-type]
    assert Visibility.parse(Visibility.PRIVATE) is Visibility.PRIVATE
    with pytest.raises(ValueError, match="'public' or 'private'"):
        Visibility.parse("secret")  # type: ignore[arg-type]
    assert Visibility.PRIVATE.to_proto() == PRIVATE
    assert Visibility.of(chat_pb2.Room(visibility=PRIVATE)) is Visibility.PRIVATE
    assert Visibility.of(chat_pb2.Room()) is Visibility.PUBLIC


def test_update_request_sends_only_what_is_given() -> None:
    with pytest.raises(ValueError, match="title or a visibility"):
        update_request("r", None, None)
    title_only = update_request("r", "", None)
    assert title_only.HasField("title") and title_only.title == ""
    assert title_only.visibility == chat_pb2.Room.VISIBILITY_UNSPECIFIED
    visibility_only = update_request("r", None, "private")
    assert not visibility_only.HasField("title") and visibility_only.visibility == PRIVATE


def test_page_sizes_are_checked_before_calling() -> None:
    with ChatClient("127.0.0.1:1", token="t") as chat:
        with pytest.raises(ValueError, match="page_size must be 1 to 500"):
            chat.list_rooms_page(page_size=501)
        with pytest.raises(ValueError, match="page_size must be 1 to 1000"):
            chat.list_members_page("r", page_size=0)


class _Denied(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.PERMISSION_DENIED

    def details(self) -> str:
        return "room lobby is private"


def test_permission_denied_on_a_room_has_a_room_hint() -> None:
    def context(method: str) -> CallContext:
        return CallContext("127.0.0.1:50052", f"/chat.ChatService/{method}", "X", 10, True)

    read = error_from_rpc(_Denied(), context("GetRoom"))
    assert isinstance(read, PermissionDenied)
    assert "private" in read.hint and "scope" not in read.hint
    write = error_from_rpc(_Denied(), context("DeleteRoom"))
    assert "owner" in write.hint


async def test_a_session_never_reconnects_after_permission_denied() -> None:
    async with AsyncChatClient("127.0.0.1:1", token="t") as chat:
        session = chat.session("lobby")
        assert not session._reconnects_after(PermissionDenied("room lobby is private"))


# --- sync ----------------------------------------------------------------------------------


def test_room_methods(stack: RunningStack, person: Callable[[str], Person], room: str) -> None:
    ada, bob = person("Ada"), person("Bob")
    with (
        ChatClient(stack.chat, token=ada.token) as chat,
        ChatClient(stack.chat2, token=bob.token) as bob_chat,
    ):
        created = chat.create_room(room, title="Ada's room", visibility="private")
        assert (created.name, created.title, created.visibility) == (room, "Ada's room", PRIVATE)
        assert (created.owner_id, created.member_count, created.direct) == (ada.id, 1, False)
        assert created.HasField("create_time")
        assert chat.get_room(room) == created
        with pytest.raises(AlreadyExists):
            chat.create_room(room)

        renamed = chat.update_room(room, title="Renamed")
        assert (renamed.title, renamed.visibility) == ("Renamed", PRIVATE), "visibility kept"
        opened = chat.update_room(room, visibility=Visibility.PUBLIC)
        assert (opened.title, opened.visibility) == ("Renamed", PUBLIC), "title kept"
        chat.update_room(room, visibility="private")

        member = chat.add_member(room, bob.id)
        assert (member.user_id, member.owner) == (bob.id, False)
        assert member.HasField("join_time")
        assert chat.add_member(room, bob.id).user_id == bob.id, "adding twice is fine"
        members = list(chat.list_members(room))
        assert [(m.user_id, m.owner) for m in members] == [(ada.id, True), (bob.id, False)]
        first = chat.list_members_page(room, page_size=1)
        assert isinstance(first, MemberPage)
        assert [m.user_id for m in first.members] == [ada.id] and first.has_more
        second = chat.list_members_page(room, page_size=1, page_token=first.next_page_token)
        assert [m.user_id for m in second.members] == [bob.id]
        assert list(chat.list_members(room, page_size=1)) == members
        assert bob_chat.get_room(room).member_count == 2, "a member may read it"

        chat.remove_member(room, bob.id)
        assert [m.user_id for m in chat.list_members(room)] == [ada.id]
        with pytest.raises(PermissionDenied):
            bob_chat.get_room(room)
        chat.add_member(room, bob.id)
        bob_chat.leave_room(room)
        assert [m.user_id for m in chat.list_members(room)] == [ada.id]

        assert room in [r.name for r in chat.list_rooms()]
        assert room not in [r.name for r in bob_chat.list_rooms()], "private, not a member"
        chat.delete_room(room)
        with pytest.raises((PermissionDenied, NotFound)):
            chat.get_room(room)
        assert room not in [r.name for r in chat.list_rooms()]


def test_list_rooms_goes_through_every_page(
    stack: RunningStack, person: Callable[[str], Person]
) -> None:
    ada = person("Ada")
    prefix = f"pages-{uuid.uuid4().hex[:8]}"
    names = [f"{prefix}-{i}" for i in range(5)]
    with ChatClient(stack.chat, token=ada.token) as chat:
        for name in names:
            chat.create_room(name)
        everything = [r.name for r in chat.list_rooms(page_size=2)]
        assert [n for n in everything if n.startswith(prefix)] == names, "by name, each once"
        assert everything == sorted(everything)
        page = chat.list_rooms_page(page_size=2)
        assert isinstance(page, RoomPage) and len(page.rooms) == 2 and page.has_more
        for name in names:
            chat.delete_room(name)


def test_direct_rooms(stack: RunningStack, person: Callable[[str], Person]) -> None:
    ada, bob, carol = person("Ada"), person("Bob"), person("Carol")
    with ChatClient(stack.chat, token=ada.token) as chat:
        direct = chat.open_direct_room(bob.id)
        assert direct.name == direct_name(ada.id, bob.id)
        assert (direct.visibility, direct.direct, direct.member_count) == (PRIVATE, True, 2)
        assert direct.owner_id == 0
        assert chat.open_direct_room(bob.id).name == direct.name, "the same room every time"
        with pytest.raises(PermissionDenied) as no_owner:
            chat.add_member(direct.name, carol.id)
        assert no_owner.value.reason == "NOT_ROOM_OWNER" and "owner" in no_owner.value.hint
        with pytest.raises(NotFound):
            chat.open_direct_room(987654321)
    with ChatClient(stack.chat2, token=bob.token) as chat:
        assert chat.open_direct_room(ada.id).name == direct.name, "the same from either side"
        assert {m.user_id for m in chat.list_members(direct.name)} == {ada.id, bob.id}
    with ChatClient(stack.chat, token=carol.token) as chat:
        with pytest.raises(PermissionDenied):
            chat.get_room(direct.name)
    admin = stack.token(str(carol.id), ("chat:admin",))
    with ChatClient(stack.chat, token=admin) as chat:
        with pytest.raises(FailedPrecondition) as fixed:
            chat.add_member(direct.name, carol.id)
        assert "direct room" in fixed.value.hint


def test_room_errors(stack: RunningStack, person: Callable[[str], Person], room: str) -> None:
    ada, bob, carol = person("Ada"), person("Bob"), person("Carol")
    with ChatClient(stack.chat, token=ada.token) as chat:
        with pytest.raises(InvalidArgument):
            chat.create_room("dm-1-2")
        with pytest.raises(InvalidArgument):
            chat.create_room("Not A Name")
        with pytest.raises(InvalidArgument):
            chat.create_room(room, title="x" * 201)
        chat.create_room(room, visibility="private")
        with pytest.raises(NotFound) as missing:
            chat.add_member(room, 987654321)
        assert "room" in missing.value.hint
        with pytest.raises(AlreadyExists) as taken:
            chat.create_room(room)
        assert "room name is taken" in taken.value.hint
    with ChatClient(stack.chat, token=bob.token) as chat:
        for call in (
            lambda: chat.update_room(room, title="mine now"),
            lambda: chat.delete_room(room),
            lambda: chat.add_member(room, bob.id),
        ):
            with pytest.raises(PermissionDenied) as denied:
                call()
            assert denied.value.code is grpc.StatusCode.PERMISSION_DENIED
            assert "owner" in denied.value.hint
    admin = stack.token(str(carol.id), ("chat:admin",))
    with ChatClient(stack.chat, token=admin) as chat:
        assert chat.add_member(room, bob.id).user_id == bob.id, "chat:admin adds to any room"
        chat.remove_member(room, bob.id)


def test_private_rooms_refuse_outsiders(
    stack: RunningStack, person: Callable[[str], Person], room: str
) -> None:
    ada, bob = person("Ada"), person("Bob")
    with ChatClient(stack.chat, token=ada.token) as chat:
        chat.create_room(room, visibility="private")
        chat.post(room, "members only")
    calls: dict[str, Callable[[ChatClient], Any]] = {
        "GetRoom": lambda c: c.get_room(room),
        "ListMembers": lambda c: list(c.list_members(room)),
        "ListMessages": lambda c: c.list_messages_page(room),
        "ListPresence": lambda c: c.presence(room),
        "StreamChat": lambda c: c.post(room, "let me in"),
    }
    with ChatClient(stack.chat, token=bob.token) as chat:
        for method, call in calls.items():
            with pytest.raises(PermissionDenied) as denied:
                call(chat)
            assert denied.value.method == f"/chat.ChatService/{method}"
            assert "private" in denied.value.hint, method
            assert str(denied.value).startswith("PERMISSION_DENIED")
        # The same answer for a room that does not exist.
        with pytest.raises(PermissionDenied):
            chat.get_room(f"{room}-none")


# --- async ---------------------------------------------------------------------------------


async def test_async_room_methods(
    stack: RunningStack, person: Callable[[str], Person], room: str
) -> None:
    ada, bob = person("Ada"), person("Bob")
    async with AsyncChatClient(stack.chat, token=ada.token) as chat:
        created = await chat.create_room(room, title="Async", visibility=Visibility.PRIVATE)
        assert (created.name, created.title, created.visibility) == (room, "Async", PRIVATE)
        assert await chat.get_room(room) == created
        with pytest.raises(AlreadyExists):
            await chat.create_room(room)
        updated = await chat.update_room(room, title="Async 2", visibility="public")
        assert (updated.title, updated.visibility) == ("Async 2", PUBLIC)
        await chat.update_room(room, visibility="private")

        member = await chat.add_member(room, bob.id)
        assert (member.user_id, member.owner) == (bob.id, False)
        assert [m.user_id async for m in chat.list_members(room, page_size=1)] == [ada.id, bob.id]
        page = await chat.list_members_page(room, page_size=1)
        assert len(page.members) == 1 and page.has_more

        async with AsyncChatClient(stack.chat2, token=bob.token) as bob_chat:
            assert (await bob_chat.get_room(room)).member_count == 2
            await bob_chat.leave_room(room)
            with pytest.raises(PermissionDenied):
                await bob_chat.get_room(room)
            with pytest.raises(PermissionDenied):
                await bob_chat.list_members_page(room)
            direct = await bob_chat.open_direct_room(ada.id)
            assert direct.name == direct_name(ada.id, bob.id) and direct.direct

        await chat.add_member(room, bob.id)
        await chat.remove_member(room, bob.id)
        assert [m.user_id async for m in chat.list_members(room)] == [ada.id]

        assert room in [r.name async for r in chat.list_rooms(page_size=1)]
        rooms_page = await chat.list_rooms_page(page_size=1)
        assert len(rooms_page.rooms) == 1
        assert (await chat.open_direct_room(bob.id)).name == direct.name
        await chat.delete_room(room)
        with pytest.raises((PermissionDenied, NotFound)):
            await chat.get_room(room)


# --- sessions and PERMISSION_DENIED --------------------------------------------------------


async def test_a_session_refused_by_a_private_room_fails_at_once(
    stack: RunningStack, person: Callable[[str], Person], room: str
) -> None:
    ada, bob = person("Ada"), person("Bob")
    async with AsyncChatClient(stack.chat, token=ada.token) as chat:
        await chat.create_room(room, visibility="private")
    async with AsyncChatClient(stack.chat, token=bob.token) as chat:
        # With history, ListMessages refuses first; with resume_after the stream itself.
        for options in ({"history": 5}, {"resume_after": 0}):
            # The server may accept the stream and end it before delivering anything.
            events: list[ConnectionEvent] = []
            session = chat.session(room, on_state=events.append, **options)  # type: ignore[arg-type]
            started = asyncio.get_running_loop().time()
            with pytest.raises(PermissionDenied) as refused:
                async with session, asyncio.timeout(20):
                    async for message in session:
                        pytest.fail(f"an outsider received {message}")
            assert asyncio.get_running_loop().time() - started < 5, "no retrying"
            assert refused.value.reason == "ROOM_ACCESS_DENIED"
            assert session.state is ConnectionState.FAILED and session.error is refused.value
            assert ConnectionState.RECONNECTING not in [e.state for e in events], options
            assert session.reconnects == 0


async def test_a_session_ends_when_its_membership_is_removed(
    stack: RunningStack, person: Callable[[str], Person], room: str, collector: Any
) -> None:
    ada, bob = person("Ada"), person("Bob")
    events: list[ConnectionEvent] = []
    async with (
        AsyncChatClient(stack.chat, token=ada.token) as ada_chat,
        AsyncChatClient(stack.chat2, token=bob.token) as bob_chat,
    ):
        await ada_chat.create_room(room, visibility="private")
        await ada_chat.add_member(room, bob.id)
        async with bob_chat.session(room, on_state=events.append) as session:
            await ada_chat.post(room, "welcome")
            seen: list[chat_pb2.ChatMessage] = []
            await collector(session, seen, lambda ms: len(ms) >= 1)
            assert seen[0].text == "welcome"

            await ada_chat.remove_member(room, bob.id)
            with pytest.raises(PermissionDenied) as ended:
                async with asyncio.timeout(20):
                    async for message in session:
                        seen.append(message)
            assert isinstance(ended.value, ParleyError)
            assert session.state is ConnectionState.FAILED
            assert session.error is ended.value
            with pytest.raises(PermissionDenied):
                await session.send("still here?")
    states = [e.state for e in events]
    assert ConnectionState.RECONNECTING not in states, states
    assert states[-1] is ConnectionState.FAILED
    assert isinstance(events[-1].error, PermissionDenied)
