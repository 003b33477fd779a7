"""`parley chat`: the interactive chat, and `send`, `tail`, `history`, `who` for scripts."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Annotated, TypeVar

import typer
from rich.table import Table

from parley.client import ConnectionEvent, DeadlineExceeded, HistoryGap, ReconnectPolicy
from parley.client.chat import DEFAULT_ROOM, ChatClient, check_text
from parley.client.cli.chat_connection import (
    async_chat_client,
    chat_client,
    gap_notices,
    reconnect_notices,
)
from parley.client.cli.context import Settings, command, examples, positive
from parley.client.cli.errors import EXIT_USAGE
from parley.client.cli.output import (
    emit_json,
    member_json,
    message_json,
    message_line,
    message_parts,
    notice,
    print_table,
    printable,
    safe_text,
    stdout_console,
)
from parley.proto import chat_pb2
from parley.proto.contract import CHAT_SERVICE

__all__ = ["chat_app"]

_T = TypeVar("_T")

CHAT_EXAMPLES = examples(
    "parley chat --room lobby",
    "parley chat --room lobby --chat-addr 127.0.0.1:50052,127.0.0.1:50053",
    "parley chat send --room lobby 'hello everyone'",
    "parley chat tail --room lobby --history 10",
    "parley chat history --room lobby --last 50",
    "parley chat who --room lobby",
    note=(
        "Chat needs a token whose subject is the id of an existing user: "
        "export PARLEY_TOKEN=$(parley token --sub 1)"
    ),
)

chat_app = typer.Typer(
    name="chat",
    invoke_without_command=True,
)

RoomOption = Annotated[
    str | None,
    typer.Option(
        "--room",
        "-r",
        help=f"The room: 1 to 64 of a-z 0-9 - _ (default {DEFAULT_ROOM}).",
        show_default=False,
    ),
]


def _room(settings: Settings, room: str | None) -> str:
    return room or settings.room or DEFAULT_ROOM


@chat_app.callback(epilog=CHAT_EXAMPLES)
@command(chat=True, token=True)
def chat(
    settings: Settings,
    ctx: typer.Context,
    room: RoomOption = None,
    history: Annotated[
        int,
        typer.Option("--history", "-n", min=0, help="Messages of the room to show on joining."),
    ] = 20,
) -> None:
    """Chat in a room from this terminal: the last messages, then live ones and a prompt.

    Each line typed is sent; /who lists who is here, /quit or Ctrl-D leaves. The session
    reconnects by itself (to the next --chat-addr when one replica is gone) and resumes
    where it was, with nothing missed or shown twice.
    """
    if ctx.invoked_subcommand is not None:
        ctx.obj = dataclasses.replace(settings, room=room or settings.room)
        return
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        print(
            "parley: error: the interactive chat needs a terminal; in scripts use "
            "`parley chat send` and `parley chat tail`",
            file=sys.stderr,
        )
        raise typer.Exit(EXIT_USAGE)
    # Imported here: only the interactive chat needs prompt_toolkit, and every other command
    # starts faster without it.
    from parley.client.cli.interactive import run_chat

    asyncio.run(run_chat(settings, _room(settings, room), history))


# --- send ----------------------------------------------------------------------------------


@chat_app.command(
    "send",
    epilog=examples(
        "parley chat send --room lobby 'hello' 'second message'",
        "printf 'one\\ntwo\\n' | parley chat send --room lobby -o json",
        "make test 2>&1 | tail -n 3 | parley chat send -r builds",
    ),
)
@command(chat=True, token=True)
def send(
    settings: Settings,
    texts: Annotated[
        list[str] | None,
        typer.Argument(
            help="The messages; without any, each non-blank line of stdin is one.",
            metavar="TEXT...",
            show_default=False,
        ),
    ] = None,
    room: RoomOption = None,
) -> None:
    """Send messages, wait until the server has stored each, and print their sequence numbers.

    Messages are stored once each, in order, even across reconnects. Each must be
    acknowledged within --timeout seconds of being sent.
    """
    given = texts or []
    for index, text in enumerate(given, start=1):
        try:
            check_text(text)
        except ValueError as exc:
            raise typer.BadParameter(f"message {index}: {exc}", param_hint="TEXT") from None
    if not given and sys.stdin.isatty():
        raise typer.BadParameter("give the messages, or pipe lines on stdin", param_hint="TEXT")
    asyncio.run(_send(settings, _room(settings, room), given))


async def _send(settings: Settings, room: str, texts: Sequence[str]) -> None:
    timeout = settings.call_timeout
    console = stdout_console()
    policy = ReconnectPolicy(give_up_after=timeout)
    lines = _aiter(texts) if texts else _stdin_lines()
    # At most this many messages in flight: enough to keep the stream busy, few enough to
    # resend quickly after a reconnect.
    in_flight: asyncio.Queue[tuple[str, str] | None] = asyncio.Queue(maxsize=64)
    async with (
        async_chat_client(settings) as client,
        client.session(
            room,
            policy=policy,
            flush_timeout=0,
            on_state=_stderr_notices(),
            on_gap=gap_notices(notice),
        ) as session,
    ):

        async def produce() -> None:
            async for text in lines:
                await in_flight.put((await session.send(text), text))
            await in_flight.put(None)

        async def acknowledge() -> None:
            while (item := await in_flight.get()) is not None:
                client_id, text = item
                try:
                    message = await session.wait_stored(client_id, timeout=timeout)
                except TimeoutError:
                    raise DeadlineExceeded(
                        f"the message {text[:40]!r} was not acknowledged within {timeout:g}s",
                        target=session.target,
                        method=f"/{CHAT_SERVICE}/StreamChat",
                    ) from None
                if settings.json:
                    emit_json(message_json(message))
                else:
                    console.print(message_line(message), soft_wrap=True)

        async def watch() -> None:
            # Reads what the room delivers (only the acknowledgements matter here), so the
            # session's buffer never fills, and raises the session's error the moment it ends,
            # e.g. PERMISSION_DENIED when our membership of a private room is removed while
            # stdin is still open.
            async for _ in session:
                pass

        await until_done(both(produce(), acknowledge()), watch())


async def both(first: Awaitable[None], second: Awaitable[None]) -> None:
    """Run two coroutines together until both finish; when one fails, cancel the other and
    raise its error (not wrapped in an ExceptionGroup)."""
    tasks = [asyncio.ensure_future(first), asyncio.ensure_future(second)]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()  # raises the first failure
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


async def until_done(work: Awaitable[None], watcher: Awaitable[None]) -> None:
    """Run `work` to its end while `watcher` runs beside it; when the watcher fails first,
    cancel the work and raise the watcher's error."""
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(watcher)
    try:
        await asyncio.wait([work_task, watch_task], return_when=asyncio.FIRST_COMPLETED)
        if watch_task.done() and not watch_task.cancelled():
            watch_task.result()  # raises the watcher's failure
        await work_task
    finally:
        for task in (work_task, watch_task):
            task.cancel()
        await asyncio.gather(work_task, watch_task, return_exceptions=True)


