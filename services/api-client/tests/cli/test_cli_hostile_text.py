"""Text from the servers that would drive the reader's terminal (ESC and C1 sequences, OSC 52,
carriage returns, backspaces, bidi overrides, rich markup) is shown as visible escapes by every
command, in real pseudo-terminals against the real stack.

The hostile messages and user name are written straight into the stack's Postgres, as data
stored before the servers refused such text: that is what a reader must survive either way.
"""

from __future__ import annotations

import base64
import json
import re
import unicodedata
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

from parley.client import ChatClient

if TYPE_CHECKING:
    from conftest import Person, RunningStack

    from parley.testing.cli import Ran, Terminal

Start = Callable[..., "Terminal"]
Run = Callable[..., "Ran"]

# Each stored text, and how a reader must see it.
HOSTILE = {
    "clear\x1b[2J": r"clear\x1b[2J",
    "clip\x1b]52;c;aGVsbG8=\x07": r"clip\x1b]52;c;aGVsbG8=\x07",
    "c1 \x9b31mred": r"c1 \x9b31mred",
    "over\rwrite": r"over\rwrite",
    "back\x08x": r"back\x08x",
    "two\n#99 00:00:00 Bob: lines": r"two\n#99 00:00:00 Bob: lines",
    "rlo \u202eexe.txt": r"rlo \u202eexe.txt",
    "[bold red]markup[/] [/oops] :smile:": "[bold red]markup[/] [/oops] :smile:",
}
NAME = "Mallory\x1b]52;c;aGVsbG8=\x07\x9b2J"
SHOWN_NAME = r"Mallory\x1b]52;c;aGVsbG8=\x07\x9b2J"

_BIDI = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_SGR = re.compile(rb"\x1b\[[0-9;]*m")


def unsafe(text: str) -> list[str]:
    """The characters of `text` that drive a terminal: C0, DEL, C1, bidi controls."""
    return [ch for ch in text if unicodedata.category(ch) == "Cc" or ch in _BIDI]


def stray_controls(data: bytes) -> list[str]:
    """What drives the terminal in output that rich wrote: anything but its colours (SGR)
    and the line ends of the tty (which turns each \\n into \\r\\n)."""
    text = _SGR.sub(b"", data).replace(b"\r\n", b"\n").decode("utf-8")
    return [ch for ch in unsafe(text) if ch != "\n"]


@dataclass(frozen=True)
class HostileRoom:
    """A room whose stored messages are HOSTILE, sent by a user called NAME."""

    name: str
    user_id: int
    token: str


@pytest.fixture
def database(stack: RunningStack) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
    """A connection to the stack's database, to plant rows as an older server stored them."""
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def hostile_room(
    stack: RunningStack, database: psycopg.Connection[tuple[Any, ...]]
) -> Iterator[HostileRoom]:
    """A user called NAME and a room of HOSTILE messages from them, removed afterwards."""
    room = f"room-{uuid.uuid4().hex[:12]}"
    row = database.execute(
        "INSERT INTO users (name, email, age) VALUES (%s, %s, 30) RETURNING id",
        (NAME, f"mallory-{uuid.uuid4().hex[:12]}@example.com"),
    ).fetchone()
    assert row is not None
    user_id = int(row[0])
    database.execute(
        "INSERT INTO chat_rooms (name, last_sequence) VALUES (%s, %s)", (room, len(HOSTILE))
    )
    for sequence, text in enumerate(HOSTILE, start=1):
        database.execute(
            "INSERT INTO chat_messages (room, sequence, user_id, user_name, text)"
            " VALUES (%s, %s, %s, %s, %s)",
            (room, sequence, user_id, NAME, text),
        )
    try:
        yield HostileRoom(room, user_id, stack.token(str(user_id)))
    finally:
        database.execute("DELETE FROM chat_messages WHERE room = %s", (room,))
        database.execute("DELETE FROM chat_rooms WHERE name = %s", (room,))
        database.execute("DELETE FROM users WHERE id = %s", (user_id,))


def line_of(sequence: int, text: str) -> str:
    """A chat line as `tail` and the interactive chat print it, escaped."""
    return rf"#{sequence} \d\d:\d\d:\d\d {re.escape(SHOWN_NAME)}: {re.escape(text)}"


def test_tail_shows_escapes(terminal: Start, hostile_room: HostileRoom) -> None:
    tail = terminal("chat", "tail", "--room", hostile_room.name, "--after", "0",
                    "--count", str(len(HOSTILE)), token=hostile_room.token)  # fmt: skip
    for sequence, shown in enumerate(HOSTILE.values(), start=1):
        tail.expect(line_of(sequence, shown))
    assert tail.wait_exit() == 0, tail.text
    assert stray_controls(tail.data) == []
    assert "#99" not in tail.text.replace(r"\n#99", ""), "a newline faked a line"


def test_what_the_server_accepts_is_escaped_too(
    terminal: Start, stack: RunningStack, person: Callable[[str], Person], room: str
) -> None:
    """Newlines, tabs and bidi controls still pass the chat server's rules."""
    texts = {
        "two\n#99 00:00:00 Bob: lines": r"two\n#99 00:00:00 Bob: lines",
        "tab\there": r"tab\there",
        "rlo \u202eexe.txt": r"rlo \u202eexe.txt",
    }
    ada = person("Ada")
    with ChatClient(stack.chat, token=ada.token) as chat:
        chat.post(room, *texts)
    tail = terminal("chat", "tail", "--room", room, "--after", "0", "--count", str(len(texts)),
                    token=ada.token)  # fmt: skip
    for sequence, shown in enumerate(texts.values(), start=1):
        tail.expect(rf"#{sequence} \d\d:\d\d:\d\d Ada: {re.escape(shown)}")
    assert tail.wait_exit() == 0, tail.text
    assert stray_controls(tail.data) == []


