"""Clients for ChatService: `ChatClient` (sync) and `AsyncChatClient` (asyncio).

    async with AsyncChatClient("127.0.0.1:50052,127.0.0.1:50053", token=token) as chat:
        async with chat.session("general", history=20) as session:
            await session.send("hello")
            async for message in session:
                print(message.sequence, message.user, message.text)

`session()` (asyncio only) joins a room and stays joined across dropped connections and
replica restarts: see `parley.client.session.ChatSession`. The other methods read history
and presence, `post()` sends messages without staying in the room, and the room methods
(`create_room`, `get_room`, `list_rooms`, `update_room`, `delete_room`, `add_member`,
`remove_member`, `leave_room`, `list_members`, `open_direct_room`) manage rooms, private
ones and direct ones (see `parley.client.rooms`). Methods return the generated messages
(`parley.proto.chat_pb2.ChatMessage`, `chat_pb2.Room`, ...). Every call except a session's
stream has a deadline (the client's `timeout` or the call's `timeout=`); ListMessages,
ListPresence, GetRoom, ListRooms and ListMembers are retried on UNAVAILABLE.

A caller who may not read a private room gets `PermissionDenied` from every call about it,
a session included: the session ends with it (it never reconnects after it), whether the
room refused the stream at once or the caller's membership ended while it was open.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence

import grpc
import grpc.aio

from parley.client._base import AsyncClientBase, SyncClientBase
from parley.client._channel import CHAT_SERVICE
from parley.client._history import INT64_MAX, MAX_PAGE_SIZE, last_messages
from parley.client.errors import DeadlineExceeded, Unavailable
from parley.client.rooms import (
    DEFAULT_MEMBER_PAGE_SIZE,
    DEFAULT_ROOM_PAGE_SIZE,
    MemberPage,
    RoomPage,
    Visibility,
    VisibilityName,
    create_request,
    members_request,
    rooms_request,
    update_request,
)
from parley.client.session import (
    MAX_TEXT_BYTES,
    ChatSession,
    GapCallback,
    ReconnectPolicy,
    StateCallback,
    check_text,
)
from parley.proto import chat_pb2, chat_pb2_grpc, contract
from parley.proto.contract import ROOM_KEY

__all__ = [
    "DEFAULT_ROOM",
    "MAX_TEXT_BYTES",
    "AsyncChatClient",
    "ChatClient",
    "check_text",
]

DEFAULT_ROOM = contract.DEFAULT_ROOM
DEFAULT_PAGE_SIZE = 100


def _check_page_size(page_size: int) -> None:
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise ValueError(f"page_size must be 1 to {MAX_PAGE_SIZE}, got {page_size}")


def _history_request(
    room: str, after: int, before: int, page_size: int
) -> chat_pb2.ListMessagesRequest:
    _check_page_size(page_size)
    return chat_pb2.ListMessagesRequest(
        room=room, after_sequence=after, before_sequence=before, page_size=page_size
    )


def _posts(texts: Sequence[str]) -> list[chat_pb2.ChatMessage]:
    for text in texts:
        check_text(text)
    return [chat_pb2.ChatMessage(text=t, client_message_id=uuid.uuid4().hex) for t in texts]


class ChatClient(SyncClientBase):
    """A sync client of ChatService.

    `target` is `host:port`, `dns:///host:port`, several addresses separated by commas (tried
    in turn, e.g. both replicas `127.0.0.1:50052,127.0.0.1:50053`), or None for
    `$PARLEY_CHAT_ADDR`, else `localhost:50052`. The other arguments are those of
    `parley.client.UserClient`. Chat needs a token whose subject is the id of an existing user.
    For a live conversation use `AsyncChatClient.session()`.
    """

    _service = CHAT_SERVICE

    def _stub(self, channel: grpc.Channel) -> chat_pb2_grpc.ChatServiceStub:
        return chat_pb2_grpc.ChatServiceStub(channel)

    def list_messages_page(
        self,
        room: str = DEFAULT_ROOM,
        *,
        after: int = 0,
        before: int = 0,
        page_size: int = DEFAULT_PAGE_SIZE,
        timeout: float | None = None,
    ) -> chat_pb2.ListMessagesResponse:
        """One page of a room's stored messages, oldest first: those after sequence `after`,
        or, when `before` is positive, the newest ones before sequence `before`.

        The reply's `has_more` says whether more exist in that direction, and `last_sequence`
        is the room's highest sequence.
        """
        deadline = self._deadline(timeout)
        request = _history_request(room, after, before, page_size)
        return self._call(
            "ListMessages",
            deadline,
            lambda ch: self._stub(ch).ListMessages(request, timeout=deadline),
            idempotent=True,
        )

    def list_messages(
        self,
        room: str = DEFAULT_ROOM,
        *,
        after: int = 0,
        page_size: int = DEFAULT_PAGE_SIZE,
        timeout: float | None = None,
    ) -> Iterator[chat_pb2.ChatMessage]:
        """Every stored message of a room with a sequence above `after`, oldest first, fetched
        a page at a time (each page one call with its own deadline)."""
        while True:
            page = self.list_messages_page(room, after=after, page_size=page_size, timeout=timeout)
            yield from page.messages
            if not page.has_more or not page.messages:
                return
            after = page.messages[-1].sequence

    def recent_messages(
        self, room: str = DEFAULT_ROOM, count: int = 20, *, timeout: float | None = None
    ) -> list[chat_pb2.ChatMessage]:
        """The last `count` messages of a room, oldest first."""
        messages: list[chat_pb2.ChatMessage] = []
        before = INT64_MAX
        while len(messages) < count:
            page = self.list_messages_page(
                room,
                before=before,
                page_size=min(count - len(messages), MAX_PAGE_SIZE),
                timeout=timeout,
            )
            messages[:0] = page.messages
            if not page.has_more or not page.messages:
                break
            before = page.messages[0].sequence
        return messages

    def presence(
        self, room: str = DEFAULT_ROOM, *, timeout: float | None = None
    ) -> list[chat_pb2.RoomMember]:
        """Who is connected to a room now, on any replica, by user id."""
        deadline = self._deadline(timeout)
        request = chat_pb2.ListPresenceRequest(room=room)
        reply = self._call(
            "ListPresence",
            deadline,
            lambda ch: self._stub(ch).ListPresence(request, timeout=deadline),
            idempotent=True,
        )
        return list(reply.members)

    def post(
        self, room: str, *texts: str, timeout: float | None = None
    ) -> list[chat_pb2.ChatMessage]:
        """Send messages to a room without staying in it; returns them as stored (with their
        sequence numbers), in the order given.

        Opens a StreamChat call, sends the texts, and waits (up to the deadline) for the
        server's echo of each. Keep to the rate limit (a burst of 40 by default): beyond it
        the call fails with `ResourceExhausted`. Raises ValueError for an empty or over-long
        text before sending anything.
        """
        requests = _posts(texts)
        if not requests:
            return []
        deadline = self._deadline(timeout)
        wanted = {r.client_message_id for r in requests}
        stored: dict[str, chat_pb2.ChatMessage] = {}
        with self._errors("StreamChat", deadline):
            call = self._stub(self._targets.channel()).StreamChat(
                iter(requests), timeout=deadline, metadata=((ROOM_KEY, room),)
            )
            try:
                for message in call:
                    if message.client_message_id in wanted:
                        stored[message.client_message_id] = message
                    if len(stored) == len(wanted):
                        break
            finally:
                call.cancel()
        if len(stored) < len(wanted):
            raise Unavailable(
                "the stream ended before every message was acknowledged",
                target=self.target,
                method=f"/{CHAT_SERVICE.name}/StreamChat",
                hint="retry: messages already stored are not stored twice",
            )
        return [stored[r.client_message_id] for r in requests]

    # --- Rooms -----------------------------------------------------------------------------

    def create_room(
        self,
        name: str,
        *,
        title: str = "",
        visibility: Visibility | VisibilityName = Visibility.PUBLIC,
        timeout: float | None = None,
    ) -> chat_pb2.Room:
        """Create a room; the caller becomes its owner and first member. Not retried.

        Raises `AlreadyExists` when the name is taken, `InvalidArgument` for a bad name or
        title (names starting with `dm-` are reserved for direct rooms) and
        `ResourceExhausted` when the caller owns as many rooms as they may.
        """
        deadline = self._deadline(timeout)
        request = create_request(name, title, visibility)
        return self._call(
            "CreateRoom",
            deadline,
            lambda ch: self._stub(ch).CreateRoom(request, timeout=deadline),
            idempotent=False,
        )

    def get_room(self, name: str, *, timeout: float | None = None) -> chat_pb2.Room:
        """A room the caller may read. Raises `PermissionDenied` for a private room the
        caller is not a member of (and, alike, for a name no room has)."""
        deadline = self._deadline(timeout)
        request = chat_pb2.GetRoomRequest(name=name)
        return self._call(
            "GetRoom",
            deadline,
            lambda ch: self._stub(ch).GetRoom(request, timeout=deadline),
            idempotent=True,
        )

    def list_rooms_page(
        self,
        *,
        page_size: int = DEFAULT_ROOM_PAGE_SIZE,
        page_token: str = "",
        timeout: float | None = None,
    ) -> RoomPage:
        """One page of the rooms the caller may read (the public ones and those the caller
        belongs to), by name, starting at `page_token` (the first page when empty)."""
        deadline = self._deadline(timeout)
        request = rooms_request(page_size, page_token)
        reply = self._call(
            "ListRooms",
            deadline,
            lambda ch: self._stub(ch).ListRooms(request, timeout=deadline),
            idempotent=True,
        )
        return RoomPage(tuple(reply.rooms), reply.next_page_token)

    def list_rooms(
        self, *, page_size: int = DEFAULT_ROOM_PAGE_SIZE, timeout: float | None = None
    ) -> Iterator[chat_pb2.Room]:
        """Every room the caller may read, by name, fetched `page_size` at a time as the
        iteration goes (each page one call with its own deadline)."""
        token = ""
        while True:
            page = self.list_rooms_page(page_size=page_size, page_token=token, timeout=timeout)
            yield from page.rooms
            if not page.has_more:
                return
            token = page.next_page_token

    def update_room(
        self,
        name: str,
        *,
        title: str | None = None,
        visibility: Visibility | VisibilityName | None = None,
        timeout: float | None = None,
    ) -> chat_pb2.Room:
        """Change a room's title and/or visibility (what is None stays) and return the room.

        Only its owner may (`PermissionDenied` otherwise). Made private, the room's open
        streams of non-members end with PERMISSION_DENIED. Passing neither is a ValueError.
        """
        deadline = self._deadline(timeout)
        request = update_request(name, title, visibility)
        return self._call(
            "UpdateRoom",
            deadline,
            lambda ch: self._stub(ch).UpdateRoom(request, timeout=deadline),
            idempotent=False,
        )

    def delete_room(self, name: str, *, timeout: float | None = None) -> None:
        """Delete a room and every message in it; only its owner may. Not retried."""
        deadline = self._deadline(timeout)
        request = chat_pb2.DeleteRoomRequest(name=name)
        self._call(
            "DeleteRoom",
            deadline,
            lambda ch: self._stub(ch).DeleteRoom(request, timeout=deadline),
            idempotent=False,
        )

    def add_member(
        self, room: str, user_id: int, *, timeout: float | None = None
    ) -> chat_pb2.Membership:
        """Make a user a member of a room (the owner may, or a `chat:admin` token) and return
        the membership, also when the user already was one.

        Raises `NotFound` when the user does not exist and `FailedPrecondition` for a direct
        room.
        """
        deadline = self._deadline(timeout)
        request = chat_pb2.AddMemberRequest(room=room, user_id=user_id)
        reply = self._call(
            "AddMember",
            deadline,
            lambda ch: self._stub(ch).AddMember(request, timeout=deadline),
            idempotent=False,
        )
        return reply.member

    def remove_member(self, room: str, user_id: int, *, timeout: float | None = None) -> None:
        """End a user's membership (the owner or a `chat:admin` token may remove anyone but the
        owner). In a private room the user's open streams end with PERMISSION_DENIED."""
        deadline = self._deadline(timeout)
        request = chat_pb2.RemoveMemberRequest(room=room, user_id=user_id)
        self._call(
            "RemoveMember",
            deadline,
            lambda ch: self._stub(ch).RemoveMember(request, timeout=deadline),
            idempotent=False,
        )

    def leave_room(self, room: str, *, timeout: float | None = None) -> None:
        """End the caller's own membership of a room (`remove_member` of user 0)."""
        self.remove_member(room, 0, timeout=timeout)

    def list_members_page(
        self,
        room: str,
        *,
        page_size: int = DEFAULT_MEMBER_PAGE_SIZE,
        page_token: str = "",
        timeout: float | None = None,
    ) -> MemberPage:
        """One page of a room's members, by user id, starting at `page_token`. Raises
        `PermissionDenied` for a room the caller may not read."""
        deadline = self._deadline(timeout)
        request = members_request(room, page_size, page_token)
        reply = self._call(
            "ListMembers",
            deadline,
            lambda ch: self._stub(ch).ListMembers(request, timeout=deadline),
            idempotent=True,
        )
        return MemberPage(tuple(reply.members), reply.next_page_token)

    def list_members(
        self,
        room: str,
        *,
        page_size: int = DEFAULT_MEMBER_PAGE_SIZE,
        timeout: float | None = None,
    ) -> Iterator[chat_pb2.Membership]:
        """Every member of a room, by user id, fetched `page_size` at a time."""
        token = ""
        while True:
            page = self.list_members_page(
                room, page_size=page_size, page_token=token, timeout=timeout
            )
            yield from page.members
            if not page.has_more:
                return
            token = page.next_page_token

    def open_direct_room(self, user_id: int, *, timeout: float | None = None) -> chat_pb2.Room:
        """The private room of the caller and another user (`dm-<low id>-<high id>`), the same
        every time, created on the first call. Raises `NotFound` when the user does not exist.
        Chat in it like in any room, e.g. `session(room.name)`."""
        deadline = self._deadline(timeout)
        request = chat_pb2.OpenDirectRoomRequest(user_id=user_id)
        return self._call(
            "OpenDirectRoom",
            deadline,
            lambda ch: self._stub(ch).OpenDirectRoom(request, timeout=deadline),
            idempotent=False,
        )


