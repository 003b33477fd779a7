"""Code that uses the SDK the way an application would, fully annotated.

`test_typed_usage.py` checks this file with `mypy --strict` (so the SDK's types are usable
by strictly typed code) and runs it against the test stack.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from parley.client import (
    AlreadyExists,
    AsyncChatClient,
    AsyncUserClient,
    ChatClient,
    ConnectionEvent,
    ConnectionState,
    FieldViolation,
    HealthStatus,
    HistoryGap,
    InvalidArgument,
    MemberPage,
    NewUser,
    NotFound,
    ParleyError,
    PermissionDenied,
    ReconnectPolicy,
    RefreshingToken,
    RoomPage,
    TokenProvider,
    UserClient,
    UserPage,
    Visibility,
)
from parley.proto import chat_pb2, user_pb2


@dataclass(frozen=True)
class Report:
    """What `directory_report` found."""

    names: list[str]
    pages: int
    missing: bool
    violations: list[FieldViolation]


def directory_report(target: str, token: TokenProvider, email: str) -> Report:
    """Sync UserService calls: create (tolerating a taken email), page, look up, validate."""
    with UserClient(target, token=RefreshingToken(token), timeout=5.0) as users:
        assert users.health() is HealthStatus.SERVING
        try:
            user: user_pb2.User = users.create_user(name="Typed", email=email, age=40)
        except AlreadyExists:
            user = next(u for u in users.list_users() if u.email == email)
        user = users.update_user(user.id, age=41)
        page: UserPage = users.list_users_page(page_size=2)
        pages = 1
        while page.has_more:
            page = users.list_users_page(page_size=500, page_token=page.next_page_token)
            pages += 1
        try:
            users.get_user(2_000_000_000)
            missing = False
        except NotFound:
            missing = True
        violations: list[FieldViolation] = []
        try:
            users.create_user(name="", email="invalid", age=1)
        except InvalidArgument as exc:
            violations = exc.field_violations
        reply: user_pb2.ImportUsersResponse = users.import_users(
            [NewUser("Typed Row", f"row-{email}", 3)], on_progress=lambda sent: None
        )
        assert reply.failed_count + reply.created_count == 1
        names: list[str] = [users.get_user(user.id).name]
        return Report(names, pages, missing, violations)


def post_all(target: str, token: str, room: str, texts: Sequence[str]) -> list[int]:
    """Sync ChatService calls: post and read back; returns the stored sequence numbers."""
    with ChatClient(target, token=token) as chat:
        stored: list[chat_pb2.ChatMessage] = chat.post(room, *texts)
        history: Iterator[chat_pb2.ChatMessage] = chat.list_messages(room)
        assert [m.sequence for m in history] == [m.sequence for m in stored]
        return [m.sequence for m in stored]


async def count_users(target: str, token: str) -> int:
    """Async paging over every user."""
    async with AsyncUserClient(target, token=token) as users:
        total = 0
        async for _user in users.list_users(page_size=50):
            total += 1
        return total


async def chat_round_trip(target: str, token: str, room: str) -> tuple[int, list[str]]:
    """An async session: send, read back the echo, report the connection's states."""
    states: list[str] = []

    def on_state(event: ConnectionEvent) -> None:
        states.append(event.describe())

    def on_gap(gap: HistoryGap) -> None:
        states.append(gap.describe())

    policy = ReconnectPolicy(max_delay=2.0, give_up_after=30.0)
    async with AsyncChatClient(target, token=token) as chat:
        async with chat.session(
            room, history=5, policy=policy, on_state=on_state, on_gap=on_gap
        ) as session:
            client_id: str = await session.send("typed hello")
            async for message in session:
                if message.client_message_id == client_id:
                    break
            assert session.state is ConnectionState.CONNECTED
            gaps: tuple[HistoryGap, ...] = session.gaps
            assert not gaps
            last: int = session.last_sequence
    return last, states


def describe_failure(error: ParleyError) -> str:
    """What a command line would print for a failed call."""
    return f"{error.code.name} at {error.target}: {error.hint}"


def team_room(target: str, owner_token: str, outsider_token: str, room: str, member: int) -> bool:
    """Sync room calls: a private room, a member, the pages; True when an outsider is denied."""
    with ChatClient(target, token=owner_token) as chat:
        created: chat_pb2.Room = chat.create_room(room, title="Typed", visibility="private")
        assert Visibility.of(created) is Visibility.PRIVATE
        membership: chat_pb2.Membership = chat.add_member(room, member)
        assert not membership.owner
        rooms: RoomPage = chat.list_rooms_page(page_size=10)
        members: MemberPage = chat.list_members_page(room, page_size=10)
        assert rooms.rooms and len(members.members) == 2
        chat.update_room(room, title="Typed 2", visibility=Visibility.PRIVATE)
    with ChatClient(target, token=outsider_token) as outsider:
        try:
            outsider.get_room(room)
        except PermissionDenied:
            return True
    return False


async def direct_room_name(target: str, token: str, other: int) -> str:
    """asyncio room calls: the direct room with another user, and its members."""
    async with AsyncChatClient(target, token=token) as chat:
        room: chat_pb2.Room = await chat.open_direct_room(other)
        ids: list[int] = [m.user_id async for m in chat.list_members(room.name)]
        assert other in ids
        return room.name
