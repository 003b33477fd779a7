"""`parley rooms ...` and `parley dm` against the real stack, and `parley chat` in a private
room: one line and exit 17 (10 + PERMISSION_DENIED) for an outsider, whether the room refuses
the stream at once or the membership ends while the stream is open."""

from __future__ import annotations

import io
import re
import subprocess
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rich.console import Console

from parley.client import ChatClient
from parley.client.cli.output import rooms_table
from parley.proto import chat_pb2

if TYPE_CHECKING:
    from conftest import Person, RunningStack

    from parley.testing.cli import Ran, Terminal

Run = Callable[..., "Ran"]
Start = Callable[..., "Terminal"]
EXIT_PERMISSION_DENIED = 17


def one_line(ran: Ran) -> str:
    """The single line of stderr; fails when there is more (a traceback, say) or stdout."""
    lines = ran.stderr.strip().splitlines()
    assert len(lines) == 1, ran
    assert "Traceback" not in ran.stderr
    return lines[0]


def private_room(stack: RunningStack, owner: Person, room: str, *members: Person) -> None:
    with ChatClient(stack.chat, token=owner.token) as chat:
        chat.create_room(room, title="Members only", visibility="private")
        for member in members:
            chat.add_member(room, member.id)


def remove(stack: RunningStack, owner: Person, room: str, member: Person) -> None:
    with ChatClient(stack.chat, token=owner.token) as chat:
        chat.remove_member(room, member.id)


def test_rooms_commands(cli: Run, person: Callable[[str], Person], room: str) -> None:
    ada, bob = person("Ada"), person("Bob")
    created = cli("rooms", "create", room, "--title", "The team", "--visibility", "private",
                  "-o", "json", token=ada.token)  # fmt: skip
    assert created.code == 0, created
    [shown] = created.json_lines()
    assert list(shown) == [
        "name", "title", "visibility", "owner_id", "member_count", "direct", "create_time"
    ]  # fmt: skip
    assert (shown["name"], shown["title"], shown["visibility"]) == (room, "The team", "private")
    assert (shown["owner_id"], shown["member_count"], shown["direct"]) == (ada.id, 1, False)

    got = cli("rooms", "get", room, token=ada.token)
    assert got.code == 0, got
    assert re.search(rf"│ {room}\s*│ The team\s*│ private\s*│\s*{ada.id} │\s*1 │", got.stdout), got

    added = cli("rooms", "add", room, str(bob.id), token=ada.token)
    assert (added.code, added.stdout.strip()) == (0, f"user {bob.id} is a member of {room}")
    members = cli("rooms", "members", room, "-o", "json", token=ada.token)
    assert members.code == 0, members
    assert [(m["room"], m["user_id"], m["owner"]) for m in members.json_lines()] == [
        (room, ada.id, True), (room, bob.id, False)
    ]  # fmt: skip
    assert all(m["join_time"] for m in members.json_lines())
    table = cli("rooms", "members", room, token=ada.token)
    assert re.search(rf"│\s*{ada.id} │ owner", table.stdout), table
    assert re.search(rf"│\s*{bob.id} │ member", table.stdout), table
    limited = cli("rooms", "members", room, "--limit", "1", "-o", "json", token=ada.token)
    assert [m["user_id"] for m in limited.json_lines()] == [ada.id]

    updated = cli("rooms", "update", room, "--title", "Renamed", "-o", "json", token=ada.token)
    assert updated.code == 0, updated
    assert [(r["title"], r["visibility"]) for r in updated.json_lines()] == [("Renamed", "private")]
    public = cli("rooms", "update", room, "--visibility", "public", "-o", "json", token=ada.token)
    assert [(r["title"], r["visibility"]) for r in public.json_lines()] == [("Renamed", "public")]
    nothing = cli("rooms", "update", room, token=ada.token)
    assert nothing.code == 2 and "give --title or --visibility" in nothing.stderr, nothing

    listed = cli("rooms", "list", "-o", "json", token=bob.token)
    assert listed.code == 0, listed
    assert room in [r["name"] for r in listed.json_lines()]
    assert room in cli("rooms", "list", token=bob.token).stdout

    left = cli("rooms", "leave", room, token=bob.token)
    assert (left.code, left.stdout.strip()) == (0, f"left {room}")
    cli("rooms", "add", room, str(bob.id), token=ada.token)
    removed = cli("rooms", "remove", room, str(bob.id), "-o", "json", token=ada.token)
    assert removed.json_lines() == [{"room": room, "user_id": bob.id, "removed": True}]
    deleted = cli("rooms", "delete", room, token=ada.token)
    assert (deleted.code, deleted.stdout.strip()) == (0, f"deleted room {room}")


