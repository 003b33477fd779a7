"""How results are printed: rich tables and lines for people, JSON Lines for scripts.

JSON output is one object per line (JSON Lines), whatever the command, so that `jq` and
line-by-line readers handle a single user and a stream of messages alike. The keys of each
kind of object are fixed and in a fixed order; timestamps are RFC 3339 / ISO-8601 strings in
UTC (`2025-05-01T12:00:00.123456Z`), or null when unset.

Text that came from a server (messages, user and room names, error messages) can hold
control characters that would drive the reader's terminal: clear it, move the cursor, set
the clipboard (OSC 52). Everything shown to people goes through `printable`, which writes
them as visible escapes, and into rich only as `Text` (never read as markup); JSON keeps
the exact values but writes those characters as `\\uXXXX` escapes.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from datetime import UTC
from typing import Any

from google.protobuf import timestamp_pb2
from rich.console import Console
from rich.table import Table
from rich.text import Text

from parley.proto import chat_pb2, user_pb2

__all__ = [
    "emit_json",
    "json_line",
    "member_json",
    "members_table",
    "membership_json",
    "message_json",
    "message_line",
    "notice",
    "print_table",
    "printable",
    "room_json",
    "rooms_table",
    "safe_text",
    "stderr_console",
    "stdout_console",
    "user_json",
    "users_table",
]


# Shown as escapes: C0 (newline and tab too, since every item is shown on one line of its
# own and a newline could fake another), DEL, C1 (U+009B is CSI in a UTF-8 terminal), lone
# surrogates (which cannot be written as UTF-8), the line and paragraph separators, and the
# bidi embeddings, overrides and isolates, which reorder the rest of the line they are on.
# Other format characters (joiners in emoji and scripts, soft hyphens, bidi marks) are text.
_UNSAFE = [
    *range(0x00, 0x20),
    *range(0x7F, 0xA0),
    *range(0xD800, 0xE000),
    0x2028,
    0x2029,
    *range(0x202A, 0x202F),
    *range(0x2066, 0x206A),
]
_NAMED = {ord("\t"): "\\t", ord("\n"): "\\n", ord("\r"): "\\r"}
_PRINTABLE = {
    code: _NAMED.get(code) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
    for code in _UNSAFE
}
_JSON_SAFE = {code: f"\\u{code:04x}" for code in _UNSAFE}


def printable(text: str) -> str:
    """`text` with its control characters written as escapes, safe to show on a terminal.

    Escapes are Python's: `\\n`, `\\t`, `\\r`, `\\x1b`, `\\x9b`, `\\u202e`. A backslash is left
    as it is, so ordinary text reads unchanged (and a text that spells out `\\x1b` looks like
    one that holds an ESC). Characters outside this set, of any script, pass through.
    """
    return text.translate(_PRINTABLE)


def safe_text(text: str, style: str = "") -> Text:
    """Text from elsewhere as a rich `Text`: escaped by `printable`, never read as markup or
    emoji codes (as a plain `str` handed to rich would be)."""
    return Text(printable(text), style=style)


def json_line(value: Mapping[str, Any]) -> str:
    """One JSON object on one line, with no control character left raw in it.

    `json.dumps` escapes C0 itself but leaves DEL, C1 and the rest of `printable`'s set as
    they are with `ensure_ascii=False`; they can only stand inside strings, where a `\\uXXXX`
    escape means the same value.
    """
    return json.dumps(value, ensure_ascii=False).translate(_JSON_SAFE)


def stdout_console() -> Console:
    """A console on the current sys.stdout (looked up now, so test runners can capture it)."""
    return Console(file=sys.stdout, highlight=False, soft_wrap=False)


def stderr_console() -> Console:
    """A console on the current sys.stderr, for progress bars and notices."""
    return Console(file=sys.stderr, highlight=False, soft_wrap=False)


def timestamp(value: timestamp_pb2.Timestamp, present: bool) -> str | None:
    """RFC 3339 in UTC, or None for a field the server did not set."""
    return value.ToJsonString() if present else None


def _local_time(value: timestamp_pb2.Timestamp, fmt: str) -> str:
    return value.ToDatetime(tzinfo=UTC).astimezone().strftime(fmt)


def user_json(user: user_pb2.User) -> dict[str, Any]:
    """The JSON form of a user."""
    return {
        "id": user.id,
        "name": user.name,
        "email": user.email,
        "age": user.age,
        "create_time": timestamp(user.create_time, user.HasField("create_time")),
        "update_time": timestamp(user.update_time, user.HasField("update_time")),
    }


def message_json(message: chat_pb2.ChatMessage) -> dict[str, Any]:
    """The JSON form of a chat message."""
    return {
        "room": message.room,
        "sequence": message.sequence,
        "user_id": message.user_id,
        "user": message.user,
        "text": message.text,
        "create_time": timestamp(message.create_time, message.HasField("create_time")),
        "client_message_id": message.client_message_id,
        "room_id": message.room_id,
    }


def member_json(member: chat_pb2.RoomMember) -> dict[str, Any]:
    """The JSON form of a room member (presence)."""
    return {"user_id": member.user_id, "user": member.user, "stream_count": member.stream_count}


def visibility_name(room: chat_pb2.Room) -> str:
    """`public` or `private`."""
    return "private" if room.visibility == chat_pb2.Room.PRIVATE else "public"


def room_json(room: chat_pb2.Room) -> dict[str, Any]:
    """The JSON form of a room."""
    return {
        "name": room.name,
        "title": room.title,
        "visibility": visibility_name(room),
        "owner_id": room.owner_id,
        "member_count": room.member_count,
        "direct": room.direct,
        "create_time": timestamp(room.create_time, room.HasField("create_time")),
    }


def membership_json(member: chat_pb2.Membership, room: str) -> dict[str, Any]:
    """The JSON form of a room membership."""
    return {
        "room": room,
        "user_id": member.user_id,
        "owner": member.owner,
        "join_time": timestamp(member.join_time, member.HasField("join_time")),
    }


def emit_json(value: Mapping[str, Any]) -> None:
    """Print one JSON object on its own line, flushed at once (streams are read live)."""
    sys.stdout.write(json_line(value) + "\n")
    sys.stdout.flush()


def users_table(users: Iterable[user_pb2.User], title: str | None = None) -> Table:
    """Users as a table: id, name, email, age, creation time (local)."""
    table = Table(title=title, title_justify="left")
    table.add_column("ID", justify="right", no_wrap=True)
    table.add_column("Name", overflow="fold")
    table.add_column("Email", overflow="fold")
    table.add_column("Age", justify="right", no_wrap=True)
    table.add_column("Created", no_wrap=True)
    for user in users:
        created = (
            _local_time(user.create_time, "%Y-%m-%d %H:%M:%S")
            if user.HasField("create_time")
            else ""
        )
        table.add_row(
            str(user.id), safe_text(user.name), safe_text(user.email), str(user.age), created
        )
    return table


def rooms_table(rooms: Iterable[chat_pb2.Room], title: str | None = None) -> Table:
    """Rooms as a table: name, title, visibility, owner, members, creation time (local).

    Names and titles go through `printable`: a title is anybody's text."""
    table = Table(title=title, title_justify="left")
    table.add_column("Name", no_wrap=True)
    table.add_column("Title", overflow="fold")
    table.add_column("Visibility", no_wrap=True)
    table.add_column("Owner", justify="right", no_wrap=True)
    table.add_column("Members", justify="right", no_wrap=True)
    table.add_column("Created", no_wrap=True)
    for room in rooms:
        created = (
            _local_time(room.create_time, "%Y-%m-%d %H:%M:%S")
            if room.HasField("create_time")
            else ""
        )
        kind = visibility_name(room) + (" (direct)" if room.direct else "")
        owner = str(room.owner_id) if room.owner_id else ""
        table.add_row(
            safe_text(room.name), safe_text(room.title), kind, owner, str(room.member_count),
            created,
        )  # fmt: skip
    return table


