"""`parley rooms`: create, list, get, update and delete rooms, and manage their members; and
`parley dm USER_ID`, the interactive chat in the direct room with a user."""

from __future__ import annotations

import asyncio
import itertools
import sys
from typing import Annotated

import typer

from parley.client.cli.chat_connection import chat_client
from parley.client.cli.context import Settings, command, examples
from parley.client.cli.errors import EXIT_USAGE
from parley.client.cli.output import (
    emit_json,
    members_table,
    membership_json,
    print_table,
    printable,
    room_json,
    rooms_table,
    safe_text,
)
from parley.client.rooms import MAX_MEMBER_PAGE_SIZE, MAX_ROOM_PAGE_SIZE, Visibility
from parley.proto import chat_pb2

__all__ = ["DM_EXAMPLES", "dm", "rooms_app"]

rooms_app = typer.Typer(
    name="rooms",
    help="Create, list, change and delete rooms, and manage who is in them (ChatService).",
    epilog=examples(
        "parley rooms create team --title 'The team' --visibility private",
        "parley rooms add team 42",
        "parley rooms list",
        "parley rooms members team",
        "parley dm 42",
        note=(
            "Anyone may read a public room; only its members a private one. Only a room's owner "
            "may change or delete it, or add and remove members (a token with the chat:admin "
            "scope may add and remove members of any room)."
        ),
    ),
    no_args_is_help=True,
)

RoomName = Annotated[
    str, typer.Argument(metavar="ROOM", help="The room's name.", show_default=False)
]
MemberId = Annotated[
    int, typer.Argument(min=1, metavar="USER_ID", help="The user's id.", show_default=False)
]
Limit = Annotated[int | None, typer.Option("--limit", min=1, help="Stop after this many.")]


def _show(settings: Settings, room: chat_pb2.Room) -> None:
    if settings.json:
        emit_json(room_json(room))
    else:
        print_table(rooms_table([room]))


def _said(text: str) -> None:
    print(printable(text))


@rooms_app.command(
    "create",
    epilog=examples(
        "parley rooms create lobby",
        "parley rooms create team --title 'The team' --visibility private",
        note="Names are 1 to 64 of a-z 0-9 - _; names starting with dm- are for direct rooms.",
    ),
)
@command(chat=True, token=True)
def create(
    settings: Settings,
    name: RoomName,
    title: Annotated[str, typer.Option("--title", help="A title, at most 200 characters.")] = "",
    visibility: Annotated[
        Visibility,
        typer.Option(
            "--visibility", case_sensitive=False, help="public: anyone; private: members only."
        ),
    ] = Visibility.PUBLIC,
) -> None:
    """Create a room; you become its owner and first member."""
    with chat_client(settings) as chat:
        _show(settings, chat.create_room(name, title=title, visibility=visibility))


@rooms_app.command(
    "list",
    epilog=examples("parley rooms list", "parley rooms list -o json | jq -r .name"),
)
@command(chat=True, token=True)
def list_rooms(
    settings: Settings,
    page_size: Annotated[
        int,
        typer.Option("--page-size", min=1, max=MAX_ROOM_PAGE_SIZE, help="Rooms fetched per call."),
    ] = 100,
    limit: Limit = None,
) -> None:
    """List the rooms you may read (the public ones and yours) by name, a page at a time."""
    with chat_client(settings) as chat:
        found = itertools.islice(chat.list_rooms(page_size=page_size), limit)
        if settings.json:
            for room in found:
                emit_json(room_json(room))
        else:
            print_table(rooms_table(list(found)))


@rooms_app.command(
    "get",
    epilog=examples("parley rooms get team", "parley rooms get team -o json | jq .member_count"),
)
@command(chat=True, token=True)
def get(settings: Settings, name: RoomName) -> None:
    """Show a room (a private one only to its members)."""
    with chat_client(settings) as chat:
        _show(settings, chat.get_room(name))


@rooms_app.command(
    "update",
    epilog=examples(
        "parley rooms update team --title 'Team (archived)'",
        "parley rooms update team --visibility public",
        note="Made private, the room's streams of users who are not members end.",
    ),
)
@command(chat=True, token=True)
def update(
    settings: Settings,
    name: RoomName,
    title: Annotated[str | None, typer.Option("--title", help="The new title.")] = None,
    visibility: Annotated[
        Visibility | None,
        typer.Option("--visibility", case_sensitive=False, help="The new visibility."),
    ] = None,
) -> None:
    """Change a room's title or visibility (only its owner may)."""
    if title is None and visibility is None:
        raise typer.BadParameter("give --title or --visibility (or both)")
    with chat_client(settings) as chat:
        _show(settings, chat.update_room(name, title=title, visibility=visibility))


