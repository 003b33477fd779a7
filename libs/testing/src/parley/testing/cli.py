"""The `parley` command line as the SDK's CLI tests run it: the installed entry point as a
subprocess (`run`) or in a pseudo-terminal (`Terminal`), or the typer app in the test's own
process (`invoke`, fast: no interpreter start-up).

`invoke` needs the SDK's `cli` extra (typer), a dev dependency of the workspace.
"""

from __future__ import annotations

import codecs
import fcntl
import json
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

__all__ = ["COLUMNS", "PARLEY", "Ran", "Terminal", "command_env", "invoke", "run", "strip_ansi"]

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


def command_env(
    user_addr: str, chat_addr: str, changes: Mapping[str, str | None] | None = None
) -> dict[str, str]:
    """The environment of a `parley` process: the test's environment without the variables
    that would change what the command talks to or prints, the services' addresses, and
    `changes` (a variable given as None is taken out)."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
    env.update(
        COLUMNS=COLUMNS,
        PARLEY_USER_ADDR=user_addr,
        PARLEY_CHAT_ADDR=chat_addr,
        PYTHONWARNINGS="error",
    )
    for key, value in (changes or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run(
    args: Sequence[str], env: Mapping[str, str], *, input: str | None = None, timeout: float = 60
) -> Ran:
    """Runs the entry point to its end (stdin is /dev/null unless there is `input`)."""
    done = subprocess.run(
        [str(PARLEY), *args],
        env=dict(env),
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=None if input is not None else subprocess.DEVNULL,
    )
    return Ran(done.returncode, done.stdout, done.stderr)


def invoke(
    args: Sequence[str],
    *,
    user_addr: str,
    chat_addr: str,
    token: str | None = None,
    input: str | None = None,
) -> Ran:
    """Runs a command in this process with typer's CliRunner; an exception other than an exit
    is raised here."""
    from typer.testing import CliRunner

    from parley.client.cli import app

    env = {"COLUMNS": COLUMNS, "PARLEY_USER_ADDR": user_addr, "PARLEY_CHAT_ADDR": chat_addr}
    if token is not None:
        env["PARLEY_TOKEN"] = token
    result = CliRunner().invoke(app, list(args), env=env, input=input, prog_name="parley")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Ran(result.exit_code, result.stdout, result.stderr)


# --- terminals -----------------------------------------------------------------------------

_ANSI = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI: colours, cursor moves, erasing
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)"  # OSC: window titles
    r"|\x1b[()][0-9A-Za-z]"  # character sets
    r"|\x1b[=>78]"  # keypad modes, cursor save/restore
)


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


# Run first in the new session: the terminal on stdin becomes its controlling one, then the
# process becomes `parley` (argv[1]).
_TAKE_THE_TERMINAL = (
    "import fcntl, os, sys, termios; "
    "fcntl.ioctl(0, termios.TIOCSCTTY, 0); os.execv(sys.argv[1], sys.argv[1:])"
)


class Terminal:
    """A `parley` process in a pseudo-terminal of 50 rows and 200 columns (an xterm that
    answers no cursor-position queries), read as plain text (escapes removed).

    `expect(pattern)` waits for the pattern after the last match, reading output as it comes;
    nothing else waits on time. `data` holds the bytes exactly as the terminal received them.

    The process is not forked from this one (as pexpect would): a fork() runs grpc's fork
    handlers, which can hang for good in a process with grpc channels open. subprocess starts
    it without them, in a session of its own whose controlling terminal it then takes (see
    _TAKE_THE_TERMINAL), so that Ctrl-C outside the prompt is a SIGINT as in a real terminal.
    """

    def __init__(self, args: Sequence[str], env: Mapping[str, str]) -> None:
        env = {**env, "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1", "PYTHONFAULTHANDLER": "1"}
        self.fd, terminal = os.openpty()
        try:
            fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
            self.process = subprocess.Popen(
                [sys.executable, "-c", _TAKE_THE_TERMINAL, str(PARLEY), *args],
                env=env,
                stdin=terminal,
                stdout=terminal,
                stderr=terminal,
                start_new_session=True,
            )
        except BaseException:
            os.close(self.fd)
            raise
        finally:
            os.close(terminal)
        self.data = b""
        self.raw = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.position = 0
        self._ended = False

    @property
    def text(self) -> str:
        return strip_ansi(self.raw)

    def _read(self, timeout: float) -> bool:
        """Read what is there (waiting up to `timeout`); False at end of output."""
        if self._ended:
            return False
        readable, _, _ = select.select([self.fd], [], [], max(timeout, 0.0))
        if not readable:
            return True
        try:
            chunk = os.read(self.fd, 65536)
        except OSError:  # EIO: every process has closed the terminal
            chunk = b""
        if not chunk:
            self._ended = True
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

    def send(self, text: str) -> None:
        """Type `text` as it is."""
        os.write(self.fd, text.encode())

    def type(self, line: str) -> None:
        """Type a line and press Enter."""
        self.send(line + "\r")

    def sendcontrol(self, key: str) -> None:
        """Press Ctrl and `key` ("d": Ctrl-D)."""
        self.send(chr(ord(key.lower()) & 0x1F))

    def sendintr(self) -> None:
        """Press Ctrl-C."""
        self.sendcontrol("c")

    def wait_exit(self, timeout: float = 30) -> int:
        """Read the rest of the output and return the exit status (128 + N for signal N)."""
        deadline = time.monotonic() + timeout
        while self._read(max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"the process did not exit; the terminal shows:\n{self.text}")
        try:
            code = self.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"the process closed the terminal but did not exit:\n{self.text}")
        return 128 - code if code < 0 else code

    def close(self) -> None:
        """Kill the process if it still runs; close the terminal."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