def test_rooms_dm_shows_the_direct_room(cli: Run, person: Callable[[str], Person]) -> None:
    ada, bob = person("Ada"), person("Bob")
    ran = cli("rooms", "dm", str(bob.id), "-o", "json", token=ada.token)
    assert ran.code == 0, ran
    [room] = ran.json_lines()
    low, high = sorted((ada.id, bob.id))
    assert (room["name"], room["visibility"], room["direct"]) == (
        f"dm-{low}-{high}", "private", True
    )  # fmt: skip
    again = cli("rooms", "dm", str(ada.id), "-o", "json", token=bob.token)
    assert again.json_lines()[0]["name"] == room["name"]


def test_room_titles_are_printed_escaped() -> None:
    room = chat_pb2.Room(
        name="lobby", title="\x1b]52;c;aGk=\x07evil\u202egnp.exe", visibility=chat_pb2.Room.PUBLIC
    )
    out = io.StringIO()
    Console(file=out, width=240, color_system=None).print(rooms_table([room]))
    text = out.getvalue()
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text
    assert "\\x1b]52;c;aGk=\\x07evil\\u202egnp.exe" in text


def test_room_failures_are_one_line(
    parley: Run, stack: RunningStack, person: Callable[[str], Person], room: str
) -> None:
    ada, bob, carol = person("Ada"), person("Bob"), person("Carol")
    private_room(stack, ada, room, bob)
    taken = parley("rooms", "create", room, token=bob.token)
    assert taken.code == 16, taken
    assert one_line(taken).endswith(
        "- try: use another room name (`parley rooms list` shows those taken)"
    )
    missing = parley("rooms", "add", room, "987654321", token=ada.token)
    assert missing.code == 15, missing
    assert one_line(missing).startswith("parley: NOT_FOUND: ")
    not_owner = parley("rooms", "delete", room, token=bob.token)
    assert not_owner.code == EXIT_PERMISSION_DENIED, not_owner
    assert "ask the room's owner" in one_line(not_owner)
    outsider = parley("rooms", "members", room, token=carol.token)
    assert outsider.code == EXIT_PERMISSION_DENIED, outsider
    assert one_line(outsider).startswith("parley: PERMISSION_DENIED: ")
    reserved = parley("rooms", "create", "dm-1-2", token=ada.token)
    assert reserved.code == 13, reserved
    assert one_line(reserved).startswith("parley: INVALID_ARGUMENT: ")


# --- parley chat in a private room ---------------------------------------------------------


def test_chat_send_and_tail_by_an_outsider(
    parley: Run, stack: RunningStack, person: Callable[[str], Person], room: str
) -> None:
    ada, bob = person("Ada"), person("Bob")
    private_room(stack, ada, room)
    for args in (
        ("chat", "send", "--room", room, "let me in"),
        ("chat", "tail", "--room", room),
        ("chat", "tail", "--room", room, "--after", "0"),  # the stream refuses, not history
        ("chat", "history", "--room", room),
        ("chat", "who", "--room", room),
    ):
        ran = parley(*args, token=bob.token, timeout=30)
        assert ran.code == EXIT_PERMISSION_DENIED, ran
        line = one_line(ran)
        assert line.startswith("parley: PERMISSION_DENIED: "), line
        assert "it is private: ask its owner to add you" in line
        assert ran.stdout == ""


def test_interactive_chat_by_an_outsider(
    terminal: Start, stack: RunningStack, person: Callable[[str], Person], room: str
) -> None:
    ada, bob = person("Ada"), person("Bob")
    private_room(stack, ada, room)
    chat = terminal("chat", "--room", room, token=bob.token)
    assert chat.wait_exit() == EXIT_PERMISSION_DENIED
    lines = [line for line in chat.text.splitlines() if line.strip()]
    assert len(lines) == 1, chat.text
    assert lines[0].startswith("parley: PERMISSION_DENIED: ")


