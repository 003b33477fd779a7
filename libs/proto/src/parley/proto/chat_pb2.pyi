import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ChatMessage(_message.Message):
    __slots__ = ("user", "text", "room", "sequence", "create_time", "user_id", "client_message_id", "room_id")
    USER_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ROOM_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    ROOM_ID_FIELD_NUMBER: _ClassVar[int]
    user: str
    text: str
    room: str
    sequence: int
    create_time: _timestamp_pb2.Timestamp
    user_id: int
    client_message_id: str
    room_id: int
    def __init__(self, user: _Optional[str] = ..., text: _Optional[str] = ..., room: _Optional[str] = ..., sequence: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., user_id: _Optional[int] = ..., client_message_id: _Optional[str] = ..., room_id: _Optional[int] = ...) -> None: ...

class ListMessagesRequest(_message.Message):
    __slots__ = ("room", "after_sequence", "before_sequence", "page_size")
    ROOM_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    BEFORE_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    room: str
    after_sequence: int
    before_sequence: int
    page_size: int
    def __init__(self, room: _Optional[str] = ..., after_sequence: _Optional[int] = ..., before_sequence: _Optional[int] = ..., page_size: _Optional[int] = ...) -> None: ...

class ListMessagesResponse(_message.Message):
    __slots__ = ("messages", "has_more", "last_sequence", "first_sequence")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    HAS_MORE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    has_more: bool
    last_sequence: int
    first_sequence: int
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., has_more: _Optional[bool] = ..., last_sequence: _Optional[int] = ..., first_sequence: _Optional[int] = ...) -> None: ...

class ListPresenceRequest(_message.Message):
    __slots__ = ("room",)
    ROOM_FIELD_NUMBER: _ClassVar[int]
    room: str
    def __init__(self, room: _Optional[str] = ...) -> None: ...

class ListPresenceResponse(_message.Message):
    __slots__ = ("members",)
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    members: _containers.RepeatedCompositeFieldContainer[RoomMember]
    def __init__(self, members: _Optional[_Iterable[_Union[RoomMember, _Mapping]]] = ...) -> None: ...

class RoomMember(_message.Message):
    __slots__ = ("user_id", "user", "stream_count")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    STREAM_COUNT_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    user: str
    stream_count: int
    def __init__(self, user_id: _Optional[int] = ..., user: _Optional[str] = ..., stream_count: _Optional[int] = ...) -> None: ...

class Room(_message.Message):
    __slots__ = ("name", "title", "visibility", "owner_id", "create_time", "member_count", "direct")
    class Visibility(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        VISIBILITY_UNSPECIFIED: _ClassVar[Room.Visibility]
        PUBLIC: _ClassVar[Room.Visibility]
        PRIVATE: _ClassVar[Room.Visibility]
    VISIBILITY_UNSPECIFIED: Room.Visibility
    PUBLIC: Room.Visibility
    PRIVATE: Room.Visibility
    NAME_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    VISIBILITY_FIELD_NUMBER: _ClassVar[int]
    OWNER_ID_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    MEMBER_COUNT_FIELD_NUMBER: _ClassVar[int]
    DIRECT_FIELD_NUMBER: _ClassVar[int]
    name: str
    title: str
    visibility: Room.Visibility
    owner_id: int
    create_time: _timestamp_pb2.Timestamp
    member_count: int
    direct: bool
    def __init__(self, name: _Optional[str] = ..., title: _Optional[str] = ..., visibility: _Optional[_Union[Room.Visibility, str]] = ..., owner_id: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., member_count: _Optional[int] = ..., direct: _Optional[bool] = ...) -> None: ...

class CreateRoomRequest(_message.Message):
    __slots__ = ("name", "title", "visibility")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    VISIBILITY_FIELD_NUMBER: _ClassVar[int]
    name: str
    title: str
    visibility: Room.Visibility
    def __init__(self, name: _Optional[str] = ..., title: _Optional[str] = ..., visibility: _Optional[_Union[Room.Visibility, str]] = ...) -> None: ...

class GetRoomRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListRoomsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListRoomsResponse(_message.Message):
    __slots__ = ("rooms", "next_page_token")
    ROOMS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    rooms: _containers.RepeatedCompositeFieldContainer[Room]
    next_page_token: str
    def __init__(self, rooms: _Optional[_Iterable[_Union[Room, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class UpdateRoomRequest(_message.Message):
    __slots__ = ("name", "title", "visibility")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    VISIBILITY_FIELD_NUMBER: _ClassVar[int]
    name: str
    title: str
    visibility: Room.Visibility
    def __init__(self, name: _Optional[str] = ..., title: _Optional[str] = ..., visibility: _Optional[_Union[Room.Visibility, str]] = ...) -> None: ...

class DeleteRoomRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteRoomResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AddMemberRequest(_message.Message):
    __slots__ = ("room", "user_id")
    ROOM_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    room: str
    user_id: int
    def __init__(self, room: _Optional[str] = ..., user_id: _Optional[int] = ...) -> None: ...

class AddMemberResponse(_message.Message):
    __slots__ = ("member",)
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    member: Membership
    def __init__(self, member: _Optional[_Union[Membership, _Mapping]] = ...) -> None: ...

class RemoveMemberRequest(_message.Message):
    __slots__ = ("room", "user_id")
    ROOM_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    room: str
    user_id: int
    def __init__(self, room: _Optional[str] = ..., user_id: _Optional[int] = ...) -> None: ...

class RemoveMemberResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListMembersRequest(_message.Message):
    __slots__ = ("room", "page_size", "page_token")
    ROOM_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    room: str
    page_size: int
    page_token: str
    def __init__(self, room: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListMembersResponse(_message.Message):
    __slots__ = ("members", "next_page_token")
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    members: _containers.RepeatedCompositeFieldContainer[Membership]
    next_page_token: str
    def __init__(self, members: _Optional[_Iterable[_Union[Membership, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class Membership(_message.Message):
    __slots__ = ("user_id", "join_time", "owner")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    JOIN_TIME_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    join_time: _timestamp_pb2.Timestamp
    owner: bool
    def __init__(self, user_id: _Optional[int] = ..., join_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., owner: _Optional[bool] = ...) -> None: ...

class OpenDirectRoomRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    def __init__(self, user_id: _Optional[int] = ...) -> None: ...
