"""What every command shares: the global options, resolved into `Settings`, and the guard that
turns failures into one line on stderr and an exit code.

The global options (`--user-addr`, `--chat-addr`, `--token`, `--timeout`, `--output`,
`--debug`, `--trace`) are accepted before the command (`parley -o json users list`) and after
it (`parley users list -o json`); a value given after the command wins. Environment variables
(`PARLEY_USER_ADDR`, `PARLEY_CHAT_ADDR`, `PARLEY_TOKEN`, `PARLEY_TIMEOUT`) are read by the root
options only, so that they never override a flag given before the command.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Concatenate, ParamSpec, TypeVar, cast

import typer
from opentelemetry.trace import TracerProvider

from parley.client import DEFAULT_TIMEOUT
from parley.client.cli.errors import EXIT_FAILED, EXIT_USAGE, describe, exit_code
from parley.client.cli.output import printable
from parley.client.errors import ParleyError
from parley.client.tokens import resolve_token

__all__ = [
    "GLOBAL_PANEL",
    "address_errors",
    "examples",
    "Output",
    "Settings",
    "command",
    "fail",
    "guard",
]

GLOBAL_PANEL = "Global options (also accepted before the command)"

P = ParamSpec("P")
R = TypeVar("R")


class Output(enum.StrEnum):
    """How results are printed."""

    TABLE = "table"
    """Rich tables for humans (readable lines for streams such as `chat tail`)."""
    JSON = "json"
    """JSON Lines: one JSON object per line, for scripts."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """The global options of one run, as given (None: not given, the SDK's default)."""

    user_addr: str | None = None
    chat_addr: str | None = None
    token: str | None = None
    timeout: float | None = None
    output: Output = Output.TABLE
    debug: bool = False
    trace: bool = False
    room: str | None = None
    """The room given to `parley chat` itself, the default of its subcommands."""
    tracer_provider: TracerProvider | None = None
    """The provider of the calls' spans once `--trace` has started tracing (see cli.tracing)."""

    @property
    def call_timeout(self) -> float:
        """The deadline of each call, in seconds."""
        return self.timeout if self.timeout is not None else DEFAULT_TIMEOUT

    @property
    def json(self) -> bool:
        return self.output is Output.JSON

    @property
    def has_token(self) -> bool:
        """True when a token will be sent (given here, or in PARLEY_TOKEN for the SDK)."""
        return resolve_token(self.token) is not None

    def merged(self, **given: Any) -> Settings:
        """These settings with the values that were given (not None) replaced."""
        changes = {name: value for name, value in given.items() if value is not None}
        for flag in _FLAGS:
            if given.get(flag) is False:
                changes.pop(flag, None)  # a flag left off after the command keeps the root's
        return dataclasses.replace(self, **changes)


_FLAGS = ("debug", "trace")
"""The global options that are flags: given after the command, they can only turn on."""


def examples(*commands: str, note: str = "") -> str:
    """A command's epilog: an Examples block of indented commands, then an optional note.

    It starts with a newline because typer dedents an epilog from its second line on, which
    would otherwise strip the indentation of the commands.
    """
    text = "\n[bold]Examples[/bold]\n\n" + "\n".join(f"  {line}" for line in commands)
    return f"{text}\n\n{note}" if note else text


def positive(value: float | None) -> float | None:
    """Option callback: a number of seconds must be more than zero."""
    if value is not None and value <= 0:
        raise typer.BadParameter(f"must be more than 0, got {value:g}")
    return value


# The per-command spelling of each global option: no environment variable (the root option
# reads it) and no default, so that only a value typed after the command overrides.
_HELP = {
    "user_addr": "UserService address host:port (env PARLEY_USER_ADDR; default localhost:50051).",
    "chat_addr": (
        "ChatService address host:port, or several separated by commas, tried in turn "
        "(env PARLEY_CHAT_ADDR; default localhost:50052)."
    ),
    "token": "Bearer token (env PARLEY_TOKEN); get one with `parley token`.",
    "timeout": (
        f"Deadline of each call in seconds (env PARLEY_TIMEOUT; default {DEFAULT_TIMEOUT:g})."
    ),
    "output": "table for people, json for scripts (JSON Lines: one object per line).",
    "debug": "Show tracebacks and the SDK's debug log.",
    "trace": (
        "Trace every call: print `trace <trace id> <method>` on stderr as each starts, and "
        "export the spans over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set."
    ),
}

_COMMAND_OPTIONS: dict[str, Any] = {
    "user_addr": Annotated[
        str | None,
        typer.Option("--user-addr", help=_HELP["user_addr"], rich_help_panel=GLOBAL_PANEL),
    ],
    "chat_addr": Annotated[
        str | None,
        typer.Option("--chat-addr", help=_HELP["chat_addr"], rich_help_panel=GLOBAL_PANEL),
    ],
    "token": Annotated[
        str | None,
        typer.Option("--token", help=_HELP["token"], rich_help_panel=GLOBAL_PANEL),
    ],
    "timeout": Annotated[
        float | None,
        typer.Option(
            "--timeout", callback=positive, help=_HELP["timeout"], rich_help_panel=GLOBAL_PANEL
        ),
    ],
    "output": Annotated[
        Output | None,
        typer.Option(
            "--output",
            "-o",
            case_sensitive=False,
            help=_HELP["output"],
            rich_help_panel=GLOBAL_PANEL,
        ),
    ],
    "debug": Annotated[
        bool,
        typer.Option("--debug", help=_HELP["debug"], rich_help_panel=GLOBAL_PANEL),
    ],
    "trace": Annotated[
        bool,
        typer.Option("--trace", help=_HELP["trace"], rich_help_panel=GLOBAL_PANEL),
    ],
}

_CONTEXT_PARAMETER = "parley_context"


def root_options_help(name: str) -> str:
    """The help of a global option, for the root callback."""
    return _HELP[name]


def command(
    *, user: bool = False, chat: bool = False, token: bool = False
) -> Callable[[Callable[Concatenate[Settings, P], R]], Callable[P, R]]:
    """Decorate a command: it receives the run's `Settings` as its first argument, accepts the
    global options after its name, and runs inside `guard`.

    `user`, `chat` and `token` say which of `--user-addr`, `--chat-addr` and `--token` the
    command uses; `--timeout`, `--output`, `--debug` and `--trace` come with every command.
    """
    names = [
        name
        for name, wanted in (("user_addr", user), ("chat_addr", chat), ("token", token))
        if wanted
    ] + ["timeout", "output", "debug", "trace"]

    def decorate(func: Callable[Concatenate[Settings, P], R]) -> Callable[P, R]:
        signature = inspect.signature(func, eval_str=True)
        own = list(signature.parameters.values())
        if not own or own[0].name != "settings":
            raise TypeError(f"{func.__name__} must take `settings: Settings` first")
        # The click context, to hand settings on to subcommands: the command's own
        # `typer.Context` parameter when it has one, else one added here.
        own_context = next((p.name for p in own if p.annotation is typer.Context), None)
        added = [
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                annotation=_COMMAND_OPTIONS[name],
                default=False if name in _FLAGS else None,
            )
            for name in names
        ]
        if own_context is None:
            added.insert(
                0,
                inspect.Parameter(
                    _CONTEXT_PARAMETER, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context
                ),
            )
        parameters = own[1:] + added

        @functools.wraps(func)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            # typer hands over click's context object, which typer.Context only annotates.
            if own_context is None:
                ctx = cast(typer.Context, kwargs.pop(_CONTEXT_PARAMETER))
            else:
                ctx = cast(typer.Context, kwargs[own_context])
            given = {name: kwargs.pop(name) for name in names}
            base = ctx.obj if isinstance(ctx.obj, Settings) else Settings()
            settings = base.merged(**given)
            ctx.obj = settings  # subcommands of a group see what the group was given
            configure_logging(settings)
            with guard(settings):
                if settings.trace and settings.tracer_provider is None:
                    settings = ctx.obj = start_tracing(ctx, settings)
                return func(settings, *args, **kwargs)

        # typer reads the parameters from the signature and the type hints.
        wrapper.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters} | {
            "return": signature.return_annotation
        }
        return wrapper

    return decorate