def test_history_shows_escapes(terminal: Start, hostile_room: HostileRoom) -> None:
    history = terminal("chat", "history", "--room", hostile_room.name, token=hostile_room.token)
    assert history.wait_exit() == 0, history.text
    assert stray_controls(history.data) == []
    cells = [[cell.strip() for cell in row.split("│")[1:-1]] for row in history.text.splitlines()]
    rows = [row for row in cells if len(row) == 4 and row[0].isdigit()]
    assert [(int(seq), user, text) for seq, _, user, text in rows] == [
        (sequence, SHOWN_NAME, shown) for sequence, shown in enumerate(HOSTILE.values(), start=1)
    ]


def test_interactive_chat_shows_escapes(
    terminal: Start, parley: Run, hostile_room: HostileRoom
) -> None:
    room = hostile_room.name
    chat = terminal("chat", "--room", room, token=hostile_room.token)
    for sequence, shown in enumerate(HOSTILE.values(), start=1):  # the history on joining
        chat.expect(line_of(sequence, shown))
    chat.prompt(room)
    chat.type("/who")
    chat.expect(rf"in #{room}: {re.escape(SHOWN_NAME)} \({hostile_room.user_id}\)")
    chat.prompt(room)

    who = parley("chat", "who", "--room", room, token=hostile_room.token)
    assert who.code == 0, who
    assert SHOWN_NAME in who.stdout and unsafe(who.stdout.replace("\n", "")) == []

    chat.sendcontrol("d")
    assert chat.wait_exit() == 0, chat.text
    # prompt_toolkit draws with escape sequences of its own (cursor moves, colours, \r, \b),
    # but never these; and none of the stored texts reached the terminal as they are.
    data = chat.data
    assert b"\x1b]" not in data, "an OSC sequence (52: the clipboard) reached the terminal"
    assert b"\x1b[2J" not in data and b"\x07" not in data
    assert [ch for ch in data.decode("utf-8") if 0x80 <= ord(ch) < 0xA0] == [], "C1 controls"
    assert "\u202e" not in data.decode("utf-8")
    for text in HOSTILE:
        if not text.isprintable():
            assert text.encode() not in data, text


def test_json_keeps_the_text_and_escapes_it(parley: Run, hostile_room: HostileRoom) -> None:
    ran = parley("chat", "history", "--room", hostile_room.name, "-o", "json",
                 token=hostile_room.token)  # fmt: skip
    assert ran.code == 0, ran
    assert unsafe(ran.stdout.replace("\n", "")) == [], "raw control characters in the JSON"
    lines = ran.json_lines()
    assert [line["text"] for line in lines] == list(HOSTILE)
    assert {line["user"] for line in lines} == {NAME}


def test_user_names_show_escapes(
    terminal: Start, parley: Run, stack: RunningStack, hostile_room: HostileRoom
) -> None:
    user_id = str(hostile_room.user_id)
    get = terminal("users", "get", user_id, token=stack.admin_token)
    get.expect(rf"│ +{user_id} │ {re.escape(SHOWN_NAME)} +│")
    assert get.wait_exit() == 0, get.text
    assert stray_controls(get.data) == []

    listed = parley("users", "list", token=stack.admin_token)
    assert listed.code == 0, listed
    assert SHOWN_NAME in listed.stdout and unsafe(listed.stdout.replace("\n", "")) == []

    as_json = parley("users", "get", user_id, "-o", "json", token=stack.admin_token)
    assert as_json.code == 0, as_json
    assert unsafe(as_json.stdout.replace("\n", "")) == []
    assert as_json.json_lines()[0]["name"] == NAME


def test_a_server_error_that_echoes_input_is_escaped(parley: Run) -> None:
    # The token verifier names a `crit` header extension it does not support, as it is.
    header = {"alg": "HS256", "typ": "JWT", "crit": ["\x1b]52;c;aGVsbG8=\x07\x9b2J\nparley: OK"]}
    encoded = base64.urlsafe_b64encode(json.dumps(header).encode()).rstrip(b"=").decode()
    ran = parley("users", "list", token=f"{encoded}.e30.c2lnbmF0dXJl")
    assert ran.code == 26, ran
    assert len(ran.stderr.splitlines()) == 1, ran
    assert ran.stderr.startswith("parley: UNAUTHENTICATED: invalid token: "), ran
    assert r"\x1b]52;c;aGVsbG8=\x07\x9b2J\nparley: OK - try: " in ran.stderr, ran
    assert unsafe(ran.stderr.rstrip("\n")) == []

    debug = parley("--debug", "users", "list", token=f"{encoded}.e30.c2lnbmF0dXJl")
    assert "Traceback (most recent call last)" in debug.stderr, debug
    assert r"\x1b]52;c;aGVsbG8=\x07" in debug.stderr, debug
    assert unsafe(debug.stderr.replace("\n", "")) == []
