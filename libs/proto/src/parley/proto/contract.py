"""The wire values of Parley that the .proto files can only name in comments.

Hand-written, beside the generated code (`make proto` leaves it alone): the one definition
of each, for the servers, the SDK, the benchmark, the image check and the end-to-end tests.
tests/contract checks that every metadata key here is documented in a .proto file.
"""

from __future__ import annotations

__all__ = ["RESUME_KEY", "ROOM_ID_KEY", "ROOM_KEY"]

# StreamChat's request metadata (see the comment on ChatService.StreamChat in chat.proto).
ROOM_KEY = "x-chat-room"
RESUME_KEY = "x-chat-resume-after"
ROOM_ID_KEY = "x-chat-room-id"
