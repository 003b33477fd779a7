"""`parley users`: get, list, create, update, delete and import users."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Annotated

import typer
from rich.table import Table

from parley.client import UserClient
from parley.client.cli.context import Settings, address_errors, command, examples
from parley.client.cli.errors import EXIT_PARTIAL
from parley.client.cli.importing import (
    Format,
    HeaderError,
    ImportReport,
    RowReader,
    count_rows,
    format_for,
)
from parley.client.cli.output import (
    emit_json,
    print_table,
    safe_text,
    stderr_console,
    user_json,
    users_table,
)
from parley.proto import user_pb2

__all__ = ["users_app"]

users_app = typer.Typer(
    name="users",
    help="Get, list, create, update, delete and import users (UserService).",
    epilog=examples(
        "parley users list",
        "parley users create --name Ada --email ada@example.com --age 36",
        "parley users import people.csv",
        note="Reading needs any valid token; writing needs the users:write scope.",
    ),
    no_args_is_help=True,
)

# An import is one call: by default it may take this long, not the 10 s of other calls.
IMPORT_TIMEOUT = 600.0

UserId = Annotated[
    int, typer.Argument(min=1, metavar="USER_ID", help="The user's id.", show_default=False)
]


def user_client(settings: Settings) -> UserClient:
    """A UserService client for the run's address, token and timeout."""
    with address_errors("--user-addr / PARLEY_USER_ADDR"):
        return UserClient(
            settings.user_addr,
            token=settings.token,
            timeout=settings.call_timeout,
            tracer_provider=settings.tracer_provider,
        )


def _show(settings: Settings, user: user_pb2.User) -> None:
    if settings.json:
        emit_json(user_json(user))
    else:
        print_table(users_table([user]))


@users_app.command(
    "get",
    epilog=examples("parley users get 42", "parley users get 42 -o json | jq -r .email"),
)
@command(user=True, token=True)
def get(settings: Settings, user_id: UserId) -> None:
    """Show one user."""
    with user_client(settings) as users:
        _show(settings, users.get_user(user_id))


@users_app.command(
    "list",
    epilog=examples(
        "parley users list",
        "parley users list --limit 10 --page-size 5",
        "parley users list -o json | jq -r .email",
    ),
)
@command(user=True, token=True)
def list_users(
    settings: Settings,
    page_size: Annotated[
        int, typer.Option("--page-size", min=1, max=1000, help="Users fetched per call.")
    ] = 100,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Stop after this many users.")
    ] = None,
) -> None:
    """List every user by id, fetching a page at a time.

    With -o json, users are printed as they arrive, one JSON object per line.
    """
    with user_client(settings) as users:
        found = _first(users.list_users(page_size=page_size), limit)
        if settings.json:
            for user in found:
                emit_json(user_json(user))
        else:
            print_table(users_table(list(found)))


def _first(users: Iterator[user_pb2.User], limit: int | None) -> Iterator[user_pb2.User]:
    for count, user in enumerate(users, start=1):
        yield user
        if limit is not None and count >= limit:
            return


@users_app.command(
    "create",
    epilog=examples(
        "parley users create --name Ada --email ada@example.com --age 36",
        "id=$(parley users create --name Bob --email bob@example.com -o json | jq .id)",
    ),
)
@command(user=True, token=True)
def create(
    settings: Settings,
    name: Annotated[str, typer.Option("--name", help="Display name, 1 to 100 characters.")],
    email: Annotated[str, typer.Option("--email", help="Email address, unique.")],
    age: Annotated[int, typer.Option("--age", help="Age in years, 0 to 150.")] = 0,
) -> None:
    """Create a user (needs a token with the users:write scope) and show it with its id."""
    with user_client(settings) as users:
        _show(settings, users.create_user(name=name, email=email, age=age))


@users_app.command(
    "update",
    epilog=examples(
        "parley users update 42 --email ada@example.org",
        "parley users update 42 --name 'Ada L.' --age 37",
    ),
)
@command(user=True, token=True)
def update(
    settings: Settings,
    user_id: UserId,
    name: Annotated[str | None, typer.Option("--name", help="New display name.")] = None,
    email: Annotated[str | None, typer.Option("--email", help="New email address.")] = None,
    age: Annotated[int | None, typer.Option("--age", help="New age.")] = None,
) -> None:
    """Change some fields of a user (needs users:write); the others stay as they are."""
    if name is None and email is None and age is None:
        raise typer.BadParameter("give at least one of --name, --email, --age")
    with user_client(settings) as users:
        _show(settings, users.update_user(user_id, name=name, email=email, age=age))