class AsyncChatClient(AsyncClientBase):
    """The asyncio client of ChatService: history, presence, posting, and live sessions.

    See `ChatClient` for the arguments and `session()` for staying in a room. Create it inside
    the event loop that uses it; use `async with` or `await close()`.
    """

    _service = CHAT_SERVICE

    def _stub(self, channel: grpc.aio.Channel) -> chat_pb2_grpc.ChatServiceAsyncStub:
        return chat_pb2_grpc.ChatServiceStub(channel)

    async def list_messages_page(
        self,
        room: str = DEFAULT_ROOM,
        *,
        after: int = 0,
        before: int = 0,
        page_size: int = DEFAULT_PAGE_SIZE,
        timeout: float | None = None,
    ) -> chat_pb2.ListMessagesResponse:
        """One page of a room's stored messages; see `ChatClient.list_messages_page`."""
        deadline = self._deadline(timeout)
        request = _history_request(room, after, before, page_size)

        async def invoke(channel: grpc.aio.Channel) -> chat_pb2.ListMessagesResponse:
            return await self._stub(channel).ListMessages(request, timeout=deadline)

        return await self._call("ListMessages", deadline, invoke, idempotent=True)

    async def list_messages(
        self,
        room: str = DEFAULT_ROOM,
        *,
        after: int = 0,
        page_size: int = DEFAULT_PAGE_SIZE,
        timeout: float | None = None,
    ) -> AsyncIterator[chat_pb2.ChatMessage]:
        """Every stored message of a room with a sequence above `after`, oldest first."""
        while True:
            page = await self.list_messages_page(
                room, after=after, page_size=page_size, timeout=timeout
            )
            for message in page.messages:
                yield message
            if not page.has_more or not page.messages:
                return
            after = page.messages[-1].sequence

    async def recent_messages(
        self, room: str = DEFAULT_ROOM, count: int = 20, *, timeout: float | None = None
    ) -> list[chat_pb2.ChatMessage]:
        """The last `count` messages of a room, oldest first."""
        messages, _ = await last_messages(self, room, count, timeout)
        return messages

    async def last_sequence(self, room: str = DEFAULT_ROOM, *, timeout: float | None = None) -> int:
        """The highest sequence stored in a room (0 for a room without messages)."""
        page = await self.list_messages_page(room, after=INT64_MAX, page_size=1, timeout=timeout)
        return page.last_sequence

    async def presence(
        self, room: str = DEFAULT_ROOM, *, timeout: float | None = None
    ) -> list[chat_pb2.RoomMember]:
        """Who is connected to a room now, on any replica, by user id."""
        deadline = self._deadline(timeout)
        request = chat_pb2.ListPresenceRequest(room=room)

        async def invoke(channel: grpc.aio.Channel) -> chat_pb2.ListPresenceResponse:
            return await self._stub(channel).ListPresence(request, timeout=deadline)

        return list((await self._call("ListPresence", deadline, invoke, idempotent=True)).members)

    async def post(
        self, room: str, *texts: str, timeout: float | None = None
    ) -> list[chat_pb2.ChatMessage]:
        """Send messages to a room without staying in it; returns them as stored (with their
        sequence numbers), in the order given.

        A short `session()`: it reconnects and resends like one, so each message is stored
        once. Keep to the rate limit (a burst of 40 by default): beyond it the call raises
        `ResourceExhausted`. The whole call has one deadline, and raises `DeadlineExceeded`
        when it passes.
        """
        for text in texts:
            check_text(text)
        if not texts:
            return []
        deadline = self._deadline(timeout)
        policy = ReconnectPolicy(give_up_after=deadline, retry_rate_limited=False)
        try:
            async with asyncio.timeout(deadline):
                async with self.session(room, policy=policy, flush_timeout=0) as session:
                    sent = [await session.send(text) for text in texts]
                    return [await session.wait_stored(client_id) for client_id in sent]
        except TimeoutError:
            raise DeadlineExceeded(
                "the messages were not all acknowledged before the deadline",
                target=self.target,
                method=f"/{CHAT_SERVICE.name}/StreamChat",
                hint=f"raise the timeout (it was {deadline:g}s) or check the server's load",
            ) from None

    # --- Rooms -----------------------------------------------------------------------------

    async def create_room(
        self,
        name: str,
        *,
        title: str = "",
        visibility: Visibility | VisibilityName = Visibility.PUBLIC,
        timeout: float | None = None,
    ) -> chat_pb2.Room:
        """Create a room; see `ChatClient.create_room`."""
        deadline = self._deadline(timeout)
        request = create_request(name, title, visibility)

        async def invoke(channel: grpc.aio.Channel) -> chat_pb2.Room:
            return await self._stub(channel).CreateRoom(request, timeout=deadline)

        return await self._call("CreateRoom", deadline, invoke, idempotent=False)

    async def get_room(self, name: str, *, timeout: float | None = None) -> chat_pb2.Room:
        """A room the caller may read; see `ChatClient.get_room`."""
        deadline = self._deadline(timeout)
        request = chat_pb2.GetRoomRequest(name=name)

        async def invoke(channel: grpc.aio.Channel) -> chat_pb2.Room:
            return await self._stub(channel).GetRoom(request, timeout=deadline)

        return await self._call("GetRoom", deadline, invoke, idempotent=True)

    async def list_rooms_page(
        self,
        *,
        page_size: int = DEFAULT_ROOM_PAGE_SIZE,
        page_token: str = "",
        timeout: float | None = None,
    ) -> RoomPage:
        """One page of the rooms the caller may read; see `ChatClient.list_rooms_page`."""
        deadline = self._deadline(timeout)
        request = rooms_request(page_size, page_token)

        async def invoke(channel: grpc.aio.Channel) -> chat_pb2.ListRoomsResponse:
            return await self._stub(channel).ListRooms(request, timeout=deadline)

        reply = await self._call("ListRooms", deadline, invoke, idempotent=True)
        return RoomPage(tuple(reply.rooms), reply.next_page_token)

    async def list_rooms(
        self, *, page_size: int = DEFAULT_ROOM_PAGE_SIZE, timeout: float | None = None
    ) -> AsyncIterator[chat_pb2.Room]:
        """Every room the caller may read, by name, a page at a time."""
        token = ""
        while True:
            page = await self.list_rooms_page(
                page_size=page_size, page_token=token, timeout=timeout
            )
            for room in page.rooms:
                yield room
            if not page.has_more:
                return
            token = page.next_page_token

    async def update_room(
        self,
        name: str,
        *,
        title: str | None = None,
        visibility: Visibility | VisibilityName | None = None,
        timeout: float | None = None,
    ) -> chat_pb2.Room:
        """Change a room's title and/or visibility; see `ChatClient.update_room`."""
        deadline = self._deadline(timeout)
        request = update_request(name, title, visibility)

        async def invoke(channel: grpc.aio.Channel) -> chat_pb2.Room:
            return await self._stub(channel).UpdateRoom(request, timeout=deadline)

        return await self._call("UpdateRoom", deadline, invoke, idempotent=False)

    async def delete_room(self, name: str, *, timeout: float | None = None) -> None:
        """Delete a room and its messages; see `ChatClient.delete_room`."""
        deadline = self._deadline(timeout)
        request = chat_pb2.DeleteRoomRequest(name=name)

        async def invoke(channel: grpc.aio.Channel) -> chat_pb2.DeleteRoomResponse:
            return await self._stub(channel).DeleteRoom(request, timeout=deadline)

        await self._call("DeleteRoom", deadline, invoke, idempotent=False)

    async def add_member(
        self, room: str, user_id: int, *, timeout: float | None = None
    ) -> chat_pb2.Membership:
        """Make a user a member of a room; see `ChatClient.add_member`."""
        deadline = self._deadline(timeout)
        request = chat_pb2.AddMemberRequest(room=room, user_id=user_id)

        async def invoke(channel: grpc.aio.Channel) -> chat_pb2.AddMemberResponse:
            return await self._stub(channel).AddMember(request, timeout=deadline)

        return (await self._call("AddMember", deadline, invoke, idempotent=False)).member

    async def remove_member(self, room: str, user_id: int, *, timeout: float | None = None) -> None:
        """End a user's membership of a room; see `ChatClient.remove_member`."""
        deadline = self._deadline(timeout)
        request = chat_pb2.RemoveMemberRequest(room=room, user_id=user_id)

        async def invoke(channel: grpc.aio.Channel) -> chat_pb2.RemoveMemberResponse:
            return await self._stub(channel).RemoveMember(request, timeout=deadline)

        await self._call("RemoveMember", deadline, invoke, idempotent=False)

    async def leave_room(self, room: str, *, timeout: float | None = None) -> None:
        """End the caller's own membership of a room (`remove_member` of user 0)."""
        await self.remove_member(room, 0, timeout=timeout)

    async def list_members_page(
        self,
        room: str,
        *,
        page_size: int = DEFAULT_MEMBER_PAGE_SIZE,
        page_token: str = "",
        timeout: float | None = None,
    ) -> MemberPage:
        """One page of a room's members; see `ChatClient.list_members_page`."""
        deadline = self._deadline(timeout)
        request = members_request(room, page_size, page_token)

        async def invoke(channel: grpc.aio.Channel) -> chat_pb2.ListMembersResponse:
            return await self._stub(channel).ListMembers(request, timeout=deadline)

        reply = await self._call("ListMembers", deadline, invoke, idempotent=True)
        return MemberPage(tuple(reply.members), reply.next_page_token)

    async def list_members(
        self,
        room: str,
        *,
        page_size: int = DEFAULT_MEMBER_PAGE_SIZE,
        timeout: float | None = None,
    ) -> AsyncIterator[chat_pb2.Membership]:
        """Every member of a room, by user id, a page at a time."""
        token = ""
        while True:
            page = await self.list_members_page(
                room, page_size=page_size, page_token=token, timeout=timeout
            )
            for member in page.members:
                yield member
            if not page.has_more:
                return
            token = page.next_page_token

    async def open_direct_room(
        self, user_id: int, *, timeout: float | None = None
    ) -> chat_pb2.Room:
        """The private room of the caller and another user; see
        `ChatClient.open_direct_room`."""
        deadline = self._deadline(timeout)
        request = chat_pb2.OpenDirectRoomRequest(user_id=user_id)

        async def invoke(channel: grpc.aio.Channel) -> chat_pb2.Room:
            return await self._stub(channel).OpenDirectRoom(request, timeout=deadline)

        return await self._call("OpenDirectRoom", deadline, invoke, idempotent=False)

    def session(
        self,
        room: str = DEFAULT_ROOM,
        *,
        resume_after: int | None = None,
        history: int = 0,
        policy: ReconnectPolicy | None = None,
        on_state: StateCallback | None = None,
        buffer_size: int = 1024,
        flush_timeout: float = 5.0,
        resume_room_id: int = 0,
        on_gap: GapCallback | None = None,
    ) -> ChatSession:
        """A live session in `room`, joined by `async with` (or `await session.open()`).

        - `history=N` first delivers the room's last N messages, then live ones.
        - `resume_after=S` delivers every message after sequence S that the server still
          keeps, then live ones (use the `last_sequence` of an earlier session to continue
          it). Not together with `history`. With its `room_id` as `resume_room_id`, a room
          deleted and made again under its name meanwhile refuses the point (OUT_OF_RANGE)
          instead of skipping messages.
        - Neither: the messages stored after joining.

        The session reconnects by itself (see `ReconnectPolicy`); `on_state` is called with a
        `ConnectionEvent` at each change of its connection. When the message after the
        session's resume point is no longer kept (the server's history retention deleted it,
        as after a long time away or while the caller read far behind), the session does not
        fail: its iterator reaches one `HistoryGap` in place of the missing messages (given
        to `on_gap` then, and listed in `gaps`), after the last message before them and
        before the first after them, and goes on from the gap's `first_sequence`. That is
        the first message the server still keeps, or, in a room over its count limit, the
        first one the limit keeps (the few before it were about to be deleted); refusals in a
        row with no message between them (a sweep still deleting) make one gap. See
        `ChatSession`.
        """
        return ChatSession(
            self,
            room,
            resume_after=resume_after,
            resume_room_id=resume_room_id,
            history=history,
            policy=policy or ReconnectPolicy(),
            on_state=on_state,
            buffer_size=buffer_size,
            flush_timeout=flush_timeout,
            on_gap=on_gap,
        )

    # --- What its sessions use (`parley.client.session.SessionClient`) ---------------------

    def stream_channel(self) -> tuple[str, grpc.aio.Channel]:
        """The address a new long-lived stream goes to now, and the client's channel to it.

        The channel belongs to the client: `close()` closes it. With several addresses, a
        call that cannot reach this one, or `advance_target()`, moves the client on."""
        return self._targets.current, self._targets.channel()

    def advance_target(self) -> None:
        """Move on to the next of the client's addresses, round the list (with one address,
        nothing changes); the next call or `stream_channel()` uses it."""
        self._targets.advance()
