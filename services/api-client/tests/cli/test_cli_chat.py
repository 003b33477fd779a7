"""`parley chat send|tail|history|who` as scripts use them, against the real chat replicas."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc

from parley.client import AsyncChatClient, ChatClient

if TYPE_CHECKING:
    from conftest import Person, RunningStack

    from parley.testing.cli import Ran

Run = Callable[..., "Ran"]
LINE = r"#(\d+) \d\d:\d\d:\d\d (\S+): (.*)"


def test_tail_receives_what_send_sent(
    parley: Run,
    start_parley: Callable[..., subprocess.Popen[str]],
    stack: RunningStack,
    person: Callable[[str], Person],
    room: str,
) -> None:
    ada = person("Ada")
    # The tail reads from the start of the room (--after 0), so that it cannot miss what is
    # sent before it has joined; it listens on the other replica.
    tail = start_parley(
        "chat", "tail", "--room", room, "--after", "0", "--count", "4", "-o", "json",
        "--wait", "60",
        env={"PARLEY_TOKEN": ada.token, "PARLEY_CHAT_ADDR": stack.chat2},
    )  # fmt: skip
    first = parley("chat", "send", "--room", room, "one", "two", "-o", "json", token=ada.token)
    assert first.code == 0, first
    rest = parley("chat", "send", "-r", room, "-o", "json", input="three\n\nfour\n",
                  token=ada.token)  # fmt: skip
    assert rest.code == 0, rest
    out, err = tail.communicate(timeout=60)
    assert tail.returncode == 0, err
    sent = first.json_lines() + rest.json_lines()
    received = [json.loads(line) for line in out.splitlines()]
    assert received == sent, "the same messages, in the same order"
    assert [(m["sequence"], m["text"]) for m in received] == [
        (1, "one"), (2, "two"), (3, "three"), (4, "four")
    ]  # fmt: skip
    assert list(received[0]) == [
        "room", "sequence", "user_id", "user", "text", "create_time", "client_message_id",
        "room_id",
    ]  # fmt: skip
    assert len({m["room_id"] for m in received}) == 1 and received[0]["room_id"] > 0
    assert {(m["room"], m["user"], m["user_id"]) for m in received} == {(room, "Ada", ada.id)}
    assert err == ""


def test_tail_refuses_a_resume_point_of_another_room_id(
    cli: Run, person: Callable[[str], Person], room: str
) -> None:
    ada = person("Ada")
    sent = cli("chat", "send", "--room", room, "one", "two", "-o", "json", token=ada.token)
    assert sent.code == 0, sent
    room_id = sent.json_lines()[0]["room_id"]
    same = cli(
        "chat", "tail", "--room", room, "--after", "1", "--room-id", str(room_id),
        "--count", "1", token=ada.token,
    )  # fmt: skip
    assert same.code == 0 and same.stdout.rstrip().endswith("two"), same
    other = cli(
        "chat", "tail", "--room", room, "--after", "1", "--room-id", str(room_id + 1000),
        "--count", "1", "--wait", "30", token=ada.token,
    )  # fmt: skip
    assert other.code == 10 + grpc.StatusCode.OUT_OF_RANGE.value[0], other
    assert "resume from 0" in other.stderr


def test_send_prints_sequence_numbers(cli: Run, person: Callable[[str], Person], room: str) -> None:
    ada = person("Ada")
    ran = cli("chat", "send", "--room", room, "first", "second", token=ada.token)
    assert ran.code == 0, ran
    assert [re.fullmatch(LINE, line).groups() for line in ran.stdout.splitlines()] == [  # type: ignore[union-attr]
        ("1", "Ada", "first"),
        ("2", "Ada", "second"),
    ]
    empty = cli("chat", "send", "--room", room, "ok", "  ", token=ada.token)
    assert empty.code == 2, empty
    assert "message 2: a chat message must not be empty" in empty.stderr


def test_tail_history_and_count(
    cli: Run, stack: RunningStack, person: Callable[[str], Person], room: str
) -> None:
    ada = person("Ada")
    with ChatClient(stack.chat, token=ada.token) as chat:
        chat.post(room, *(f"m{i}" for i in range(1, 6)))
    ran = cli("chat", "tail", "--room", room, "--history", "3", "--count", "3", token=ada.token)
    assert ran.code == 0, ran
    lines = [re.fullmatch(LINE, line).groups() for line in ran.stdout.splitlines()]  # type: ignore[union-attr]
    assert lines == [("3", "Ada", "m3"), ("4", "Ada", "m4"), ("5", "Ada", "m5")]

    waited = cli("chat", "tail", "--room", room, "--count", "1", "--wait", "0.5", token=ada.token)
    assert waited.code == 14, waited
    assert waited.stderr.strip() == (
        "parley: DEADLINE_EXCEEDED: 0 of 1 messages arrived within --wait 0.5s"
        " - try: raise --timeout (or --wait), or check `parley health`"
    )


def test_history(cli: Run, stack: RunningStack, person: Callable[[str], Person], room: str) -> None:
    ada = person("Ada")
    with ChatClient(stack.chat, token=ada.token) as chat:
        chat.post(room, *(f"h{i}" for i in range(1, 31)))
    last = cli("chat", "history", "--room", room, "-o", "json", token=ada.token)
    assert last.code == 0, last
    assert [m["sequence"] for m in last.json_lines()] == list(range(11, 31)), "the last 20"
    after = cli("chat", "history", "--room", room, "--after", "27", token=ada.token)
    assert after.code == 0, after
    assert re.findall(r"│\s*(\d+)\s*│.*│\s*Ada\s*│\s*(h\d+)\s*│", after.stdout) == [
        ("28", "h28"), ("29", "h29"), ("30", "h30")
    ]  # fmt: skip


async def test_who_is_in_the_room(
    cli: Run, stack: RunningStack, person: Callable[[str], Person], room: str, wait_for: Any
) -> None:
    ada, bob = person("Ada"), person("Bob")
    async with (
        AsyncChatClient(stack.chat, token=ada.token) as chat,
        chat.session(room),
    ):
        await wait_for(lambda: chat.presence(room), what="Ada's presence")
        ran = cli("chat", "who", "--room", room, "-o", "json", token=bob.token)
    assert ran.code == 0, ran
    assert ran.json_lines() == [{"user_id": ada.id, "user": "Ada", "stream_count": 1}]
