"""Room types of the chat clients: `Visibility`, and the pages of `list_rooms_page` and
`list_members_page`.

    with ChatClient(token=token) as chat:
        chat.create_room("team", title="The team", visibility="private")
        chat.add_member("team", 42)
        for room in chat.list_rooms():                 # every page, no tokens to handle
            print(room.name, Visibility.of(room).value)
        dm = chat.open_direct_room(42)                 # the same room for the same two users

Rooms and memberships are the generated messages (`parley.proto.chat_pb2.Room`,
`chat_pb2.Membership`), as users are `user_pb2.User`; `Visibility` reads and writes the
proto's `Room.Visibility` numbers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal, TypeAlias

from parley.proto import chat_pb2

__all__ = [
    "DEFAULT_MEMBER_PAGE_SIZE",
    "DEFAULT_ROOM_PAGE_SIZE",
    "MAX_MEMBER_PAGE_SIZE",
    "MAX_ROOM_PAGE_SIZE",
    "MemberPage",
    "RoomPage",
    "Visibility",
    "VisibilityName",
]

DEFAULT_ROOM_PAGE_SIZE = 100
MAX_ROOM_PAGE_SIZE = 500
DEFAULT_MEMBER_PAGE_SIZE = 100
MAX_MEMBER_PAGE_SIZE = 1000

VisibilityName: TypeAlias = Literal["public", "private"]
"""A visibility spelled as a string, accepted wherever a `Visibility` is."""


class Visibility(enum.Enum):
    """Who may read a room and stream in it."""

    PUBLIC = "public"
    """Any user."""
    PRIVATE = "private"
    """Only the room's members."""

    @classmethod
    def parse(cls, value: Visibility | VisibilityName) -> Visibility:
        """`value` as a Visibility; ValueError for a string other than public or private."""
        if isinstance(value, Visibility):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise ValueError(f"visibility must be 'public' or 'private', got {value!r}") from None

    @classmethod
    def of(cls, room: chat_pb2.Room) -> Visibility:
        """The visibility of a room as the server returned it."""
        return cls.PRIVATE if room.visibility == chat_pb2.Room.PRIVATE else cls.PUBLIC

    def to_proto(self) -> chat_pb2.Room.Visibility:
        """The `chat.Room.Visibility` number."""
        return chat_pb2.Room.PRIVATE if self is Visibility.PRIVATE else chat_pb2.Room.PUBLIC


@dataclass(frozen=True)
class RoomPage:
    """One page of `list_rooms_page`: the rooms, and the token of the next page."""

    rooms: tuple[chat_pb2.Room, ...]
    """The rooms of the page, by name."""
    next_page_token: str
    """Pass it as `page_token` for the next page; empty after the last page."""

    @property
    def has_more(self) -> bool:
        """True when another page follows."""
        return bool(self.next_page_token)


@dataclass(frozen=True)
class MemberPage:
    """One page of `list_members_page`: the memberships, and the token of the next page."""

    members: tuple[chat_pb2.Membership, ...]
    """The members of the page, by user id."""
    next_page_token: str
    """Pass it as `page_token` for the next page; empty after the last page."""

    @property
    def has_more(self) -> bool:
        """True when another page follows."""
        return bool(self.next_page_token)


def check_page_size(page_size: int, maximum: int) -> None:
    if not 1 <= page_size <= maximum:
        raise ValueError(f"page_size must be 1 to {maximum}, got {page_size}")


def create_request(
    name: str, title: str, visibility: Visibility | VisibilityName
) -> chat_pb2.CreateRoomRequest:
    return chat_pb2.CreateRoomRequest(
        name=name, title=title, visibility=Visibility.parse(visibility).to_proto()
    )


def update_request(
    name: str, title: str | None, visibility: Visibility | VisibilityName | None
) -> chat_pb2.UpdateRoomRequest:
    if title is None and visibility is None:
        raise ValueError("update_room needs a title or a visibility")
    request = chat_pb2.UpdateRoomRequest(name=name)
    if title is not None:
        request.title = title  # presence is sent: an empty title clears it
    if visibility is not None:
        request.visibility = Visibility.parse(visibility).to_proto()
    return request


def rooms_request(page_size: int, page_token: str) -> chat_pb2.ListRoomsRequest:
    check_page_size(page_size, MAX_ROOM_PAGE_SIZE)
    return chat_pb2.ListRoomsRequest(page_size=page_size, page_token=page_token)


def members_request(room: str, page_size: int, page_token: str) -> chat_pb2.ListMembersRequest:
    check_page_size(page_size, MAX_MEMBER_PAGE_SIZE)
    return chat_pb2.ListMembersRequest(room=room, page_size=page_size, page_token=page_token)
