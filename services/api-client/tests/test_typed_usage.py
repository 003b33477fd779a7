"""Strictly typed code can use the SDK: typed_usage.py passes `mypy --strict` and runs."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from parley.client import Unavailable, UserClient

if TYPE_CHECKING:
    from conftest import Person, RunningStack

USAGE = Path(__file__).with_name("typed_usage.py")
ROOT = Path(__file__).resolve().parents[3]


def _usage() -> ModuleType:
    spec = importlib.util.spec_from_file_location("parley_typed_usage", USAGE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_typed_usage_passes_mypy_strict() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            str(USAGE.relative_to(ROOT)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def test_typed_usage_runs(
    stack: RunningStack, person: Callable[[str], Person], room: str
) -> None:
    usage = _usage()
    email = f"typed-{uuid.uuid4().hex[:12]}@example.com"
    report = usage.directory_report(stack.user, lambda: stack.admin_token, email)
    assert report.names == ["Typed"] and report.missing and report.pages >= 1
    assert {v.field for v in report.violations} == {"name", "email"}

    writer = person("Writer")
    assert usage.post_all(stack.chat, writer.token, room, ["a", "b"]) == [1, 2]
    assert await usage.count_users(stack.user, stack.admin_token) >= 2
    last, states = await usage.chat_round_trip(stack.chat2, writer.token, room)
    assert last == 3 and states[0] == f"connected to {stack.chat2}"


async def test_typed_rooms_run(
    stack: RunningStack, person: Callable[[str], Person], room: str
) -> None:
    usage = _usage()
    owner, member, outsider = person("Owner"), person("Member"), person("Outsider")
    assert usage.team_room(stack.chat, owner.token, outsider.token, room, member.id)
    name = await usage.direct_room_name(stack.chat, owner.token, member.id)
    assert name == f"dm-{min(owner.id, member.id)}-{max(owner.id, member.id)}"


def test_describe_failure(unused_port: int) -> None:
    usage = _usage()
    with UserClient(f"127.0.0.1:{unused_port}") as users:
        try:
            users.get_user(1)
        except Unavailable as exc:
            line = usage.describe_failure(exc)
    assert line.startswith(f"UNAVAILABLE at 127.0.0.1:{unused_port}: ")
