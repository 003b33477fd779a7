"""Room names and message rules."""

from __future__ import annotations

import re

from parley.chassis import FieldViolation, InvalidArgument
from parley.proto.contract import (
    DEFAULT_ROOM,
    MAX_CLIENT_MESSAGE_ID,
    MAX_TEXT_BYTES,
    MAX_TITLE_CHARS,
)

__all__ = [
    "DEFAULT_ROOM",
    "MAX_TITLE_CHARS",
    "MAX_CLIENT_MESSAGE_ID",
    "MAX_TEXT_BYTES",
    "check_client_message_id",
    "check_room",
    "check_text",
    "check_title",
]

_ROOM = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
# C0 and C1 control characters and DEL, except tab and newline: they drive terminals (escape
# sequences, carriage returns that overwrite a line), and Postgres text cannot hold NUL.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# A title is one line: tab and newline are refused too.
_ANY_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def check_room(name: str, field: str = "room", default: str | None = DEFAULT_ROOM) -> str:
    """The room name to use (`default` when empty); INVALID_ARGUMENT when malformed, or
    empty without a default."""
    if not name:
        if default is None:
            raise InvalidArgument(
                [FieldViolation(field, "must name a room")], reason="INVALID_ROOM"
            )
        return default
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
    _refuse_control(_CONTROL, text, "text", "control characters other than tab and newline")


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


def check_title(title: str) -> str:
    """A room title: at most MAX_TITLE_CHARS characters, no control characters at all."""
    if len(title) > MAX_TITLE_CHARS:
        raise InvalidArgument(
            [FieldViolation("title", f"must be at most {MAX_TITLE_CHARS} characters")]
        )
    _refuse_control(_ANY_CONTROL, title, "title", "control characters")
    return title


def _refuse_control(pattern: re.Pattern[str], value: str, field: str, what: str) -> None:
    """INVALID_ARGUMENT naming the first character of `value` that `pattern` refuses."""
    control = pattern.search(value)
    if control is not None:
        raise InvalidArgument(
            [
                FieldViolation(
                    field,
                    f"must not contain {what} "
                    f"(U+{ord(control.group()):04X} at character {control.start() + 1})",
                )
            ]
        )
