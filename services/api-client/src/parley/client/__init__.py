"""The Parley Python SDK (and the `parley` command line built on it).

Sync clients:

    from parley.client import UserClient, ChatClient

    with UserClient(token=token) as users:            # $PARLEY_USER_ADDR or localhost:50051
        user = users.create_user(name="Ada", email="ada@example.com", age=36)
        for each in users.list_users(page_size=100):  # every page, no tokens to handle
            ...

asyncio clients and a live chat session:

    from parley.client import AsyncChatClient

    async with AsyncChatClient("127.0.0.1:50052,127.0.0.1:50053", token=token) as chat:
        async with chat.session("general", history=20) as session:
            await session.send("hello")
            async for message in session:
                ...

Rooms, private rooms and direct rooms:

    with ChatClient(token=token) as chat:
        chat.create_room("team", title="Team", visibility="private")
        chat.add_member("team", 42)
        dm = chat.open_direct_room(42)               # dm-<low id>-<high id>, private

Every call carries `authorization: Bearer <token>` (from `token=`, a `TokenProvider`, or
$PARLEY_TOKEN), has a deadline (10 s unless `timeout=` says otherwise), and raises a
`ParleyError` subclass with a hint when it fails. Idempotent calls are retried on
UNAVAILABLE; channels use round_robin and keepalive.
"""

from parley.client._base import HealthStatus
from parley.client._channel import DEFAULT_TIMEOUT
from parley.client.chat import AsyncChatClient, ChatClient
from parley.client.errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ParleyError,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    UnknownError,
)
from parley.client.rooms import MemberPage, RoomPage, Visibility, VisibilityName
from parley.client.session import (
    ChatSession,
    ConnectionEvent,
    ConnectionState,
    GapCallback,
    HistoryGap,
    ReconnectPolicy,
    StateCallback,
)
from parley.client.tokens import RefreshingToken, TokenProvider, mint_token
from parley.client.users import (
    AsyncUserClient,
    ImportRow,
    NewUser,
    ProgressCallback,
    UserClient,
    UserPage,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "AlreadyExists",
    "AsyncChatClient",
    "AsyncUserClient",
    "Cancelled",
    "ChatClient",
    "ChatSession",
    "ConnectionEvent",
    "ConnectionState",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "GapCallback",
    "HealthStatus",
    "HistoryGap",
    "ImportRow",
    "Internal",
    "InvalidArgument",
    "MemberPage",
    "NewUser",
    "NotFound",
    "OutOfRange",
    "ParleyError",
    "PermissionDenied",
    "ProgressCallback",
    "ReconnectPolicy",
    "RefreshingToken",
    "ResourceExhausted",
    "RoomPage",
    "StateCallback",
    "TokenProvider",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "UnknownError",
    "UserClient",
    "UserPage",
    "Visibility",
    "VisibilityName",
    "mint_token",
]
