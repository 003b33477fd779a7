"""What a user sees when a command fails: one line on stderr, no traceback, a documented exit
code. Each command runs as a real `parley` process against the real stack."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import Person, RunningStack

    from parley.testing.cli import Ran

Run = Callable[..., "Ran"]


def one_line(ran: Ran) -> str:
    """The single line of stderr; fails when there is more (a traceback, say) or stdout."""
    lines = ran.stderr.strip().splitlines()
    assert len(lines) == 1, ran
    assert "Traceback" not in ran.stderr
    assert ran.stdout == "", ran
    return lines[0]


def test_not_found(parley: Run, stack: RunningStack) -> None:
    ran = parley("users", "get", "987654321", token=stack.admin_token)
    assert ran.code == 15, ran
    assert one_line(ran) == (
        "parley: NOT_FOUND: user 987654321 not found"
        " - try: check the id (`parley users list` shows them)"
    )


def test_already_exists(parley: Run, stack: RunningStack, person: Callable[[str], Person]) -> None:
    taken = person("Taken").user.email
    ran = parley("users", "create", "--name", "Again", "--email", taken.upper(),
                 token=stack.admin_token)  # fmt: skip
    assert ran.code == 16, ran
    line = one_line(ran)
    assert line.startswith("parley: ALREADY_EXISTS: a user with email ")
    assert line.endswith("- try: use another email (emails are compared without case)")


def test_invalid_argument_names_the_field(parley: Run, stack: RunningStack) -> None:
    ran = parley("users", "create", "--name", "Ada", "--email", "not-an-email", "--age", "200",
                 token=stack.admin_token)  # fmt: skip
    assert ran.code == 13, ran
    assert one_line(ran) == (
        "parley: INVALID_ARGUMENT: invalid email: must be an email address such as "
        "ada@example.com; age: must be between 0 and 150, got 200 - try: fix --email, --age"
    )


def test_missing_token_says_how_to_get_one(parley: Run) -> None:
    ran = parley("users", "list")
    assert ran.code == 26, ran
    assert one_line(ran) == (
        "parley: UNAUTHENTICATED: no token was sent - try: pass --token or set PARLEY_TOKEN; "
        "get one with `parley token --sub 1 --scope users:write` (make run prints one too)"
    )


def test_forged_token(parley: Run) -> None:
    ran = parley("users", "list", "--token", "not-a-jwt")
    assert ran.code == 26, ran
    assert one_line(ran).startswith("parley: UNAUTHENTICATED: invalid token")


def test_read_only_token_is_denied(
    parley: Run, stack: RunningStack, email: Callable[[str], str]
) -> None:
    read_only = stack.token("1")
    ran = parley("users", "create", "--name", "Ro", "--email", email("ro"), token=read_only)
    assert ran.code == 17, ran
    assert one_line(ran) == (
        "parley: PERMISSION_DENIED: this call needs the 'users:write' scope, which the token "
        "does not grant - try: use a token with that scope: "
        "`parley token --sub 1 --scope users:write`"
    )


def test_unavailable_names_the_address(parley: Run, stack: RunningStack, unused_port: int) -> None:
    address = f"127.0.0.1:{unused_port}"
    ran = parley("users", "get", "1", "--user-addr", address, token=stack.admin_token)
    assert ran.code == 24, ran
    assert one_line(ran) == (
        f"parley: UNAVAILABLE: cannot reach UserService at {address} - is it running?"
        " - try: make run, or set --user-addr or PARLEY_USER_ADDR"
    )


def test_deadline_exceeded_with_a_tiny_timeout(parley: Run, stack: RunningStack) -> None:
    ran = parley("users", "list", "--timeout", "0.0001", token=stack.admin_token)
    assert ran.code == 14, ran
    assert one_line(ran) == (
        f"parley: DEADLINE_EXCEEDED: UserService at {stack.user} did not answer within 0.0001s"
        " - try: raise --timeout, or check `parley health`"
    )


def test_chat_as_a_user_that_does_not_exist(parley: Run, stack: RunningStack, room: str) -> None:
    ran = parley("chat", "send", "--room", room, "hello", token=stack.token("987654321"))
    assert ran.code == 19, ran
    assert one_line(ran) == (
        "parley: FAILED_PRECONDITION: user 987654321 of the token does not exist in UserService"
        " - try: create the user (`parley users create`), then `parley token --sub <its id>`"
    )


def test_bad_room_names_the_flag(parley: Run, person: Callable[[str], Person]) -> None:
    ran = parley("chat", "tail", "--room", "Not A Room", token=person("Roomer").token)
    assert ran.code == 13, ran
    line = one_line(ran)
    assert line.startswith("parley: INVALID_ARGUMENT: invalid room: must be 1 to 64 characters")
    assert line.endswith("- try: fix --room")


def test_debug_shows_the_traceback(parley: Run, stack: RunningStack) -> None:
    ran = parley("--debug", "users", "get", "987654321", token=stack.admin_token)
    assert ran.code == 15, ran
    assert "Traceback (most recent call last)" in ran.stderr
    assert "parley.client.errors.NotFound" in ran.stderr
    assert ran.stderr.strip().splitlines()[-1].startswith("parley: NOT_FOUND: user 987654321")


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["users", "get", "abc"], r"Invalid value for 'USER_ID'"),
        (["users", "list", "-o", "yaml"], r"'yaml' is not one of"),
        (["chat", "tail", "--history", "3", "--after", "2"], r"give --history or --after"),
        (["chat", "tail", "--room-id", "3"], r"--room-id goes with --after"),
    ],
)
def test_usage_errors_exit_2(parley: Run, args: list[str], complaint: str) -> None:
    ran = parley(*args)
    assert ran.code == 2, ran
    assert re.search(complaint, ran.stderr), ran
    assert "Traceback" not in ran.stderr
