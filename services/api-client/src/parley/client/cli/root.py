"""The root `parley` command: its global options, its help, and its commands."""

from __future__ import annotations

from typing import Annotated

import typer

from parley.client.cli.chat import chat_app
from parley.client.cli.context import (
    GLOBAL_PANEL,
    Output,
    Settings,
    configure_logging,
    positive,
    root_options_help,
)
from parley.client.cli.errors import EXIT_CODES_HELP
from parley.client.cli.health import HEALTH_EXAMPLES, health
from parley.client.cli.rooms import DM_EXAMPLES, dm, rooms_app
from parley.client.cli.token import TOKEN_EXAMPLES, token
from parley.client.cli.users import users_app

__all__ = ["app"]

ROOT_EPILOG = f"""
[bold]Examples[/bold]

  export PARLEY_TOKEN=$(parley token --sub 1 --scope users:write)
  parley users create --name Ada --email ada@example.com --age 36
  parley users list -o json
  parley chat send --room lobby 'hello'
  parley chat tail --room lobby --history 10
  parley chat --room lobby
  parley rooms create team --visibility private && parley rooms add team 2
  parley dm 2
  parley health
  parley --trace users get 42

[bold]Environment[/bold]

  PARLEY_USER_ADDR   UserService address (like --user-addr), default localhost:50051
  PARLEY_CHAT_ADDR   ChatService address(es), comma-separated (like --chat-addr)
  PARLEY_TOKEN       bearer token (like --token)
  PARLEY_TIMEOUT     deadline of each call in seconds (like --timeout)
  OTEL_EXPORTER_OTLP_ENDPOINT
                     where --trace exports its spans, an http:// or https:// URL
                     (OTEL_EXPORTER_OTLP_PROTOCOL: grpc, the default, or http/protobuf)

{EXIT_CODES_HELP}"""

app = typer.Typer(
    name="parley",
    no_args_is_help=True,
    add_completion=False,
    # Failures print one line of their own (see context.guard); a traceback only with --debug.
    pretty_exceptions_enable=False,
)


@app.callback(epilog=ROOT_EPILOG)
def main(
    ctx: typer.Context,
    user_addr: Annotated[
        str | None,
        typer.Option(
            "--user-addr",
            envvar="PARLEY_USER_ADDR",
            show_envvar=False,
            help=root_options_help("user_addr"),
            rich_help_panel=GLOBAL_PANEL,
        ),
    ] = None,
    chat_addr: Annotated[
        str | None,
        typer.Option(
            "--chat-addr",
            envvar="PARLEY_CHAT_ADDR",
            show_envvar=False,
            help=root_options_help("chat_addr"),
            rich_help_panel=GLOBAL_PANEL,
        ),
    ] = None,
    token_value: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="PARLEY_TOKEN",
            show_envvar=False,
            help=root_options_help("token"),
            rich_help_panel=GLOBAL_PANEL,
        ),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            envvar="PARLEY_TIMEOUT",
            show_envvar=False,
            callback=positive,
            help=root_options_help("timeout"),
            rich_help_panel=GLOBAL_PANEL,
        ),
    ] = None,
    output: Annotated[
        Output,
        typer.Option(
            "--output",
            "-o",
            case_sensitive=False,
            help=root_options_help("output"),
            rich_help_panel=GLOBAL_PANEL,
        ),
    ] = Output.TABLE,
    debug: Annotated[
        bool,
        typer.Option("--debug", help=root_options_help("debug"), rich_help_panel=GLOBAL_PANEL),
    ] = False,
    trace: Annotated[
        bool,
        typer.Option("--trace", help=root_options_help("trace"), rich_help_panel=GLOBAL_PANEL),
    ] = False,
) -> None:
    """Talk to a Parley deployment from the command line: users, chat, rooms and health.

    Every command takes the global options, before or after its name. Results print as
    tables, or as JSON Lines with -o json. A failure prints one line on stderr (the status,
    what it means, what to try) and exits with a code scripts can test; see below.
    """
    settings = Settings(
        user_addr=user_addr or None,
        chat_addr=chat_addr or None,
        token=token_value or None,
        timeout=timeout,
        output=output,
        debug=debug,
        trace=trace,
    )
    ctx.obj = settings
    configure_logging(settings)


app.add_typer(users_app)
app.add_typer(chat_app)
app.add_typer(rooms_app)
app.command("dm", epilog=DM_EXAMPLES)(dm)
app.command("health", epilog=HEALTH_EXAMPLES)(health)
app.command("token", epilog=TOKEN_EXAMPLES)(token)
