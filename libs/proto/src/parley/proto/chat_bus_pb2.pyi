from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class RoomHint(_message.Message):
    __slots__ = ("room", "sequence", "traceparent")
    ROOM_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    room: str
    sequence: int
    traceparent: str
    def __init__(self, room: _Optional[str] = ..., sequence: _Optional[int] = ..., traceparent: _Optional[str] = ...) -> None: ...