def members_table(members: Iterable[chat_pb2.Membership], title: Text | None = None) -> Table:
    """Room members as a table: user id, owner or member, when they joined (local)."""
    table = Table(title=title, title_justify="left")
    table.add_column("User ID", justify="right", no_wrap=True)
    table.add_column("Role", no_wrap=True)
    table.add_column("Joined", no_wrap=True)
    for member in members:
        joined = (
            _local_time(member.join_time, "%Y-%m-%d %H:%M:%S")
            if member.HasField("join_time")
            else ""
        )
        table.add_row(str(member.user_id), "owner" if member.owner else "member", joined)
    return table


def print_table(table: Table) -> None:
    stdout_console().print(table)


def message_parts(message: chat_pb2.ChatMessage) -> list[tuple[str, str]]:
    """A message as (style, text) parts: `#12 10:04:05 Ada: hello`, escaped by `printable`.

    Shared by the rich output of `chat tail`/`history`/`send` and the interactive chat, which
    maps the styles onto its own.
    """
    when = _local_time(message.create_time, "%H:%M:%S") if message.HasField("create_time") else ""
    return [
        ("seq", f"#{message.sequence} "),
        ("time", f"{when} " if when else ""),
        ("user", printable(message.user) or f"user {message.user_id}"),
        ("text", f": {printable(message.text)}"),
    ]


_RICH_STYLES = {"seq": "dim", "time": "dim", "user": "bold", "text": ""}


def message_line(message: chat_pb2.ChatMessage) -> Text:
    """A message as one rich line; its text is never read as markup."""
    line = Text()
    for style, text in message_parts(message):
        line.append(text, style=_RICH_STYLES[style])
    return line


def notice(text: str) -> None:
    """A dim one-line notice on stderr (reconnects and the like)."""
    stderr_console().print(safe_text(f"parley: {text}", style="dim"))
