"""Help texts, the exit-code table, `parley token`, and the entry point itself."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
import typer
from typer.testing import CliRunner

from parley.client.cli import app
from parley.testing.cli import PARLEY

SECRET = "s" * 48


def command_paths() -> Iterator[list[str]]:
    """Every command and group below the root, as argument lists."""

    def walk(command: object, path: list[str]) -> Iterator[list[str]]:
        subcommands = getattr(command, "commands", {})
        for name, sub in sorted(subcommands.items()):
            yield [*path, name]
            yield from walk(sub, [*path, name])

    yield from walk(typer.main.get_command(app), [])


def help_of(*path: str) -> str:
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.stdout


def test_the_command_tree() -> None:
    assert sorted(" ".join(path) for path in command_paths()) == [
        "chat", "chat history", "chat send", "chat tail", "chat who",
        "dm", "health",
        "rooms", "rooms add", "rooms create", "rooms delete", "rooms dm", "rooms get",
        "rooms leave", "rooms list", "rooms members", "rooms remove", "rooms update",
        "token",
        "users", "users create", "users delete", "users get", "users import", "users list",
        "users update",
    ]  # fmt: skip


@pytest.mark.parametrize("path", list(command_paths()), ids=" ".join)
def test_every_command_has_examples(path: list[str]) -> None:
    text = help_of(*path)
    assert "Examples" in text
    assert f"parley {' '.join(path)}" in text.split("Examples", 1)[1]


def test_root_help_documents_exit_codes_and_environment() -> None:
    text = help_of()
    for line in ("0    success", "2    usage error", "3    partly done", "10+N", "15 NOT_FOUND",
                 "24 UNAVAILABLE", "26 UNAUTHENTICATED", "130  interrupted"):  # fmt: skip
        assert line in text
    for variable in ("PARLEY_USER_ADDR", "PARLEY_CHAT_ADDR", "PARLEY_TOKEN", "PARLEY_TIMEOUT",
                     "OTEL_EXPORTER_OTLP_ENDPOINT"):  # fmt: skip
        assert variable in text


def test_global_options_after_the_command_too() -> None:
    for path in (["users", "get"], ["chat", "tail"], ["health"]):
        text = help_of(*path)
        assert "--timeout" in text and "--output" in text and "--debug" in text
        assert "--trace" in text


def test_token_prints_a_signed_jwt() -> None:
    result = CliRunner().invoke(
        app, ["token", "--sub", "7", "--scope", "users:write", "--ttl", "15m", "--secret", SECRET]
    )
    assert result.exit_code == 0, result.output
    claims = jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"], audience="parley")
    assert (claims["sub"], claims["scope"], claims["exp"] - claims["iat"]) == (
        "7", "users:write", 900
    )  # fmt: skip


def test_token_without_a_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PARLEY_JWT_SECRET", raising=False)
    result = CliRunner().invoke(app, ["token", "--sub", "1"])
    assert result.exit_code == 2
    assert result.stderr.startswith("parley token: no signing secret")


def test_the_entry_point_runs() -> None:
    done = subprocess.run([str(PARLEY), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Usage: parley" in done.stdout
