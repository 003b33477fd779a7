"""The wire values of Parley that the .proto files can only name in comments.

Hand-written, beside the generated code (`make proto` leaves it alone): the one definition
of each, for the servers, the SDK, the benchmark, the image check and the end-to-end tests.
tests/contract checks these values against the .proto files.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from parley.proto import chat_pb2, user_pb2

__all__ = [
    "CHAT_SERVICE",
    "DEFAULT_ROOM",
    "EXPLICIT_IMPORT_COMMIT",
    "FIRST_SEQUENCE_KEY",
    "HEALTH_SERVICE",
    "IMPORT_COMMIT_KEY",
    "IDEMPOTENT_METHODS",
    "MAX_CLIENT_MESSAGE_ID",
    "MAX_TEXT_BYTES",
    "MAX_TITLE_CHARS",
    "NEXT_PAGE_TOKEN_KEY",
    "REQUEST_ID_KEY",
    "RESUME_EXPIRED",
    "RESUME_KEY",
    "ROOM_ID_KEY",
    "ROOM_KEY",
    "USER_SERVICE",
    "service_config",
]

# The full names of the services, as the generated descriptors give them.
USER_SERVICE = user_pb2.DESCRIPTOR.services_by_name["UserService"].full_name
CHAT_SERVICE = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name
HEALTH_SERVICE = "grpc.health.v1.Health"

# Request metadata of every call: a client's id for it, echoed in the response's initial
# metadata (the server makes one up when none or a bad one is sent).
REQUEST_ID_KEY = "x-request-id"
# ListUsers' trailing metadata: the token of the next page (see UserService.ListUsers).
NEXT_PAGE_TOKEN_KEY = "x-next-page-token"
# StreamChat's request metadata (see the comment on ChatService.StreamChat in chat.proto).
ROOM_KEY = "x-chat-room"
RESUME_KEY = "x-chat-resume-after"
ROOM_ID_KEY = "x-chat-room-id"
# StreamChat's refusal of a resume point older than the history the room keeps (OUT_OF_RANGE):
# the google.rpc.ErrorInfo reason, and the ErrorInfo metadata key holding the first sequence
# still stored, as a decimal string.
RESUME_EXPIRED = "RESUME_POINT_EXPIRED"
FIRST_SEQUENCE_KEY = "first_sequence"

# ImportUsers' request metadata (see the comment on UserService.ImportUsers in user.proto):
# `x-import-commit: explicit` declares that the client ends its import with `commit`.
IMPORT_COMMIT_KEY = "x-import-commit"
EXPLICIT_IMPORT_COMMIT = "explicit"

# Chat's limits on what a client sends (the comments in chat.proto state them).
DEFAULT_ROOM = "general"
MAX_TEXT_BYTES = 4096
MAX_CLIENT_MESSAGE_ID = 64
MAX_TITLE_CHARS = 200

# The methods a client may retry after UNAVAILABLE: they change nothing.
IDEMPOTENT_METHODS: dict[str, tuple[str, ...]] = {
    USER_SERVICE: ("GetUser", "ListUsers"),
    CHAT_SERVICE: ("ListMessages", "ListPresence", "GetRoom", "ListRooms", "ListMembers"),
}


def service_config(service: str, *, methods: Sequence[str] | None = None) -> str:
    """The JSON service config of a channel to `service`: round_robin over the addresses,
    client-side health checking, and retries of `methods` (default: its idempotent ones) and
    of the health service.

    Health checking watches the server's overall health (service ""), which a Parley server
    sets NOT_SERVING as it starts to drain: round_robin then sends new calls elsewhere before
    the server stops. Readiness (a dependency down) does not turn it off, so a replica whose
    database is down still answers with the precise error.
    """
    retried = IDEMPOTENT_METHODS[service] if methods is None else tuple(methods)
    names: list[dict[str, str]] = [{"service": service, "method": m} for m in retried]
    names.append({"service": HEALTH_SERVICE})
    return json.dumps(
        {
            "loadBalancingConfig": [{"round_robin": {}}],
            "healthCheckConfig": {"serviceName": ""},
            "methodConfig": [
                {
                    "name": names,
                    # No "timeout" here: grpcio starts that clock one to two seconds before
                    # the call (grpc/grpc#34547). Every call passes its own deadline instead.
                    "retryPolicy": {
                        "maxAttempts": 4,
                        "initialBackoff": "0.1s",
                        "maxBackoff": "1s",
                        "backoffMultiplier": 2,
                        # A replica that stops while a call is on its way to a handler ends
                        # it CANCELLED; for a read, trying another replica is as safe as it
                        # is for UNAVAILABLE. (A cancellation by the caller is never retried.)
                        "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
                    },
                }
            ],
            # A client facing a failing server stops retrying instead of multiplying its load.
            "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
        }
    )