@rooms_app.command("delete", epilog=examples("parley rooms delete team"))
@command(chat=True, token=True)
def delete(settings: Settings, name: RoomName) -> None:
    """Delete a room and every message in it (only its owner may)."""
    with chat_client(settings) as chat:
        chat.delete_room(name)
    if settings.json:
        emit_json({"name": name, "deleted": True})
    else:
        _said(f"deleted room {name}")


@rooms_app.command(
    "members",
    epilog=examples("parley rooms members team", "parley rooms members team -o json"),
)
@command(chat=True, token=True)
def members(
    settings: Settings,
    name: RoomName,
    page_size: Annotated[
        int,
        typer.Option(
            "--page-size", min=1, max=MAX_MEMBER_PAGE_SIZE, help="Members fetched per call."
        ),
    ] = 100,
    limit: Limit = None,
) -> None:
    """List the members of a room by user id (the room's owner is marked)."""
    with chat_client(settings) as chat:
        found = itertools.islice(chat.list_members(name, page_size=page_size), limit)
        if settings.json:
            for member in found:
                emit_json(membership_json(member, name))
        else:
            print_table(members_table(list(found), title=safe_text(f"#{name}")))


@rooms_app.command("add", epilog=examples("parley rooms add team 42"))
@command(chat=True, token=True)
def add(settings: Settings, name: RoomName, user_id: MemberId) -> None:
    """Make a user a member of a room (its owner may, or a token with chat:admin)."""
    with chat_client(settings) as chat:
        member = chat.add_member(name, user_id)
    if settings.json:
        emit_json(membership_json(member, name))
    else:
        _said(f"user {member.user_id} is a member of {name}")


@rooms_app.command("remove", epilog=examples("parley rooms remove team 42"))
@command(chat=True, token=True)
def remove(settings: Settings, name: RoomName, user_id: MemberId) -> None:
    """Remove a member from a room (its owner may, or a token with chat:admin)."""
    with chat_client(settings) as chat:
        chat.remove_member(name, user_id)
    if settings.json:
        emit_json({"room": name, "user_id": user_id, "removed": True})
    else:
        _said(f"removed user {user_id} from {name}")


@rooms_app.command("leave", epilog=examples("parley rooms leave team"))
@command(chat=True, token=True)
def leave(settings: Settings, name: RoomName) -> None:
    """Leave a room: end your own membership of it."""
    with chat_client(settings) as chat:
        chat.leave_room(name)
    if settings.json:
        emit_json({"room": name, "left": True})
    else:
        _said(f"left {name}")


@rooms_app.command(
    "dm",
    epilog=examples(
        "parley rooms dm 42",
        'room=$(parley rooms dm 42 -o json | jq -r .name); parley chat send -r "$room" hi',
    ),
)
@command(chat=True, token=True)
def open_dm(settings: Settings, user_id: MemberId) -> None:
    """Open the direct room with a user (created on first use) and show it.

    `parley dm USER_ID` chats in it; scripts pass its name to `parley chat send|tail`.
    """
    with chat_client(settings) as chat:
        _show(settings, chat.open_direct_room(user_id))


DM_EXAMPLES = examples(
    "parley dm 42",
    "parley dm 42 --history 50",
    note="Scripts get the room with `parley rooms dm 42` and use `parley chat send|tail`.",
)


@command(chat=True, token=True)
def dm(
    settings: Settings,
    user_id: MemberId,
    history: Annotated[
        int,
        typer.Option("--history", "-n", min=0, help="Messages of the room to show on joining."),
    ] = 20,
) -> None:
    """Chat with one user in your direct room (private, just the two of you).

    Opens the room (created on first use), then runs the interactive chat in it, as
    `parley chat --room dm-...` would.
    """
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        print(
            "parley: error: the interactive chat needs a terminal; in scripts use "
            "`parley rooms dm USER_ID` for the room, then `parley chat send` and "
            "`parley chat tail`",
            file=sys.stderr,
        )
        raise typer.Exit(EXIT_USAGE)
    with chat_client(settings) as chat:
        room = chat.open_direct_room(user_id)
    from parley.client.cli.interactive import run_chat

    asyncio.run(run_chat(settings, room.name, history))
