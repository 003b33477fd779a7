"""Fixtures for the `parley` command-line tests, against the real stack of the parent conftest
(the helpers behind them are in parley.testing.cli):

- `cli(...)`: in this process through typer's CliRunner, for happy paths where only the output
  matters (fast: no interpreter start-up);
- `parley(...)`, `start_parley(...)` and `terminal(...)`: the installed `parley` entry point as
  a subprocess or in a pseudo-terminal, where exit codes, stderr and terminals must be exactly
  what a user sees.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

import pytest

from parley.testing.cli import PARLEY, Ran, Terminal, command_env, invoke, run

if TYPE_CHECKING:
    from conftest import RunningStack

Changes = Mapping[str, str | None]


@pytest.fixture
def parley(stack: RunningStack) -> Callable[..., Ran]:
    """`parley(*args, token=None, env=None, input=None, timeout=60)`: run the entry point.

    `token` becomes PARLEY_TOKEN; `env` adds or, with None values, removes variables.
    """

    def parley(
        *args: str,
        token: str | None = None,
        env: Changes | None = None,
        input: str | None = None,
        timeout: float = 60,
    ) -> Ran:
        changes = {**({} if token is None else {"PARLEY_TOKEN": token}), **(env or {})}
        return run(args, command_env(stack.user, stack.chat, changes), input=input, timeout=timeout)

    return parley


@pytest.fixture
def start_parley(stack: RunningStack) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """`start_parley(*args, env=..., stdin=False)`: start the entry point in the background,
    with pipes (stdin too when `stdin`, else /dev/null)."""
    started: list[subprocess.Popen[str]] = []

    def start(*args: str, env: Changes | None = None, stdin: bool = False) -> subprocess.Popen[str]:
        started.append(
            subprocess.Popen(
                [str(PARLEY), *args],
                env=command_env(stack.user, stack.chat, env),
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
        return started[-1]

    yield start
    for process in started:
        process.kill()
        process.communicate()


@pytest.fixture
def cli(stack: RunningStack) -> Callable[..., Ran]:
    """`cli(*args, token=None, input=None)`: run a command in this process with CliRunner."""

    def cli(*args: str, token: str | None = None, input: str | None = None) -> Ran:
        return invoke(args, user_addr=stack.user, chat_addr=stack.chat, token=token, input=input)

    return cli


@pytest.fixture
def terminal(stack: RunningStack) -> Iterator[Callable[..., Terminal]]:
    """`terminal(*args, token=..., chat_addr=...)`: start `parley` in a pseudo-terminal."""
    opened: list[Terminal] = []

    def start(*args: str, token: str, chat_addr: str | None = None) -> Terminal:
        chat = stack.chat if chat_addr is None else chat_addr
        opened.append(Terminal(args, command_env(stack.user, chat, {"PARLEY_TOKEN": token})))
        return opened[-1]

    yield start
    for each in opened:
        each.close()
