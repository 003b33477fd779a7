"""The room RPCs of ChatService: rooms, their owners and members, and direct rooms.

Who may do what (the README's scope table says the same):
- read a room (GetRoom, ListMembers, and ListMessages, ListPresence and StreamChat in the
  servicer): anyone in a public room, a member in a private one. Anyone else gets
  PERMISSION_DENIED, the same answer as for a room that does not exist;
- change or delete a room: its owner;
- add members: its owner, or a caller with the `chat:admin` scope;
- remove members: its owner or a `chat:admin` caller, and a member themselves (leaving);
- direct rooms: private, exactly their two users, no owner; nobody changes their members.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from psycopg import errors as pg_errors

from parley.chassis import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    current_identity,
)
from parley.chassis.errors import LimitExceeded
from parley.proto import chat_pb2

from .hub import denied
from .room_store import DIRECT_PREFIX, Access, MemberRow, RoomRow, RoomStore
from .rooms import check_room, check_title

__all__ = ["ADMIN_SCOPE", "MEMBERS_PER_ROOM", "ROOMS_PER_USER", "RoomRpcs"]

ADMIN_SCOPE = "chat:admin"
# The `limit` label of each refusal (parley_limit_refusals_total).
ROOMS_PER_USER = "chat_rooms_per_user"
MEMBERS_PER_ROOM = "chat_members_per_room"
DEFAULT_ROOM_PAGE, MAX_ROOM_PAGE = 50, 500
DEFAULT_MEMBER_PAGE, MAX_MEMBER_PAGE = 100, 1000

Context = grpc.aio.ServicerContext[Any, Any]
# `await caller(context)`: the caller's user id, once UserService has confirmed the user exists.
Caller = Callable[[Context], Awaitable[int]]
# `await user_exists(user_id, context)`: raises NOT_FOUND unless UserService has the user.
UserExists = Callable[[int, Context], Awaitable[None]]
# `await announce(room)`: tells every replica (this one too) to check the room's streams.
Announce = Callable[[str], Awaitable[None]]


def room_message(row: RoomRow) -> chat_pb2.Room:
    room = chat_pb2.Room(
        name=row.name,
        title=row.title,
        visibility=chat_pb2.Room.PRIVATE if row.private else chat_pb2.Room.PUBLIC,
        owner_id=row.owner_id,
        member_count=row.member_count,
        direct=row.direct,
    )
    room.create_time.FromDatetime(row.create_time)
    return room


def _membership(row: MemberRow) -> chat_pb2.Membership:
    member = chat_pb2.Membership(user_id=row.user_id, owner=row.owner)
    member.join_time.FromDatetime(row.join_time)
    return member


def _page_size(value: int, default: int, maximum: int) -> int:
    if value < 0:
        raise InvalidArgument([FieldViolation("page_size", "must not be negative")])
    return default if value == 0 else min(value, maximum)


def _token(value: str, field: str = "page_token") -> bytes:
    try:
        return base64.urlsafe_b64decode(value.encode("ascii"))
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise InvalidArgument([FieldViolation(field, "is not a page token of this call")]) from None


def _room_after(token: str) -> str:
    """The last room name of the previous page, from its token."""
    if not token:
        return ""
    name = _token(token).decode("ascii", "replace")
    check_room(name, field="page_token")
    return name


def _member_after(token: str) -> int:
    if not token:
        return 0
    text = _token(token).decode("ascii", "replace")
    if not text.isdigit() or len(text) > 10:
        raise InvalidArgument([FieldViolation("page_token", "is not a page token of this call")])
    return int(text)


def _next_token(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode()


class RoomRpcs:
    def __init__(
        self,
        rooms: RoomStore,
        caller: Caller,
        user_exists: UserExists,
        announce: Announce,
        *,
        max_rooms_per_user: int,
        max_members: int,
    ) -> None:
        self._rooms = rooms
        self._caller = caller
        self._user_exists = user_exists
        self._announce = announce
        self._max_rooms = max_rooms_per_user
        self._max_members = max_members

    async def _readable(self, name: str, user_id: int) -> Access:
        access = await self._rooms.access(name, user_id, create=False)
        if not access.readable:
            raise denied(name)
        return access

    async def CreateRoom(
        self, request: chat_pb2.CreateRoomRequest, context: Context
    ) -> chat_pb2.Room:
        name = check_room(request.name, field="name", default=None)
        if name.startswith(DIRECT_PREFIX):
            raise InvalidArgument(
                [FieldViolation("name", f"names starting with {DIRECT_PREFIX!r} are direct rooms'")]
            )
        title = check_title(request.title)
        owner = await self._caller(context)
        try:
            row = await self._rooms.create(
                name, title, request.visibility == chat_pb2.Room.PRIVATE, owner
            )
        except pg_errors.UniqueViolation:
            raise AlreadyExists(f"room {name!r} already exists") from None
        if row is None:
            raise self.too_many_rooms()
        return room_message(row)

    def too_many_rooms(self) -> LimitExceeded:
        return LimitExceeded(
            ROOMS_PER_USER,
            "PARLEY_CHAT_MAX_ROOMS_PER_USER",
            self._max_rooms,
            f"this user has made {self._max_rooms} rooms (with CreateRoom, on first use or as "
            "direct rooms); delete one first",
        )

    async def GetRoom(self, request: chat_pb2.GetRoomRequest, context: Context) -> chat_pb2.Room:
        name = check_room(request.name, field="name", default=None)
        user_id = await self._caller(context)
        await self._readable(name, user_id)
        row = await self._rooms.get(name)
        if row is None:  # deleted since
            raise denied(name)
        return room_message(row)

    async def ListRooms(
        self, request: chat_pb2.ListRoomsRequest, context: Context
    ) -> chat_pb2.ListRoomsResponse:
        size = _page_size(request.page_size, DEFAULT_ROOM_PAGE, MAX_ROOM_PAGE)
        after = _room_after(request.page_token)
        user_id = await self._caller(context)
        rows = await self._rooms.visible(user_id, after, size + 1)
        reply = chat_pb2.ListRoomsResponse(rooms=[room_message(row) for row in rows[:size]])
        if len(rows) > size:
            reply.next_page_token = _next_token(rows[size - 1].name)
        return reply

    async def _owned(self, name: str, user_id: int, action: str) -> Access:
        access = await self._readable(name, user_id)
        if access.owner_id != user_id:
            raise PermissionDenied(
                f"only the owner of room {name!r} may {action} it", reason="NOT_ROOM_OWNER"
            )
        return access

    async def UpdateRoom(
        self, request: chat_pb2.UpdateRoomRequest, context: Context
    ) -> chat_pb2.Room:
        name = check_room(request.name, field="name", default=None)
        title = check_title(request.title) if request.HasField("title") else None
        private = (
            None
            if request.visibility == chat_pb2.Room.VISIBILITY_UNSPECIFIED
            else request.visibility == chat_pb2.Room.PRIVATE
        )
        user_id = await self._caller(context)
        await self._owned(name, user_id, "change")
        row = await self._rooms.update(name, user_id, title=title, private=private)
        if row is None:  # deleted since
            raise denied(name)
        if private:
            # Announced whenever asked for, not only when this call saw it public: a
            # concurrent change may have made it public in between.
            await self._announce(name)
        return room_message(row)

    async def DeleteRoom(
        self, request: chat_pb2.DeleteRoomRequest, context: Context
    ) -> chat_pb2.DeleteRoomResponse:
        name = check_room(request.name, field="name", default=None)
        user_id = await self._caller(context)
        access = await self._rooms.access(name, user_id, create=False)
        ownerless = access.exists and access.owner_id == 0 and not access.direct
        if ownerless and ADMIN_SCOPE in current_identity().scopes:
            owner = 0  # a room made on first use: a chat:admin may delete it
        else:
            await self._owned(name, user_id, "delete")
            owner = user_id
        if not await self._rooms.delete(name, owner):
            raise denied(name)
        await self._announce(name)
        return chat_pb2.DeleteRoomResponse()

    async def _manageable(self, name: str, user_id: int, *, leaving: bool) -> Access:
        """The room, if the caller may change its members (see the module's docstring)."""
        admin = ADMIN_SCOPE in current_identity().scopes
        access = await self._rooms.access(name, user_id, create=False)
        if not access.exists:
            if admin:
                raise NotFound(f"room {name!r} does not exist")
            raise denied(name)
        if not (admin or access.owner_id == user_id or (leaving and access.readable)):
            if not access.readable:
                raise denied(name)
            raise PermissionDenied(
                f"only the owner of room {name!r} or a caller with the {ADMIN_SCOPE!r} scope "
                "may change its members",
                reason="NOT_ROOM_OWNER",
                metadata={"scope": ADMIN_SCOPE},
            )
        if access.direct:
            raise FailedPrecondition(
                f"room {name!r} is a direct room: its two members never change",
                reason="DIRECT_ROOM",
            )
        return access

    async def AddMember(
        self, request: chat_pb2.AddMemberRequest, context: Context
    ) -> chat_pb2.AddMemberResponse:
        name = check_room(request.room, field="room", default=None)
        if request.user_id <= 0:
            raise InvalidArgument([FieldViolation("user_id", "must be a positive user id")])
        user_id = await self._caller(context)
        await self._manageable(name, user_id, leaving=False)
        await self._user_exists(request.user_id, context)
        try:
            added = await self._rooms.add_member(
                name, request.user_id, max_members=self._max_members
            )
        except LookupError:
            raise denied(name) from None
        if added is None:
            raise LimitExceeded(
                MEMBERS_PER_ROOM,
                "PARLEY_CHAT_MAX_MEMBERS",
                self._max_members,
                f"room {name!r} already has {self._max_members} members",
            )
        return chat_pb2.AddMemberResponse(member=_membership(added[0]))

    async def RemoveMember(
        self, request: chat_pb2.RemoveMemberRequest, context: Context
    ) -> chat_pb2.RemoveMemberResponse:
        name = check_room(request.room, field="room", default=None)
        if request.user_id < 0:
            raise InvalidArgument([FieldViolation("user_id", "must be a user id, or 0 for you")])
        user_id = await self._caller(context)
        target = request.user_id or user_id
        access = await self._manageable(name, user_id, leaving=target == user_id)
        if target == access.owner_id:
            raise FailedPrecondition(
                f"the owner of room {name!r} cannot leave it; delete the room instead",
                reason="ROOM_OWNER",
            )
        if await self._rooms.remove_member(name, target):
            await self._announce(name)
        return chat_pb2.RemoveMemberResponse()

    async def ListMembers(
        self, request: chat_pb2.ListMembersRequest, context: Context
    ) -> chat_pb2.ListMembersResponse:
        name = check_room(request.room, field="room")
        size = _page_size(request.page_size, DEFAULT_MEMBER_PAGE, MAX_MEMBER_PAGE)
        after = _member_after(request.page_token)
        user_id = await self._caller(context)
        await self._readable(name, user_id)
        rows = await self._rooms.members(name, after, size + 1)
        reply = chat_pb2.ListMembersResponse(members=[_membership(row) for row in rows[:size]])
        if len(rows) > size:
            reply.next_page_token = _next_token(str(rows[size - 1].user_id))
        return reply

    async def OpenDirectRoom(
        self, request: chat_pb2.OpenDirectRoomRequest, context: Context
    ) -> chat_pb2.Room:
        if request.user_id <= 0:
            raise InvalidArgument([FieldViolation("user_id", "must be a positive user id")])
        user_id = await self._caller(context)
        if request.user_id == user_id:
            raise InvalidArgument([FieldViolation("user_id", "must be another user than you")])
        await self._user_exists(request.user_id, context)
        try:
            row = await self._rooms.open_direct(user_id, request.user_id)
        except LookupError as error:
            raise FailedPrecondition(
                f"room {error.args[0]!r} exists and is not a direct room",
                reason="DIRECT_ROOM_NAME_TAKEN",
            ) from None
        if row is None:
            raise self.too_many_rooms()
        return room_message(row)

    def handlers(self) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
        def unary(method: Any, request: Any, reply: Any) -> grpc.RpcMethodHandler[Any, Any]:
            return grpc.unary_unary_rpc_method_handler(
                method,
                request_deserializer=request.FromString,
                response_serializer=reply.SerializeToString,
            )

        return {
            "CreateRoom": unary(self.CreateRoom, chat_pb2.CreateRoomRequest, chat_pb2.Room),
            "GetRoom": unary(self.GetRoom, chat_pb2.GetRoomRequest, chat_pb2.Room),
            "ListRooms": unary(
                self.ListRooms, chat_pb2.ListRoomsRequest, chat_pb2.ListRoomsResponse
            ),
            "UpdateRoom": unary(self.UpdateRoom, chat_pb2.UpdateRoomRequest, chat_pb2.Room),
            "DeleteRoom": unary(
                self.DeleteRoom, chat_pb2.DeleteRoomRequest, chat_pb2.DeleteRoomResponse
            ),
            "AddMember": unary(
                self.AddMember, chat_pb2.AddMemberRequest, chat_pb2.AddMemberResponse
            ),
            "RemoveMember": unary(
                self.RemoveMember, chat_pb2.RemoveMemberRequest, chat_pb2.RemoveMemberResponse
            ),
            "ListMembers": unary(
                self.ListMembers, chat_pb2.ListMembersRequest, chat_pb2.ListMembersResponse
            ),
            "OpenDirectRoom": unary(
                self.OpenDirectRoom, chat_pb2.OpenDirectRoomRequest, chat_pb2.Room
            ),
        }
