"""Exit codes, and the one line `parley` prints on stderr when a call fails.

The SDK's errors carry the status code, the server's message and a hint written for Python
callers (`token=...`, `timeout=...`); the line printed here says the same in terms of the
command line: its flags, its environment variables and its other commands.
"""

from __future__ import annotations

import grpc

from parley.client.cli.output import printable
from parley.client.errors import ParleyError, is_connection_lost
from parley.proto.contract import CHAT_SERVICE, ROOM_KEY, USER_SERVICE

__all__ = [
    "EXIT_CODES_HELP",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_PARTIAL",
    "EXIT_RPC_BASE",
    "EXIT_USAGE",
    "describe",
    "exit_code",
]

EXIT_OK = 0
EXIT_FAILED = 1
"""Something other than an RPC failed: a bug, or the machine (run again with --debug)."""
EXIT_USAGE = 2
"""A bad option or argument (click's own code for usage errors)."""
EXIT_PARTIAL = 3
"""The command ran but not everything succeeded (rows of an import, checks of `health`)."""
EXIT_RPC_BASE = 10
"""An RPC failed with gRPC status N: the exit code is 10 + N."""
EXIT_INTERRUPTED = 130
"""Ctrl-C (128 + SIGINT, as shells report it)."""

EXIT_CODES_HELP = """\
[bold]Exit codes[/bold]

  0    success
  1    unexpected failure (run again with --debug for the traceback)
  2    usage error: bad option, argument or input file
  3    partly done: an import with bad rows, a health check not SERVING
  10+N a call failed with gRPC status N, for example
       13 INVALID_ARGUMENT   14 DEADLINE_EXCEEDED   15 NOT_FOUND
       16 ALREADY_EXISTS     17 PERMISSION_DENIED   18 RESOURCE_EXHAUSTED
       19 FAILED_PRECONDITION  24 UNAVAILABLE       26 UNAUTHENTICATED
  130  interrupted (Ctrl-C)"""

# Where a service's address comes from on the command line.
_ADDRESS_SETTING = {
    USER_SERVICE: "--user-addr or PARLEY_USER_ADDR",
    CHAT_SERVICE: "--chat-addr or PARLEY_CHAT_ADDR",
}

# The command-line spelling of the request fields the servers name in their errors.
_FIELD_FLAG = {
    "name": "--name",
    "email": "--email",
    "age": "--age",
    "id": "the user id",
    ROOM_KEY: "--room",
    "room": "--room",
    "page_size": "--page-size",
    "text": "the message text",
}

# The same for the room commands, whose room is an argument.
_ROOM_FIELD_FLAG = {
    "name": "ROOM",
    "room": "ROOM",
    "title": "--title",
    "visibility": "--visibility",
    "user_id": "USER_ID",
    "page_size": "--page-size",
    "page_token": "--page-size",
}
_ROOM_FIELDS_METHODS = frozenset(
    {
        "CreateRoom",
        "GetRoom",
        "ListRooms",
        "UpdateRoom",
        "DeleteRoom",
        "AddMember",
        "RemoveMember",
        "ListMembers",
        "OpenDirectRoom",
    }
)
_OWNER_METHODS = frozenset({"UpdateRoom", "DeleteRoom", "AddMember", "RemoveMember"})
_ROOM_METHODS = frozenset(
    {"CreateRoom", "UpdateRoom", "DeleteRoom", "AddMember", "RemoveMember", "OpenDirectRoom"}
)

_GET_TOKEN = "parley token --sub 1 --scope users:write"


def exit_code(error: ParleyError) -> int:
    """The exit code for a failed call: 10 + its gRPC status code number."""
    number = error.code.value[0]
    return EXIT_RPC_BASE + int(number)


def _service(error: ParleyError) -> tuple[str, str]:
    """The service's full name (`user.UserService`) and short name (`UserService`)."""
    full = error.method.strip("/").split("/", 1)[0]
    if not full or "." not in full:
        return full, full or "the service"
    return full, full.rsplit(".", 1)[1]


def _address_setting(full_name: str) -> str:
    return _ADDRESS_SETTING.get(full_name, "the address flags")


def describe(error: ParleyError, *, timeout: float | None, token_given: bool) -> str:
    """One line for stderr: `parley: CODE: what happened - try: what to do`.

    `timeout` is the deadline the command used (for DEADLINE_EXCEEDED); `token_given` says
    whether the command had a token to send (for UNAUTHENTICATED).
    """
    what, advice = _explain(error, timeout=timeout, token_given=token_given)
    line = f"parley: {error.code.name}: {_one_line(what)}"
    if advice:
        line += f" - try: {_one_line(advice)}"
    return line


