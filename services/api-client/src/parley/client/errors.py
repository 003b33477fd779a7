"""Exceptions raised by the Parley clients: one class per gRPC status code, each with a hint.

Every failed call raises a `ParleyError` subclass instead of a bare `grpc.RpcError`:

    try:
        users.get_user(42)
    except NotFound:
        ...
    except ParleyError as exc:      # any other failure
        print(exc)                  # one line: code, address, method, message, hint

Attributes of every error: `code` (a `grpc.StatusCode`), `message` (what the server said),
`hint` (what to try), `target` (the address called), `method` (`/user.UserService/GetUser`),
`reason` and `metadata` (from the server's `google.rpc.ErrorInfo`), `request_id` (the
server's `x-request-id`, to find the call in its log). `InvalidArgument` adds
`field_violations` from the `google.rpc.BadRequest` detail.

grpcio sometimes reports a connection that died mid-call as UNKNOWN ("Stream removed") rather
than UNAVAILABLE; such errors are raised as `Unavailable` too (`reported_code` keeps what
grpcio said), so retries and reconnects treat them alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import grpc
from google.rpc import error_details_pb2, status_pb2

from parley.proto.contract import CHAT_SERVICE, FIRST_SEQUENCE_KEY, REQUEST_ID_KEY, RESUME_EXPIRED

__all__ = [
    "AlreadyExists",
    "Cancelled",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "ParleyError",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "UnknownError",
    "error_from_rpc",
]

_DETAILS_KEY = "grpc-status-details-bin"
_REQUEST_ID_KEY = REQUEST_ID_KEY

# What grpcio puts in the details of calls that never reached a server, or lost it.
_CONNECTION_LOST = (
    "failed to connect",
    "connection refused",
    "connections to all backends failing",
    "dns resolution failed",
    "stream removed",
    "connection reset",
    "socket closed",
    "broken pipe",
    "goaway",
    "no address",
    "name resolution",
    "endpoint is closing",
)


class FieldViolation(NamedTuple):
    """One bad request field, from the server's `google.rpc.BadRequest` detail."""

    field: str
    """The field at fault, such as `email` or `x-chat-room`."""
    description: str
    """What is wrong with it, in English."""


class CallContext(NamedTuple):
    """Where a failed call went; used to write hints that name the right address and setting."""

    target: str
    method: str
    address_env: str
    timeout: float | None
    token_sent: bool


class ParleyError(Exception):
    """A call to a Parley service failed. Subclasses name the gRPC status code.

    `str(error)` is a single line: the code, the address and method, the server's message and
    the hint. Codes without a subclass of their own (ABORTED, DATA_LOSS) are raised as
    `ParleyError` itself.
    """

    code: grpc.StatusCode
    """The gRPC status code (UNAVAILABLE for a connection grpcio reported as UNKNOWN)."""

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        target: str = "",
        method: str = "",
        hint: str = "",
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        request_id: str | None = None,
        reported_code: grpc.StatusCode | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code or _CODE_OF.get(type(self), grpc.StatusCode.UNKNOWN)
        self.message = message
        """The server's message (grpcio's, when the call never reached a server)."""
        self.target = target
        """The address the call went to, as given to the client."""
        self.method = method
        """The full method name, such as `/user.UserService/GetUser`."""
        self.hint = hint
        """What to try next, in English."""
        self.reason = reason
        """The `google.rpc.ErrorInfo` reason, such as `RATE_LIMITED`; empty when none came."""
        self.metadata: dict[str, str] = dict(metadata or {})
        """The `google.rpc.ErrorInfo` metadata."""
        self.request_id = request_id
        """The server's `x-request-id` for the call, when it answered at all."""
        self.reported_code = reported_code or self.code
        """The status code exactly as grpcio reported it."""

    @property
    def address(self) -> str:
        """Same as `target`."""
        return self.target

    def __str__(self) -> str:
        where = " ".join(part for part in (self.target, _short(self.method)) if part)
        text = f"{self.code.name}"
        if where:
            text += f" ({where})"
        text += f": {_one_line(self.message) or 'no message'}"
        if self.hint:
            text += f" - hint: {self.hint}"
        return text

    def __reduce__(self) -> tuple[Any, ...]:
        # Keeps errors picklable (for multiprocessing, pytest-xdist) despite keyword arguments.
        return (_rebuild, (type(self), self.message, self.__dict__))


