"""Fixtures for the `parley` command-line tests.

Commands run two ways against the real stack of the parent conftest:

- `cli(...)`: in this process through typer's CliRunner, for happy paths where only the output
  matters (fast: no interpreter start-up);
- `parley(...)`: as a real subprocess of the installed `parley` entry point, where exit codes,
  stderr and terminals must be exactly what a user sees.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pexpect
import pytest
from typer.testing import CliRunner

from parley.client.cli import app

if TYPE_CHECKING:
    from conftest import RunningStack

PARLEY = Path(sys.executable).parent / "parley"

# Variables of the developer's shell that would change what the command talks to or prints.
_SCRUBBED = ("PARLEY_TOKEN", "PARLEY_USER_ADDR", "PARLEY_CHAT_ADDR", "PARLEY_TIMEOUT", "NO_COLOR")

# Wide enough that no table cell wraps, so tests can look for whole values.
COLUMNS = "240"


@dataclass(frozen=True)
class Ran:
    """The outcome of one command."""

    code: int
    stdout: str
    stderr: str

    def json_lines(self) -> list[dict[str, Any]]:
        """stdout as JSON Lines."""
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]

    def __str__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


def base_env(stack: RunningStack) -> dict[str, str]:
    """The environment of a `parley` subprocess: the stack's addresses, nothing else of ours."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
    env.update(
        COLUMNS=COLUMNS,
        PARLEY_USER_ADDR=stack.user,
        PARLEY_CHAT_ADDR=stack.chat,
        PYTHONWARNINGS="error",
    )
    return env


@pytest.fixture
def parley(stack: RunningStack) -> Callable[..., Ran]:
    """`parley(*args, token=None, env=None, input=None, timeout=60)`: run the entry point.

    `token` becomes PARLEY_TOKEN; `env` adds or, with None values, removes variables.
    """

    def run(
        *args: str,
        token: str | None = None,
        env: Mapping[str, str | None] | None = None,
        input: str | None = None,
        timeout: float = 60,
    ) -> Ran:
        environ = base_env(stack)
        if token is not None:
            environ["PARLEY_TOKEN"] = token
        for key, value in (env or {}).items():
            if value is None:
                environ.pop(key, None)
            else:
                environ[key] = value
        done = subprocess.run(
            [str(PARLEY), *args],
            env=environ,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        return Ran(done.returncode, done.stdout, done.stderr)

    return run


@pytest.fixture
def start_parley(stack: RunningStack) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """`start_parley(*args, env=..., stdin=False)`: start the entry point in the background,
    with pipes (stdin too when `stdin`, else /dev/null)."""
    started: list[subprocess.Popen[str]] = []

    def start(
        *args: str, env: Mapping[str, str] | None = None, stdin: bool = False
    ) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [str(PARLEY), *args],
            env=base_env(stack) | dict(env or {}),
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
        process.communicate()


@pytest.fixture
def cli(stack: RunningStack) -> Callable[..., Ran]:
    """`cli(*args, token=None, input=None)`: run a command in this process with CliRunner."""
    runner = CliRunner()

    def run(*args: str, token: str | None = None, input: str | None = None) -> Ran:
        env = {"COLUMNS": COLUMNS, "PARLEY_USER_ADDR": stack.user, "PARLEY_CHAT_ADDR": stack.chat}
        if token is not None:
            env["PARLEY_TOKEN"] = token
        result = runner.invoke(app, list(args), env=env, input=input, prog_name="parley")
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return Ran(result.exit_code, result.stdout, result.stderr)

    return run


# --- terminals -----------------------------------------------------------------------------

_ANSI = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI: colours, cursor moves, erasing
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)"  # OSC: window titles
    r"|\x1b[()][0-9A-Za-z]"  # character sets
    r"|\x1b[=>78]"  # keypad modes, cursor save/restore
)


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


class Terminal:
    """A `parley` process in a pseudo-terminal, read as plain text (escapes removed).

    `expect(pattern)` waits for the pattern after the last match, reading output as it comes;
    nothing else waits on time. `data` holds the bytes exactly as the terminal received them.
    """

    def __init__(self, args: Sequence[str], env: Mapping[str, str]) -> None:
        self.child: pexpect.spawn[bytes] = pexpect.spawn(
            str(PARLEY),
            list(args),
            env=dict(env),
            dimensions=(50, 200),
            timeout=30,
        )
        self.data = b""
        self.raw = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.position = 0

    @property
    def text(self) -> str:
        return strip_ansi(self.raw)

    def _read(self, timeout: float) -> bool:
        """Read what is there (waiting up to `timeout`); False at end of output."""
        try:
            chunk = self.child.read_nonblocking(65536, timeout=timeout)
        except pexpect.TIMEOUT:
            return True
        except pexpect.EOF:
            return False
        self.data += chunk
        self.raw += self._decoder.decode(chunk)
        return True

    def expect(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            text = self.text
            match = regex.search(text, self.position)
            if match is not None:
                self.position = match.end()
                return match
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"timed out waiting for {pattern!r}; the terminal shows:\n{text}")
            if (
                not self._read(min(remaining, 1.0))
                and regex.search(self.text, self.position) is None
            ):
                pytest.fail(
                    f"the process ended before {pattern!r}; the terminal shows:\n{self.text}"
                )

    def prompt(self, room: str) -> None:
        """Wait for the chat prompt to be drawn again after the output so far.

        While prompt_toolkit prints above its prompt the terminal is briefly back in cooked
        mode, where a control key (Ctrl-D) would go to the tty driver instead of the prompt.
        """
        self.expect(rf"{re.escape(room)}(?: \(\d+ sending\))?>")

    def type(self, line: str) -> None:
        """Type a line and press Enter."""
        self.child.send(line + "\r")

    def wait_exit(self, timeout: float = 30) -> int:
        """Read the rest of the output and return the exit status."""
        deadline = time.monotonic() + timeout
        while self._read(max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"the process did not exit; the terminal shows:\n{self.text}")
        self.child.close()
        status = self.child.exitstatus
        if status is None:  # killed by a signal
            return 128 + (self.child.signalstatus or 0)
        return int(status)

    def close(self) -> None:
        if self.child.isalive():
            self.child.terminate(force=True)


@pytest.fixture
def terminal(stack: RunningStack) -> Any:
    """`terminal(*args, token=..., chat_addr=...)`: start `parley` in a pseudo-terminal."""
    opened: list[Terminal] = []

    def start(*args: str, token: str, chat_addr: str | None = None) -> Terminal:
        env = base_env(stack)
        env.update(
            PARLEY_TOKEN=token,
            TERM="xterm",
            # No cursor-position queries: the test does not answer them.
            PROMPT_TOOLKIT_NO_CPR="1",
            PYTHONFAULTHANDLER="1",
        )
        if chat_addr is not None:
            env["PARLEY_CHAT_ADDR"] = chat_addr
        opened.append(Terminal(args, env))
        return opened[-1]

    yield start
    for each in opened:
        each.close()
