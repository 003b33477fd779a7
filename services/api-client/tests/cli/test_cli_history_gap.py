"""`parley chat tail` in a room whose front was deleted by history retention: one line says
which messages are gone, and the rest are printed once."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import psycopg

from parley.testing.cli import Ran

if TYPE_CHECKING:
    from conftest import Person, RunningStack

Run = Callable[..., Ran]


def _room_with_front_deleted(url: str, room: str, last: int, through: int) -> None:
    """Messages 1..last of `room`, of which 1..through are deleted, as retention deletes."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO chat_rooms (name, last_sequence) VALUES (%s, %s)", (room, last))
        conn.execute(
            "INSERT INTO chat_messages (room, sequence, user_id, user_name, text)"
            " SELECT %s, g, 1, 'seed', 'message ' || g FROM generate_series(1, %s::bigint) AS g",
            (room, last),
        )
        conn.execute(
            "DELETE FROM chat_messages WHERE room = %s AND sequence <= %s", (room, through)
        )


def test_tail_prints_one_line_about_a_history_gap(
    parley: Run, stack: RunningStack, person: Callable[[str], Person], room: str
) -> None:
    ada = person("Ada")
    _room_with_front_deleted(stack.database_url, room, 50, 40)
    ran = parley(
        "chat", "tail", "--room", room, "--after", "3", "--count", "10", "-o", "json",
        "--wait", "60", token=ada.token,
    )  # fmt: skip
    assert ran.code == 0, ran
    assert [m["sequence"] for m in ran.json_lines()] == list(range(41, 51))
    assert ran.stderr.splitlines() == [
        f"parley: history gap: messages 4-40 of room {room} are no longer kept; continuing from 41"
    ]


def test_tail_prints_text_lines_after_the_gap_line(
    parley: Run, stack: RunningStack, person: Callable[[str], Person], room: str
) -> None:
    ada = person("Ada")
    _room_with_front_deleted(stack.database_url, room, 12, 11)
    ran = parley(
        "chat", "tail", "--room", room, "--after", "10", "--count", "1", "--wait", "60",
        token=ada.token,
    )  # fmt: skip
    assert ran.code == 0, ran
    assert [line.split()[0] for line in ran.stdout.splitlines()] == ["#12"]
    assert ran.stderr.splitlines() == [
        f"parley: history gap: message 11 of room {room} is no longer kept; continuing from 12"
    ]


def test_history_after_a_deleted_point_prints_the_gap_line(
    parley: Run, stack: RunningStack, person: Callable[[str], Person], room: str
) -> None:
    ada = person("Ada")
    _room_with_front_deleted(stack.database_url, room, 50, 40)
    ran = parley("chat", "history", "--room", room, "--after", "3", "-o", "json", token=ada.token)
    assert ran.code == 0, ran
    assert [m["sequence"] for m in ran.json_lines()] == list(range(41, 51))
    assert ran.stderr.splitlines() == [
        f"parley: history gap: messages 4-40 of room {room} are no longer kept; continuing from 41"
    ]
    # From the first kept message on, or after the last: no line.
    for after in ("40", "50"):
        quiet = parley("chat", "history", "--room", room, "--after", after, token=ada.token)
        assert quiet.code == 0, quiet
        assert quiet.stderr == ""