def _rebuild(cls: type[ParleyError], message: str, state: dict[str, Any]) -> ParleyError:
    error = cls(message)
    error.__dict__.update(state)
    return error


class NotFound(ParleyError):
    """NOT_FOUND: the user (or other resource) does not exist."""


class AlreadyExists(ParleyError):
    """ALREADY_EXISTS: the email is taken by another user (emails are compared without case),
    or the room name by another room."""


class InvalidArgument(ParleyError):
    """INVALID_ARGUMENT: a request field breaks a rule; `field_violations` names each one."""

    def __init__(
        self,
        message: str,
        *,
        field_violations: Iterable[FieldViolation] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(message, **kwargs)
        self.field_violations: list[FieldViolation] = list(field_violations)
        """Every bad field with what is wrong with it, from `google.rpc.BadRequest`."""

    @property
    def fields(self) -> list[str]:
        """The names of the bad fields, in the server's order."""
        return [violation.field for violation in self.field_violations]


class Unauthenticated(ParleyError):
    """UNAUTHENTICATED: the token is missing, malformed, expired or signed with another key."""


class PermissionDenied(ParleyError):
    """PERMISSION_DENIED: the token is valid but may not do this (e.g. lacks `users:write`,
    reads a private room it is no member of, or changes a room it does not own)."""


class Unavailable(ParleyError):
    """UNAVAILABLE: nothing answers at the address, the connection dropped, the replica is
    shutting down, or the service's database or Redis is down. Safe to retry idempotent calls."""


class DeadlineExceeded(ParleyError):
    """DEADLINE_EXCEEDED: the call took longer than its timeout."""


class ResourceExhausted(ParleyError):
    """RESOURCE_EXHAUSTED: a limit was hit, such as the chat rate limit; slow down."""


class FailedPrecondition(ParleyError):
    """FAILED_PRECONDITION: the system is not in a state for this call, e.g. chatting with a
    token whose user does not exist."""


class Unimplemented(ParleyError):
    """UNIMPLEMENTED: the server at that address does not serve this method."""


class Internal(ParleyError):
    """INTERNAL: a fault of the server itself; its log has the details under `request_id`."""


class UnknownError(ParleyError):
    """UNKNOWN: the server failed without a status code of its own."""


class Cancelled(ParleyError):
    """CANCELLED: the call was cancelled before it finished."""


class OutOfRange(ParleyError):
    """OUT_OF_RANGE: a chat resume point the room cannot continue from.

    Reason RESUME_POINT_EXPIRED: the messages after it are no longer kept (the deployment's
    history retention deleted them); `first_sequence` is the first one still stored, and
    resuming after `first_sequence - 1` goes on from there, accepting the gap (a
    `ChatSession` does that by itself and reports a `HistoryGap`). Reason
    RESUME_POINT_NOT_IN_ROOM: the point belongs to a room deleted and made again under its
    name; resume from 0.
    """

    @property
    def first_sequence(self) -> int | None:
        """With reason RESUME_POINT_EXPIRED, the room's first stored sequence; else None."""
        if self.reason != RESUME_EXPIRED:
            return None
        value = self.metadata.get(FIRST_SEQUENCE_KEY, "")
        if not value.isdigit() or len(value) > 19:  # an int64 in decimal, nothing else
            return None
        return int(value)


_CLASS_OF: dict[grpc.StatusCode, type[ParleyError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.INTERNAL: Internal,
    grpc.StatusCode.UNKNOWN: UnknownError,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
}
_CODE_OF = {cls: code for code, cls in _CLASS_OF.items()}


def error_from_rpc(error: grpc.RpcError, context: CallContext) -> ParleyError:
    """The `ParleyError` for a failed call of a sync or asyncio grpc channel."""
    code = _call(error, "code") or grpc.StatusCode.UNKNOWN
    message = str(_call(error, "details") or "")
    reason, info, violations = _rich_details(_call(error, "trailing_metadata"))
    # In the headers; in the trailers of a call the server refused before sending headers.
    request_id = _metadata_value(
        _call(error, "initial_metadata"), _REQUEST_ID_KEY
    ) or _metadata_value(_call(error, "trailing_metadata"), _REQUEST_ID_KEY)
    effective = code
    if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL) and _connection_lost(message):
        effective = grpc.StatusCode.UNAVAILABLE
    cls = _CLASS_OF.get(effective, ParleyError)
    kwargs: dict[str, Any] = {
        "code": effective,
        "target": context.target,
        "method": context.method,
        "hint": _hint(effective, message, reason, info, context),
        "reason": reason,
        "metadata": info,
        "request_id": request_id,
        "reported_code": code,
    }
    if cls is InvalidArgument:
        return InvalidArgument(message, field_violations=violations, **kwargs)
    return cls(message, **kwargs)


def is_connection_lost(message: str) -> bool:
    """True when grpcio's details say the connection failed or dropped (not a server verdict)."""
    return _connection_lost(message)


def _connection_lost(message: str) -> bool:
    lowered = message.lower()
    return any(marker in lowered for marker in _CONNECTION_LOST)


def _call(error: grpc.RpcError, name: str) -> Any:
    # Errors of the sync channel are also the call object; their accessors exist at run time
    # although grpc.RpcError declares only some of them.
    accessor = getattr(error, name, None)
    if accessor is None:
        return None
    try:
        return accessor()
    except Exception:  # an accessor of a half-built call object; the rest still helps
        return None


def _metadata_value(metadata: Any, key: str) -> str | None:
    for item_key, value in metadata or ():
        if item_key == key and isinstance(value, str):
            return value
    return None


def _rich_details(
    trailing: Any,
) -> tuple[str, dict[str, str], list[FieldViolation]]:
    """ErrorInfo reason and metadata, and BadRequest field violations, from the trailers."""
    reason = ""
    info: dict[str, str] = {}
    violations: list[FieldViolation] = []
    for key, value in trailing or ():
        if key != _DETAILS_KEY or not isinstance(value, bytes):
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except Exception:  # a malformed detail must not hide the status itself
            continue
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                error_info = error_details_pb2.ErrorInfo()
                detail.Unpack(error_info)
                reason = str(error_info.reason)
                info = {str(k): str(v) for k, v in error_info.metadata.items()}
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
                violations = [
                    FieldViolation(str(v.field), str(v.description))
                    for v in bad_request.field_violations
                ]
    return reason, info, violations


_CHAT = CHAT_SERVICE
# Room calls only a room's owner (or, for members, a chat:admin token) may make.
_OWNER_METHODS = frozenset({"UpdateRoom", "DeleteRoom", "AddMember", "RemoveMember"})
_ROOM_METHODS = frozenset(
    {"CreateRoom", "UpdateRoom", "DeleteRoom", "AddMember", "RemoveMember", "OpenDirectRoom"}
)


def _hint(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    info: Mapping[str, str],
    context: CallContext,
) -> str:
    target, env = context.target, context.address_env
    lowered = message.lower()
    if code == grpc.StatusCode.UNAVAILABLE:
        if "dependency" in info or reason == "DEPENDENCY_UNAVAILABLE":
            what = info.get("dependency", "a dependency")
            return (
                f"the service at {target} runs but {what} is down; retry shortly "
                "(its readiness reports NOT_SERVING meanwhile)"
            )
        if "shutting down" in lowered:
            return "that replica is shutting down; retry, and the call goes to another replica"
        if "stream removed" in lowered or "connection reset" in lowered:
            return (
                f"the connection to {target} dropped (the server stopped or restarted); "
                "retry, and check that it runs (make run)"
            )
        return (
            f"the service at {target} is not running or not reachable: start it (make run) or "
            f"check the address (the target argument or {env})"
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        limit = f" of {context.timeout:g}s" if context.timeout is not None else ""
        return (
            f"the call took longer than its timeout{limit}: raise the timeout (timeout=...) or "
            "check the server's load and readiness"
        )
    if code == grpc.StatusCode.UNAUTHENTICATED:
        if not context.token_sent:
            return (
                "no token was sent: pass token=... or set PARLEY_TOKEN; "
                "mint one with `parley token --sub <user id>`"
            )
        if "expired" in lowered:
            return "the token has expired: mint a new one with `parley token --sub <user id>`"
        return (
            "the token was refused (malformed, signed with another secret, or wrong iss/aud): "
            "mint one for this stack with `parley token --sub <user id>`"
        )
    chat = context.method.startswith(f"/{_CHAT}/")
    method = context.method.rsplit("/", 1)[-1]
    if code == grpc.StatusCode.PERMISSION_DENIED:
        if reason == "SUBJECT_NOT_A_USER" or "subject" in lowered:
            return "chat needs a token whose subject is a numeric user id (`parley token --sub 1`)"
        if reason == "NOT_ROOM_OWNER" or (chat and method in _OWNER_METHODS and not reason):
            return (
                "only the room's owner may do this (adding and removing members also a "
                "token with the chat:admin scope)"
            )
        if reason == "ROOM_ACCESS_DENIED" or (chat and "scope" not in info):
            return (
                "the room is private and the token's user is not a member (or there is no such "
                "room): ask its owner to add you"
            )
        return (
            "the token lacks the scope this call needs: mint one with "
            "`parley token --sub <user id> --scope users:write`"
        )
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return "check the request fields named in the message (see field_violations)"
    if code == grpc.StatusCode.NOT_FOUND:
        if chat:
            return "check the room name and the user id: nothing with it exists"
        return "check the id: nothing with it exists (it may have been deleted)"
    if code == grpc.StatusCode.ALREADY_EXISTS:
        if chat:
            return "the room name is taken: use another one"
        return "the email is taken (emails are compared without case): use another one"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        if chat and method in _ROOM_METHODS:
            return "a limit was reached (such as the rooms one user may own): free some first"
        return "too many requests (e.g. the chat rate limit): slow down and retry after a pause"
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        if reason == "UNKNOWN_SENDER":
            return "the token's user does not exist: create the user first, or use its id as --sub"
        if reason == "DIRECT_ROOM":
            return "a direct room cannot be changed: its two users stay its only members"
        if reason == "ROOM_OWNER":
            return "the owner cannot leave their room: delete it instead (delete_room)"
        return "the system is not in the state this call needs; fix that first, then retry"
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return (
            f"the server at {target} does not serve {context.method or 'this method'}: the "
            f"address (or {env}) points at another service, or the generated code is stale "
            "(run make proto)"
        )
    if code == grpc.StatusCode.INTERNAL:
        return "a server fault: look for the request id in the server's log"
    if code == grpc.StatusCode.OUT_OF_RANGE:
        if reason == RESUME_EXPIRED:
            first = info.get(FIRST_SEQUENCE_KEY, "")
            after = f" after {int(first) - 1}" if first.isdigit() and len(first) <= 19 else ""
            return (
                f"the room no longer keeps the messages after that resume point: resume"
                f"{after} (its first kept message is {first or 'in first_sequence'}), "
                "accepting the gap, or read what is kept with ListMessages"
            )
        if reason == "RESUME_POINT_NOT_IN_ROOM":
            return "the room was deleted and made again since that resume point: resume from 0"
        return "a value is outside the range the server accepts"
    if code == grpc.StatusCode.CANCELLED:
        return "the call was cancelled, by the client or because the server is stopping"
    return "an unexpected failure: look for the request id in the server's log"


def _short(method: str) -> str:
    return method.rsplit("/", 1)[-1]


def _one_line(text: str) -> str:
    return " ".join(text.split())
