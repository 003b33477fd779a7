"""Room names and message rules."""

from __future__ import annotations

import re

from parley.chassis import FieldViolation, InvalidArgument

__all__ = [
    "DEFAULT_ROOM",
    "MAX_CLIENT_MESSAGE_ID",
    "MAX_TEXT_BYTES",
    "check_client_message_id",
    "check_room",
    "check_text",
]

DEFAULT_ROOM = "general"
MAX_TEXT_BYTES = 4096
MAX_CLIENT_MESSAGE_ID = 64
_ROOM = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
# C0 and C1 control characters and DEL, except tab and newline: they drive terminals (escape
# sequences, carriage returns that overwrite a line), and Postgres text cannot hold NUL.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def check_room(name: str, field: str = "room") -> str:
    """The room name to use (`general` when empty); INVALID_ARGUMENT when malformed."""
    if not name:
        return DEFAULT_ROOM
    if not _ROOM.fullmatch(name):  # unlike match() with $, no trailing newline slips through
        raise InvalidArgument(
            [
                FieldViolation(
                    field,
                    "must be 1 to 64 characters of a-z, 0-9, '-' and '_', "
                    "starting with a letter or digit",
                )
            ],
            reason="INVALID_ROOM",
        )
    return name


def check_text(text: str) -> None:
    size = len(text.encode())
    if not text.strip():
        raise InvalidArgument([FieldViolation("text", "must not be empty")])
    if size > MAX_TEXT_BYTES:
        raise InvalidArgument(
            [FieldViolation("text", f"must be at most {MAX_TEXT_BYTES} bytes, got {size}")]
        )
    control = _CONTROL.search(text)
    if control is not None:
        raise InvalidArgument(
            [
                FieldViolation(
                    "text",
                    "must not contain control characters other than tab and newline "
                    f"(U+{ord(control.group()):04X} at character {control.start() + 1})",
                )
            ]
        )


def check_client_message_id(value: str) -> None:
    if len(value) > MAX_CLIENT_MESSAGE_ID:
        raise InvalidArgument(
            [
                FieldViolation(
                    "client_message_id", f"must be at most {MAX_CLIENT_MESSAGE_ID} characters"
                )
            ]
        )
    if "\x00" in value:
        raise InvalidArgument(
            [FieldViolation("client_message_id", "must not contain NUL characters")]
        )
