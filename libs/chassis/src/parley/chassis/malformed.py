"""Request bytes that do not parse become INVALID_ARGUMENT, not grpcio's INTERNAL or UNKNOWN.

grpcio deserializes a request before any handler or interceptor code runs, and answers a
deserializer's exception on its own. So the chassis registers a tolerant deserializer that
hands an unparseable request on as a `MalformedRequest`; the outermost interceptor turns it
into INVALID_ARGUMENT naming the field that broke (an invalid UTF-8 string, usually).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf import empty_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError
from google.protobuf.unknown_fields import UnknownFieldSet

from parley.chassis.errors import FieldViolation, InvalidArgument, LimitExceeded, ServiceError

__all__ = ["MESSAGE_BYTES", "MalformedRequest", "tolerant"]

# The `limit` label of a request refused for its size.
MESSAGE_BYTES = "message_bytes"

# protobuf's wire type of length-delimited fields (strings, bytes, messages, packed lists).
_LENGTH_DELIMITED = 2


class MalformedRequest:
    """Stands in for a request whose bytes did not parse as `descriptor`'s message, or that
    is larger than `max_bytes`."""

    __slots__ = ("data", "descriptor", "max_bytes")

    def __init__(self, descriptor: Descriptor | None, data: bytes, max_bytes: int = 0) -> None:
        self.descriptor = descriptor
        self.data = data
        self.max_bytes = max_bytes

    def error(self) -> ServiceError:
        if self.max_bytes and len(self.data) > self.max_bytes:
            return LimitExceeded(
                MESSAGE_BYTES,
                "PARLEY_MAX_MESSAGE_BYTES",
                self.max_bytes,
                f"the request message is {len(self.data)} bytes, more than this server accepts",
            )
        if self.descriptor is None:
            return InvalidArgument([FieldViolation("request", "is not a valid request message")])
        name = self.descriptor.full_name
        path = _bad_utf8_field(self.descriptor, self.data, "")
        if path is not None:
            return InvalidArgument(
                [FieldViolation(path, "is not valid UTF-8 (string fields must be)")],
                reason="MALFORMED_REQUEST",
            )
        return InvalidArgument(
            [FieldViolation("request", f"is not a valid {name} (the bytes do not parse)")],
            reason="MALFORMED_REQUEST",
        )


def tolerant(
    deserialize: Callable[[bytes], Any] | None, max_bytes: int = 0
) -> Callable[[bytes], Any] | None:
    """`deserialize`, returning a MalformedRequest instead of raising on bad bytes, or on
    more than `max_bytes` (0: no limit) without parsing them."""
    if deserialize is None:
        return None
    message_class = getattr(deserialize, "__self__", None)
    descriptor: Descriptor | None = getattr(message_class, "DESCRIPTOR", None)

    def parse(data: bytes) -> Any:
        if max_bytes and len(data) > max_bytes:
            return MalformedRequest(descriptor, data, max_bytes)
        try:
            return deserialize(data)
        except (DecodeError, ValueError, TypeError, RecursionError):
            return MalformedRequest(descriptor, data)

    return parse


def _bad_utf8_field(descriptor: Descriptor, data: bytes, prefix: str) -> str | None:
    """The path of the first string field (nested messages too) whose bytes are not UTF-8."""
    try:
        fields = _length_delimited_fields(data)
    except ValueError:
        return None
    for number, value in fields:
        field = descriptor.fields_by_number.get(number)
        if field is None:
            continue
        path = f"{prefix}{field.name}"
        if field.type == FieldDescriptor.TYPE_STRING:
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                return path
        elif field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type is not None:
            found = _bad_utf8_field(field.message_type, value, f"{path}.")
            if found is not None:
                return found
    return None


def _length_delimited_fields(data: bytes) -> list[tuple[int, bytes]]:
    """(field number, bytes) of each length-delimited field at the top level of `data`.

    Parsed as an Empty message, every field is kept as an unknown field, bytes unchecked.
    """
    holder = empty_pb2.Empty()
    try:
        holder.ParseFromString(data)
    except DecodeError:
        raise ValueError("not protobuf wire format") from None
    unknown = UnknownFieldSet(holder)
    fields = (unknown[index] for index in range(len(unknown)))
    return [
        (field.field_number, field.data)
        for field in fields
        if field.wire_type == _LENGTH_DELIMITED and isinstance(field.data, bytes)
    ]
