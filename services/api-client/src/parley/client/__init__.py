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

Tracing (OpenTelemetry): a client makes a CLIENT span of every call, named
`package.Service/Method`, and sends its W3C trace context (`traceparent`) in the call's
metadata, so that the server's span joins the trace, when

- it was given a provider: `UserClient(..., tracer_provider=provider)`, or
- the application has installed a global one (`opentelemetry.trace.set_tracer_provider`, or
  the `opentelemetry-instrument` launcher) before the client's first call.

Otherwise its channels get no tracing interceptor at all, and calls cost nothing more. Spans
are children of the span current where the call is made (a root when there is none), and
end when their call does, streams included. The SDK needs only opentelemetry-api; the
application brings the SDK and an exporter (opentelemetry-sdk,
opentelemetry-exporter-otlp). Under `opentelemetry-instrument`, set
`OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=grpc_client,grpc_aio_client`: OpenTelemetry's own gRPC
client instrumentation wraps the SDK's channels too, and breaks paging and the asyncio import.
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