async def _aiter(items: Sequence[_T]) -> AsyncIterator[_T]:
    for item in items:
        yield item


async def _stdin_lines() -> AsyncIterator[str]:
    """The non-blank lines of stdin, read as they come by a daemon thread (a blocked read
    must not keep the process alive after Ctrl-C)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | Exception | None] = asyncio.Queue()

    def hand_over(item: str | Exception | None) -> bool:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop has ended: nobody reads any more
            return False
        return True

    def read() -> None:
        try:
            for line in sys.stdin:
                if not hand_over(line):
                    return
        except Exception as exc:  # e.g. bytes that are not UTF-8: report it, do not hang
            hand_over(exc)
            return
        hand_over(None)

    threading.Thread(target=read, name="parley-stdin", daemon=True).start()
    number = 0
    while (item := await queue.get()) is not None:
        if isinstance(item, Exception):
            raise typer.BadParameter(f"cannot read stdin after line {number}: {item}")
        number += 1
        text = item.rstrip("\r\n")
        if not text.strip():
            continue
        try:
            check_text(text)
        except ValueError as exc:
            raise typer.BadParameter(f"line {number} of stdin: {exc}") from None
        yield text


def _stderr_notices() -> Callable[[ConnectionEvent], None]:
    return reconnect_notices(notice)


# --- tail ----------------------------------------------------------------------------------


@chat_app.command(
    "tail",
    epilog=examples(
        "parley chat tail --room lobby",
        "parley chat tail --room lobby --history 20",
        "parley chat tail --room lobby --after 0 --count 3 -o json --wait 30",
        note="Without --history or --after, only messages stored after joining are printed.",
    ),
)
@command(chat=True, token=True)
def tail(
    settings: Settings,
    room: RoomOption = None,
    history: Annotated[
        int | None,
        typer.Option("--history", "-n", min=0, help="First print the room's last N messages."),
    ] = None,
    after: Annotated[
        int | None,
        typer.Option(
            "--after", min=0, help="First print every message after this sequence number."
        ),
    ] = None,
    room_id: Annotated[
        int,
        typer.Option(
            "--room-id",
            min=0,
            help="The room_id of the message --after names: a room deleted and made again "
            "since refuses it (OUT_OF_RANGE) instead of skipping messages.",
        ),
    ] = 0,
    count: Annotated[
        int | None,
        typer.Option("--count", "-c", min=1, help="Exit after N messages (history included)."),
    ] = None,
    wait: Annotated[
        float | None,
        typer.Option(
            "--wait",
            callback=positive,
            help="Give up after this many seconds (DEADLINE_EXCEEDED, exit 14).",
        ),
    ] = None,
) -> None:
    """Print the messages of a room as they arrive, until Ctrl-C or --count.

    The stream reconnects by itself and resumes after the last message printed, so nothing
    is missed or printed twice. Messages the server no longer keeps (its history retention
    deleted them) are reported by one `history gap` line on stderr.
    """
    if history is not None and after is not None:
        raise typer.BadParameter("give --history or --after, not both")
    if room_id and after is None:
        raise typer.BadParameter("--room-id goes with --after")
    asyncio.run(_tail(settings, _room(settings, room), history, (after, room_id), count, wait))


async def _tail(
    settings: Settings,
    room: str,
    history: int | None,
    resume: tuple[int | None, int],
    count: int | None,
    wait: float | None,
) -> None:
    console = stdout_console()
    after, room_id = resume
    printed = 0
    try:
        async with (
            asyncio.timeout(wait),
            async_chat_client(settings) as client,
            client.session(
                room,
                history=history or 0,
                resume_after=after,
                resume_room_id=room_id,
                on_state=_stderr_notices(),
                on_gap=gap_notices(notice),
            ) as session,
        ):
            async for message in session:
                if settings.json:
                    emit_json(message_json(message))
                else:
                    console.print(message_line(message), soft_wrap=True)
                printed += 1
                if count is not None and printed >= count:
                    return
    except TimeoutError:
        wanted = f" of {count}" if count is not None else ""
        raise DeadlineExceeded(
            f"{printed}{wanted} messages arrived within --wait {wait:g}s",
            method=f"/{CHAT_SERVICE}/StreamChat",
        ) from None


# --- history and who -----------------------------------------------------------------------


@chat_app.command(
    "history",
    epilog=examples(
        "parley chat history --room lobby",
        "parley chat history --room lobby --after 100 -o json",
    ),
)
@command(chat=True, token=True)
def history(
    settings: Settings,
    room: RoomOption = None,
    last: Annotated[int, typer.Option("--last", min=1, help="How many of the last messages.")] = 20,
    after: Annotated[
        int | None,
        typer.Option("--after", min=0, help="Instead, every message after this sequence."),
    ] = None,
) -> None:
    """Show a room's stored messages, oldest first: the last 20, or all after a sequence.

    With --after, messages the server no longer keeps (its history retention deleted them)
    are reported by one `history gap` line on stderr.
    """
    name = _room(settings, room)
    with chat_client(settings) as client:
        found: Iterable[chat_pb2.ChatMessage]
        if after is not None:
            found = _messages_after(client, name, after)
        else:
            found = client.recent_messages(name, last)
        if settings.json:
            for message in found:
                emit_json(message_json(message))
            return
        table = Table(title=safe_text(f"#{name}"), title_justify="left")
        table.add_column("Seq", justify="right", no_wrap=True)
        table.add_column("Time", no_wrap=True)
        table.add_column("User", no_wrap=True)
        table.add_column("Text", overflow="fold")
        for message in found:
            parts = dict(message_parts(message))
            table.add_row(
                str(message.sequence),
                parts["time"].strip(),
                safe_text(parts["user"]),
                safe_text(message.text),
            )
        print_table(table)


def _messages_after(client: ChatClient, room: str, after: int) -> Iterator[chat_pb2.ChatMessage]:
    """Every stored message after `after`, with the one `history gap` line on stderr when
    the next one was deleted by the server's history retention (the first page says where
    the room's kept history starts)."""
    page = client.list_messages_page(room, after=after)
    if page.first_sequence > after + 1:
        notice(HistoryGap(room, after, page.first_sequence).describe())
    yield from page.messages
    if page.has_more and page.messages:
        yield from client.list_messages(room, after=page.messages[-1].sequence)


@chat_app.command(
    "who",
    epilog=examples("parley chat who --room lobby", "parley chat who -o json"),
)
@command(chat=True, token=True)
def who(settings: Settings, room: RoomOption = None) -> None:
    """Show who is connected to a room now, on any replica."""
    name = _room(settings, room)
    with chat_client(settings) as client:
        members = client.presence(name)
    if settings.json:
        for member in members:
            emit_json(member_json(member))
        return
    if not members:
        print(printable(f"nobody is connected to #{name}"))
        return
    table = Table(title=safe_text(f"#{name}"), title_justify="left")
    table.add_column("User ID", justify="right", no_wrap=True)
    table.add_column("Name")
    table.add_column("Streams", justify="right", no_wrap=True)
    for member in members:
        table.add_row(str(member.user_id), safe_text(member.user), str(member.stream_count))
    print_table(table)
