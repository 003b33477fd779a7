"""`parley users ...` against the real UserService: the happy paths and the output formats."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

from parley.client import UserClient

if TYPE_CHECKING:
    from conftest import RunningStack

    from parley.testing.cli import Ran

Run = Callable[..., "Ran"]


def test_create_get_update_delete(
    cli: Run, stack: RunningStack, email: Callable[[str], str]
) -> None:
    token = stack.admin_token
    address = email("ada")
    created = cli("users", "create", "--name", "Ada", "--email", address, "--age", "36",
                  "-o", "json", token=token)  # fmt: skip
    assert created.code == 0, created
    [user] = created.json_lines()
    assert list(user) == ["id", "name", "email", "age", "create_time", "update_time"]
    assert (user["name"], user["email"], user["age"]) == ("Ada", address, 36)
    assert datetime.fromisoformat(user["create_time"]).tzinfo is not None

    shown = cli("users", "get", str(user["id"]), token=token)
    assert shown.code == 0, shown
    assert re.search(
        rf"│\s*{user['id']}\s*│\s*Ada\s*│\s*{re.escape(address)}\s*│\s*36\s*│", shown.stdout
    )

    # Global options are accepted before the command too.
    changed = cli("-o", "json", "users", "update", str(user["id"]), "--age", "37", token=token)
    assert changed.code == 0, changed
    [after] = changed.json_lines()
    assert after["age"] == 37
    assert {k: v for k, v in after.items() if k not in ("age", "update_time")} == {
        k: v for k, v in user.items() if k not in ("age", "update_time")
    }

    gone = cli("users", "delete", str(user["id"]), token=token)
    assert (gone.code, gone.stdout.strip()) == (0, f"deleted user {user['id']}")
    with UserClient(stack.user, token=token) as users:
        assert user["id"] not in {u.id for u in users.list_users()}


def test_list_pages_through_every_user(
    cli: Run, stack: RunningStack, email: Callable[[str], str]
) -> None:
    token = stack.admin_token
    with UserClient(stack.user, token=token) as users:
        mine = [users.create_user(name=f"Pager {i}", email=email("pager")).id for i in range(7)]
    listed = cli("users", "list", "--page-size", "2", "-o", "json", token=token)
    assert listed.code == 0, listed
    ids = [user["id"] for user in listed.json_lines()]
    assert ids == sorted(set(ids)), "ascending, each once"
    assert set(mine) <= set(ids)
    assert len(ids) > 2 * 3, "more than three pages of two"

    limited = cli("users", "list", "--page-size", "3", "--limit", "4", token=token)
    assert limited.code == 0, limited
    rows = [line for line in limited.stdout.splitlines() if re.match(r"│\s*\d+\s*│", line)]
    assert len(rows) == 4


def test_update_needs_a_field(cli: Run, stack: RunningStack) -> None:
    ran = cli("users", "update", "1", token=stack.admin_token)
    assert ran.code == 2
    assert "give at least one of --name, --email, --age" in ran.stderr


def test_health_of_every_service(cli: Run, stack: RunningStack, unused_port: int) -> None:
    both = f"{stack.chat},{stack.chat2}"
    ran = cli("health", "--chat-addr", both, "-o", "json")
    assert ran.code == 0, ran
    checks = {(c["address"], c["check"]): c["status"] for c in ran.json_lines()}
    assert checks == {
        (stack.user, ""): "SERVING",
        (stack.user, "user.UserService"): "SERVING",
        **{(chat, ""): "SERVING" for chat in (stack.chat, stack.chat2)},
        **{(chat, "chat.ChatService"): "SERVING" for chat in (stack.chat, stack.chat2)},
        **{(chat, "dependency/user-service"): "SERVING" for chat in (stack.chat, stack.chat2)},
    }

    down = f"127.0.0.1:{unused_port}"
    ran = cli("health", "--chat-addr", f"{stack.chat},{down}")
    assert ran.code == 3, ran
    assert re.search(rf"ChatService\s*│\s*{re.escape(down)}\s*│.*UNAVAILABLE", ran.stdout)
    assert re.search(rf"UserService\s*│\s*{re.escape(stack.user)}\s*│.*SERVING", ran.stdout)