def _one_line(text: str) -> str:
    """`text` on one line: control characters (newlines too) escaped, runs of spaces made
    one."""
    return " ".join(printable(text).split())


def _explain(error: ParleyError, *, timeout: float | None, token_given: bool) -> tuple[str, str]:
    """What happened and what to try, for each status code."""
    code = error.code
    full, service = _service(error)
    where = f"{service} at {error.target}" if error.target else service
    message = error.message or "no message"
    if code is grpc.StatusCode.UNAVAILABLE:
        if error.reason == "DEPENDENCY_UNAVAILABLE" or "dependency" in error.metadata:
            return f"{where}: {message}", "retry shortly; `parley health` shows what is down"
        if is_connection_lost(message) and "stream removed" not in message.lower():
            return (
                f"cannot reach {where} - is it running?",
                f"make run, or set {_address_setting(full)}",
            )
        return f"{where}: {message}", "retry; `parley health` shows which services are up"
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        within = f" within {timeout:g}s" if timeout is not None else " in time"
        if error.method.endswith("/StreamChat"):
            return message, "raise --timeout (or --wait), or check `parley health`"
        return f"{where} did not answer{within}", "raise --timeout, or check `parley health`"
    if code is grpc.StatusCode.UNAUTHENTICATED:
        if not token_given or error.reason == "TOKEN_MISSING":
            return (
                "no token was sent",
                f"pass --token or set PARLEY_TOKEN; get one with `{_GET_TOKEN}` "
                "(make run prints one too)",
            )
        if "expired" in message.lower():
            return message, f"get a new token with `{_GET_TOKEN}`"
        return (
            message,
            f"use a token signed for this stack: `{_GET_TOKEN}` in the directory of make run",
        )
    method = error.method.rsplit("/", 1)[-1]
    chat = full == CHAT_SERVICE
    if code is grpc.StatusCode.PERMISSION_DENIED:
        if error.reason == "SUBJECT_NOT_A_USER":
            return message, "chat as a user: `parley token --sub <your user id>`"
        owner_only = error.reason == "NOT_ROOM_OWNER" or (
            chat and method in _OWNER_METHODS and not error.reason
        )
        if owner_only:
            return (
                message,
                "ask the room's owner (`parley rooms get ROOM` names them); adding and "
                "removing members also works with a token with the chat:admin scope",
            )
        if error.reason == "ROOM_ACCESS_DENIED" or (chat and "scope" not in error.metadata):
            return (
                message,
                "if the room exists, it is private: ask its owner to add you (`parley rooms "
                "add ROOM <your user id>`), or pick one of `parley rooms list`",
            )
        scope = error.metadata.get("scope", "users:write")
        return message, f"use a token with that scope: `parley token --sub 1 --scope {scope}`"
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        violations = getattr(error, "field_violations", [])
        if violations:
            names = _ROOM_FIELD_FLAG if method in _ROOM_FIELDS_METHODS else _FIELD_FLAG
            what = "; ".join(f"{v.field}: {v.description}" for v in violations)
            flags = ", ".join(dict.fromkeys(names.get(v.field, v.field) for v in violations))
            return f"invalid {what}", f"fix {flags}"
        return message, "fix the value named in the message"
    if code is grpc.StatusCode.NOT_FOUND:
        if chat:
            return (
                message,
                "check the room (`parley rooms list`) and the user id (`parley users list`)",
            )
        return message, "check the id (`parley users list` shows them)"
    if code is grpc.StatusCode.ALREADY_EXISTS:
        if chat:
            return message, "use another room name (`parley rooms list` shows those taken)"
        return message, "use another email (emails are compared without case)"
    if code is grpc.StatusCode.FAILED_PRECONDITION:
        if error.reason == "UNKNOWN_SENDER":
            return (
                message,
                "create the user (`parley users create`), then `parley token --sub <its id>`",
            )
        if error.reason == "ROOM_OWNER":
            return message, "delete the room instead (`parley rooms delete ROOM`)"
        return message, error.hint
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        if chat and method in _ROOM_METHODS:
            return message, (
                "a room limit was reached: delete rooms (`parley rooms delete ROOM`) or "
                "members you no longer need"
            )
        return message, "slow down, and retry after a pause"
    if code is grpc.StatusCode.UNIMPLEMENTED:
        return (
            f"the server at {error.target} does not serve {error.method or 'this call'}",
            f"check {_address_setting(full)}: it may point at another service",
        )
    advice = error.hint
    if error.request_id:
        advice = f"{advice} (request id {error.request_id})"
    return f"{where}: {message}", advice
