"""What the hostile-input tests share besides fixtures: the settings of their servers and
`Stack`, the session's UserService and ChatService with a chat user (see conftest.py)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import psycopg

from parley.proto import chat_pb2, chat_pb2_grpc, user_pb2, user_pb2_grpc
from parley.testing import bearer, wait_until_sync
from parley.testing.launcher import Served, chat_env, service_env

MAX_MESSAGE_BYTES = 65536


def server_env(
    kind: str, database: str, redis_url: str = "", user: str = "", **settings: str
) -> dict[str, str]:
    """A hostile-test server's settings: the launcher's, with a short drain and the message
    size limit; for chat the UserService at `user`, a Redis prefix of its own and the default
    re-check of open streams. Every test streams in rooms of its own, most as the one chat
    user, and each such room counts as one that user made."""
    settings = {
        "PARLEY_SHUTDOWN_GRACE": "2",
        "PARLEY_MAX_MESSAGE_BYTES": str(MAX_MESSAGE_BYTES),
        "PARLEY_CHAT_MAX_ROOMS_PER_USER": "100000",
        "PARLEY_CHAT_RESYNC_INTERVAL": "5",
        **settings,
    }
    if kind == "user":
        return service_env(database, **settings)
    return chat_env(database, redis_url, f"hostile-{uuid.uuid4().hex[:12]}", user, **settings)


@dataclass
class Stack:
    """The running servers, their database, and a chat user with a token."""

    database: str
    user: Served
    chat: Served
    writer_token: str  # users:write, subject not a user
    chatter_id: int = 0
    chatter_name: str = ""
    chatter_token: str = ""  # subject: chatter_id
    channels: dict[str, grpc.Channel] = field(default_factory=dict)

    def channel(self, target: str) -> grpc.Channel:
        if target not in self.channels:
            self.channels[target] = grpc.insecure_channel(target)
        return self.channels[target]

    def users(self) -> Any:
        return user_pb2_grpc.UserServiceStub(self.channel(self.user.target))

    def chats(self) -> Any:
        return chat_pb2_grpc.ChatServiceStub(self.channel(self.chat.target))

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.database, autocommit=True) as conn:
            return conn.execute(query, params).fetchall()

    def create_user(self, name: str, email: str | None = None) -> user_pb2.User:
        email = email or f"{uuid.uuid4().hex[:12]}@example.com"
        reply = self.users().CreateUser(
            user_pb2.CreateUserRequest(name=name, email=email, age=30),
            metadata=bearer(self.writer_token),
            timeout=10,
        )
        return reply.user

    def stream_chat(
        self,
        messages: list[chat_pb2.ChatMessage],
        *,
        expect: int,
        token: str | None = None,
        metadata: list[tuple[str, str]] | None = None,
        settled: Callable[[], bool] | None = None,
        timeout: float = 10,
    ) -> tuple[list[chat_pb2.ChatMessage], grpc.StatusCode | None]:
        """Sends `messages` on one StreamChat call and reads until `expect` messages came or
        the call ended; returns what came and the status code it ended with (None: still
        open, then cancelled by us). The server keeps a stream open after the client's
        half-close, so reaching `expect` is the normal end."""
        call_metadata = list(metadata or []) + (bearer(token) if token is not None else [])
        call = self.chats().StreamChat(iter(messages), metadata=call_metadata, timeout=timeout)
        received: list[chat_pb2.ChatMessage] = []
        try:
            if expect > 0:
                for message in call:
                    received.append(message)
                    if len(received) >= expect:
                        break
            elif settled is not None:  # nothing is to arrive: wait for the effect instead
                wait_until_sync(settled, timeout, "the stream's effect")
            else:  # nothing may arrive; only the end of the call can say so
                for message in call:
                    received.append(message)
        except grpc.RpcError as error:
            return received, error.code()
        call.cancel()
        return received, None

    def assert_serving(self) -> None:
        assert self.user.alive(), self.user.log_text()
        assert self.chat.alive(), self.chat.log_text()
        user = self.users().GetUser(
            user_pb2.GetUserRequest(id=self.chatter_id),
            metadata=bearer(self.chatter_token),
            timeout=10,
        )
        assert user.user.name == self.chatter_name
