"""The `parley-devstack` command line."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from types import FrameType

from parley.devstack.banner import banner
from parley.devstack.errors import DevstackError
from parley.devstack.ports import free_ports
from parley.devstack.stack import DEFAULT_PORTS, Ports, Stack, StackConfig, unique_redis_prefix

__all__ = ["main"]

_log = logging.getLogger("parley.devstack")

_PORT_HELP = {
    "postgres": "embedded Postgres",
    "redis": "embedded Redis",
    "user": "UserService gRPC",
    "chat": "ChatService gRPC",
    "chat2": "second ChatService replica gRPC",
    "user_metrics": "UserService metrics",
    "chat_metrics": "ChatService metrics",
    "chat2_metrics": "second ChatService replica metrics",
}

_SUPERVISE_INTERVAL = 0.2


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; unwinds to the code that stops the stack."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}")
    return port


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return seconds


def _port_flag(field: str) -> str:
    return f"--{field.replace('_', '-')}-port"


def _port_variable(field: str) -> str:
    return f"PARLEY_DEVSTACK_{field.upper()}_PORT"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parley-devstack",
        description="Run a complete local Parley stack in the foreground.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run",
        usage="parley-devstack run [options] [-- COMMAND [ARG ...]]",
        help=(
            "start Postgres, Redis, UserService and two ChatService replicas; stop them on Ctrl-C"
        ),
        description=(
            "Start the stack and keep it running until Ctrl-C or SIGTERM. Postgres and Redis "
            "are embedded unless PARLEY_DATABASE_URL or PARLEY_REDIS_URL is set. With "
            "'-- COMMAND', run COMMAND against the stack instead, then stop the stack and exit "
            "with COMMAND's exit code; COMMAND gets PARLEY_USER_ADDR, PARLEY_CHAT_ADDR, "
            "PARLEY_CHAT2_ADDR, PARLEY_USER_METRICS_ADDR, PARLEY_CHAT_METRICS_ADDR, "
            "PARLEY_CHAT2_METRICS_ADDR, PARLEY_DATABASE_URL, PARLEY_REDIS_URL, "
            "PARLEY_REDIS_PREFIX (when set), PARLEY_JWT_SECRET, PARLEY_TOKEN and "
            "PARLEY_TOKEN_READONLY."
        ),
    )
    where = run.add_mutually_exclusive_group()
    where.add_argument(
        "--data-dir",
        type=Path,
        default=Path(".parley"),
        metavar="DIR",
        help="where the data lives between runs (default: .parley)",
    )
    where.add_argument(
        "--ephemeral",
        action="store_true",
        help=(
            "use a fresh temporary data dir, free ports and a Redis key prefix of its own "
            "(PARLEY_REDIS_PREFIX=parley-e2e-<random>); remove the data dir afterwards"
        ),
    )
    for field in (f.name for f in fields(Ports)):
        default = getattr(DEFAULT_PORTS, field)
        run.add_argument(
            _port_flag(field),
            type=_port,
            metavar="PORT",
            help=(
                f"{_PORT_HELP[field]} port (default: ${_port_variable(field)}, else {default}; "
                "a free one with --ephemeral; 0 for any free one)"
            ),
        )
    run.add_argument(
        "--start-timeout",
        type=_seconds,
        default=60.0,
        metavar="SECONDS",
        help="how long each part of the stack may take to become ready (default: 60)",
    )
    return parser


def _resolve_ports(
    args: argparse.Namespace, parser: argparse.ArgumentParser, ephemeral: bool
) -> Ports:
    chosen: dict[str, int] = {}
    for field in (f.name for f in fields(Ports)):
        value: int | None = getattr(args, f"{field}_port")
        variable = _port_variable(field)
        if value is None and os.environ.get(variable, "").strip():
            try:
                value = _port(os.environ[variable].strip())
            except argparse.ArgumentTypeError as exc:
                parser.error(f"{variable}: {exc}")
        if value is None:
            value = 0 if ephemeral else getattr(DEFAULT_PORTS, field)
        chosen[field] = value
    unset = [field for field, port in chosen.items() if port == 0]
    chosen.update(zip(unset, free_ports(len(unset)), strict=True))
    return Ports(**chosen)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _raise_interrupted(signum: int, _frame: FrameType | None) -> None:
    """The first SIGINT or SIGTERM unwinds to the clean-up; any later one is ignored."""
    for stop_signal in _STOP_SIGNALS:
        signal.signal(stop_signal, signal.SIG_IGN)
    raise Interrupted(signum)


_Handler = Callable[[int, FrameType | None], object] | int | None


@contextmanager
def _signal_handlers(handler: _Handler) -> Iterator[None]:
    """Handle SIGINT and SIGTERM with `handler` inside the block."""
    previous = {signum: signal.signal(signum, handler) for signum in _STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _run_command(command: Sequence[str], env: dict[str, str]) -> int:
    """Run `command` in the foreground and return its exit status.

    It shares our process group, so a terminal's Ctrl-C reaches it directly; we only wait for
    it. SIGTERM sent to us is passed on to it.
    """
    child: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _frame: FrameType | None) -> None:
        if child is None:
            _raise_interrupted(signum, _frame)
        elif signum == signal.SIGTERM:
            child.send_signal(signum)

    with _signal_handlers(forward):
        try:
            child = subprocess.Popen(list(command), env=env)
        except OSError as exc:
            _log.error("error: cannot run %s: %s", command[0], exc.strerror)
            return 127
        return _exit_status(child.wait())


def _supervise(stack: Stack) -> int:
    """Block until a process of the stack exits (an error) or a signal interrupts us."""
    while True:
        exited = stack.first_exited()
        if exited is not None:
            _log.error(
                "error: %s exited with %s; stopping the stack", exited.name, exited.describe_exit()
            )
            return 1
        time.sleep(_SUPERVISE_INTERVAL)


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser, command: list[str]) -> int:
    ephemeral: bool = args.ephemeral
    ports = _resolve_ports(args, parser, ephemeral)
    data_dir = (
        Path(tempfile.mkdtemp(prefix="parley-devstack-")) if ephemeral else args.data_dir.absolute()
    )
    stack = Stack(
        StackConfig(
            data_dir=data_dir,
            ports=ports,
            environ=dict(os.environ),
            durable=not ephemeral,
            start_timeout=args.start_timeout,
            redis_prefix=unique_redis_prefix() if ephemeral else None,
        )
    )
    with _signal_handlers(_raise_interrupted):
        try:
            return _start(stack, command)
        except Interrupted as interrupt:
            return 128 + interrupt.signum if command else 0
        except DevstackError as exc:
            _log.error("error: %s", exc)
            return 1
        finally:
            _stop(stack)
            if ephemeral:
                shutil.rmtree(data_dir, ignore_errors=True)


def _start(stack: Stack, command: list[str]) -> int:
    """Start the stack, then run `command` against it or, without one, keep it running."""
    endpoints = stack.start()
    if command:
        code = _run_command(command, {**os.environ, **endpoints.command_env()})
        exited = stack.first_exited()
        if exited is not None:
            _log.warning(
                "%s exited with %s while %s ran", exited.name, exited.describe_exit(), command[0]
            )
        return code
    secret_from_env = bool(os.environ.get("PARLEY_JWT_SECRET", "").strip())
    print(banner(endpoints, stack.data_dir, secret_from_env=secret_from_env), flush=True)
    return _supervise(stack)


def _stop(stack: Stack) -> None:
    """Stop the stack with SIGINT and SIGTERM ignored, so that a second Ctrl-C cannot cut it short.

    A signal arriving just before they are ignored interrupts this once; it then starts over.
    """
    while True:
        try:
            for stop_signal in _STOP_SIGNALS:
                signal.signal(stop_signal, signal.SIG_IGN)
            stack.stop()
            return
        except Interrupted:
            continue


def _configure_logging() -> None:
    """Our progress and errors go to stderr, each line prefixed with the program name."""
    if not _log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("parley-devstack: %(message)s"))
        _log.addHandler(handler)
    _log.setLevel(logging.INFO)
    _log.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    command: list[str] | None = None
    if "--" in arguments:
        split = arguments.index("--")
        arguments, command = arguments[:split], arguments[split + 1 :]
    parser = build_parser()
    args = parser.parse_args(arguments)
    if command == []:
        parser.error("'--' must be followed by a command to run")
    _configure_logging()
    try:
        return _run(args, parser, command or [])
    except KeyboardInterrupt:  # before our own handlers were in place; nothing runs yet
        return 130