@users_app.command(
    "delete",
    epilog=examples("parley users delete 42"),
)
@command(user=True, token=True)
def delete(settings: Settings, user_id: UserId) -> None:
    """Delete a user (needs users:write)."""
    with user_client(settings) as users:
        users.delete_user(user_id)
    if settings.json:
        emit_json({"id": user_id, "deleted": True})
    else:
        print(f"deleted user {user_id}")


@users_app.command(
    "import",
    epilog=examples(
        "parley users import people.csv",
        "parley users import people.jsonl -o json",
        "cat people.ndjson | parley users import - --format jsonl",
        note=(
            "A CSV file has a header with the columns name, email and, optionally, age; a "
            'JSON Lines file has one object per line, such as {"name": "Ada", "email": '
            '"ada@example.com", "age": 36}. Other columns and keys are ignored, so the output '
            "of `parley users list -o json` imports as it is.\n\n"
            "Exit code 3 when some rows failed: the report lists each one by its line in the "
            "file, with the status code, the field and the message."
        ),
    ),
)
@command(user=True, token=True)
def import_users(
    settings: Settings,
    file: Annotated[
        str, typer.Argument(help="A .csv, .jsonl or .ndjson file, or - for stdin.", metavar="FILE")
    ],
    fmt: Annotated[
        Format | None,
        typer.Option(
            "--format", case_sensitive=False, help="The file's format; default: by extension."
        ),
    ] = None,
) -> None:
    """Create many users from a CSV or JSON Lines file, streamed in one ImportUsers call.

    Good rows are created and bad ones reported; needs users:write. The whole import must
    finish within --timeout (10 minutes unless given).
    """
    chosen = fmt or format_for(file)
    if chosen is None:
        raise typer.BadParameter(
            "cannot tell the format from the name; add --format csv or --format jsonl",
            param_hint="FILE",
        )
    progress_total: int | None = None
    show_progress = stderr_console().is_terminal
    with _open(file) as stream:
        if show_progress and stream.seekable():
            progress_total = count_rows(stream, chosen)
            stream.seek(0)
        reader = RowReader(stream, chosen)
        try:
            reader.check_header()
        except HeaderError as exc:
            raise typer.BadParameter(str(exc), param_hint="FILE") from None
        timeout = settings.timeout if settings.timeout is not None else IMPORT_TIMEOUT
        with user_client(settings) as users:
            if show_progress:
                reply = _import_with_progress(users, reader, progress_total, timeout)
            else:
                reply = users.import_users(reader, timeout=timeout)
    report = ImportReport.build(reply, reader)
    _print_report(settings, report)
    if report.failed:
        raise typer.Exit(EXIT_PARTIAL)


@contextlib.contextmanager
def _open(file: str) -> Iterator[IO[str]]:
    if file == "-":
        yield sys.stdin
        return
    path = Path(file)
    try:
        stream = path.open(encoding="utf-8", newline="")
    except OSError as exc:
        raise typer.BadParameter(
            f"cannot read {file}: {exc.strerror or exc}", param_hint="FILE"
        ) from None
    with stream:
        yield stream


def _import_with_progress(
    users: UserClient, reader: RowReader, total: int | None, timeout: float
) -> user_pb2.ImportUsersResponse:
    """The import with a progress bar on stderr (only used when stderr is a terminal)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = (
        SpinnerColumn(),
        TextColumn("importing"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rows sent"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=stderr_console(), transient=True) as progress:
        task = progress.add_task("import", total=total)
        # Called from gRPC's sending thread; rich's Progress locks its own state.
        reply = users.import_users(
            reader,
            timeout=timeout,
            on_progress=lambda sent: progress.update(task, completed=sent),
        )
    return reply


def _print_report(settings: Settings, report: ImportReport) -> None:
    if settings.json:
        emit_json(report.as_json())
        return
    summary = f"created {report.created} users, {report.failed} rows failed"
    print(summary)
    if not report.errors:
        return
    table = Table(title="Rows not imported", title_justify="left")
    table.add_column("Line", justify="right", no_wrap=True)
    table.add_column("Code", no_wrap=True)
    table.add_column("Field", no_wrap=True)
    table.add_column("Message", overflow="fold")
    for error in report.errors:
        table.add_row(
            str(error.line), safe_text(error.code), safe_text(error.field), safe_text(error.message)
        )
    print_table(table)
    if report.unlisted:
        print(f"... and {report.unlisted} more rows the server did not list")