def start_tracing(ctx: typer.Context, settings: Settings) -> Settings:
    """Turns `--trace` on for the rest of the run (see parley.client.cli.tracing): `settings`
    with the provider the clients are to use. The spans are sent when the whole command ends.
    Raises ValueError for an OTEL_* variable that is not valid."""
    # Imported here: the OpenTelemetry SDK only loads for --trace.
    from parley.client.cli.tracing import Export, Tracing

    tracing = Tracing(Export.from_env(os.environ))
    ctx.find_root().call_on_close(tracing.finish)
    return dataclasses.replace(settings, tracer_provider=tracing.provider)


@contextmanager
def address_errors(flag: str) -> Iterator[None]:
    """Report an address the SDK cannot parse as a usage error of the flag it came from."""
    try:
        yield
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=flag) from None


class _PrintableFormatter(logging.Formatter):
    """Log records with `printable` applied to each line (they quote servers' messages)."""

    def format(self, record: logging.LogRecord) -> str:
        return _printable_lines(super().format(record))


def _printable_lines(text: str) -> str:
    return "\n".join(printable(line) for line in text.split("\n"))


def configure_logging(settings: Settings) -> None:
    """With --debug, show the SDK's log (reconnects, retries) on stderr."""
    if settings.debug:
        handler = logging.StreamHandler()
        handler.setFormatter(_PrintableFormatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logging.basicConfig(handlers=[handler])
        logging.getLogger("parley").setLevel(logging.DEBUG)


def fail(line: str, code: int, *, settings: Settings | None = None) -> typer.Exit:
    """Print `line` on stderr (after the traceback being handled, with --debug) and return the
    Exit to raise. Control characters in either are printed as escapes."""
    if settings is not None and settings.debug and sys.exc_info()[1] is not None:
        print(_printable_lines(traceback.format_exc()), end="", file=sys.stderr)
    print(printable(line), file=sys.stderr, flush=True)
    return typer.Exit(code)


@contextmanager
def guard(settings: Settings) -> Iterator[None]:
    """Turn what the body raises into one line on stderr and an exit code.

    Click's own exceptions (usage errors, Exit, Abort) and KeyboardInterrupt pass through:
    typer prints usage errors itself, and exits with 130 on Ctrl-C.
    """
    try:
        yield
    except (typer.Exit, typer.Abort, typer.TyperException, BrokenPipeError):
        raise
    except ParleyError as error:
        line = describe(error, timeout=settings.call_timeout, token_given=settings.has_token)
        raise fail(line, exit_code(error), settings=settings) from None
    except ValueError as error:
        # The SDK checks arguments (addresses, page sizes, message texts) with ValueError.
        raise fail(f"parley: error: {error}", EXIT_USAGE, settings=settings) from None
    except Exception as error:
        line = f"parley: unexpected error: {type(error).__name__}: {error}"
        if not settings.debug:
            line += " (run again with --debug for the traceback)"
        raise fail(line, EXIT_FAILED, settings=settings) from None