def test_interactive_chat_ends_when_the_membership_is_removed(
    terminal: Start, stack: RunningStack, person: Callable[[str], Person], room: str
) -> None:
    ada, bob = person("Ada"), person("Bob")
    private_room(stack, ada, room, bob)
    chat = terminal("chat", "--room", room, token=bob.token)
    chat.expect(rf"joined #{room}")
    chat.type("hello team")
    chat.expect(r"#1 \d\d:\d\d:\d\d Bob: hello team")
    chat.prompt(room)
    remove(stack, ada, room, bob)
    assert chat.wait_exit() == EXIT_PERMISSION_DENIED
    assert len(re.findall(r"parley: PERMISSION_DENIED: ", chat.text)) == 1, chat.text
    assert "reconnecting" not in chat.text and "Traceback" not in chat.text


def test_chat_send_ends_when_the_membership_is_removed(
    start_parley: Callable[..., subprocess.Popen[str]],
    stack: RunningStack,
    person: Callable[[str], Person],
    room: str,
) -> None:
    ada, bob = person("Ada"), person("Bob")
    private_room(stack, ada, room, bob)
    send = start_parley("chat", "send", "--room", room, env={"PARLEY_TOKEN": bob.token},
                        stdin=True)  # fmt: skip
    assert send.stdin is not None and send.stdout is not None
    send.stdin.write("first\n")
    send.stdin.flush()
    assert "Bob: first" in send.stdout.readline()
    remove(stack, ada, room, bob)
    # stdin stays open (communicate() would close it): only the stream's end can stop it.
    send.wait(timeout=30)
    assert send.stderr is not None
    err = send.stderr.read()
    assert send.returncode == EXIT_PERMISSION_DENIED, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("parley: PERMISSION_DENIED: "), err


def test_chat_tail_ends_when_the_membership_is_removed(
    start_parley: Callable[..., subprocess.Popen[str]],
    stack: RunningStack,
    person: Callable[[str], Person],
    room: str,
) -> None:
    ada, bob = person("Ada"), person("Bob")
    private_room(stack, ada, room, bob)
    tail = start_parley("chat", "tail", "--room", room, "--after", "0",
                        env={"PARLEY_TOKEN": bob.token})  # fmt: skip
    with ChatClient(stack.chat, token=ada.token) as chat:
        chat.post(room, "before")
    assert tail.stdout is not None and "Ada: before" in tail.stdout.readline()
    remove(stack, ada, room, bob)
    _, err = tail.communicate(timeout=30)
    assert tail.returncode == EXIT_PERMISSION_DENIED, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("parley: PERMISSION_DENIED: "), err


# --- parley dm -----------------------------------------------------------------------------


def test_dm_chats_in_the_direct_room(
    terminal: Start, stack: RunningStack, person: Callable[[str], Person]
) -> None:
    ada, bob = person("Ada"), person("Bob")
    low, high = sorted((ada.id, bob.id))
    name = f"dm-{low}-{high}"
    a = terminal("dm", str(bob.id), token=ada.token)
    a.expect(rf"joined #{name} on ")
    b = terminal("dm", str(ada.id), token=bob.token, chat_addr=stack.chat2)
    b.expect(rf"joined #{name} on ")
    a.prompt(name)
    b.prompt(name)
    a.type("hi Bob, just us")
    b.expect(r"#1 \d\d:\d\d:\d\d Ada: hi Bob, just us")
    a.expect(r"#1 \d\d:\d\d:\d\d Ada: hi Bob, just us")
    a.prompt(name)
    b.prompt(name)
    a.sendcontrol("d")
    b.sendcontrol("d")
    assert a.wait_exit() == 0 and b.wait_exit() == 0
    with ChatClient(stack.chat, token=ada.token) as chat:
        assert [m.text for m in chat.list_messages(name)] == ["hi Bob, just us"]


def test_dm_failures(terminal: Start, parley: Run, person: Callable[[str], Person]) -> None:
    ada = person("Ada")
    nobody = terminal("dm", "987654321", token=ada.token)
    assert nobody.wait_exit() == 15
    lines = [line for line in nobody.text.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("parley: NOT_FOUND: "), nobody.text
    piped = parley("dm", "2", token=ada.token)
    assert piped.code == 2, piped
    assert "the interactive chat needs a terminal" in piped.stderr


def test_rooms_help_lists_its_commands(cli: Any) -> None:
    ran = cli("rooms", "--help")
    for name in ("create", "list", "get", "update", "delete", "members", "add", "remove",
                 "leave", "dm"):  # fmt: skip
        assert re.search(rf"│ {name}\s", ran.stdout), name
