"""Hostile traffic on the gRPC ports: oversized messages, garbage bytes, half-open and
stalled connections. The servers must refuse what is bad and keep serving everyone else."""

from __future__ import annotations

import random
import socket
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import grpc
import pytest

from parley.chassis import ConfigError, Env, ServerSettings
from parley.proto import chat_pb2, user_pb2, user_pb2_grpc
from parley.proto.contract import ROOM_KEY
from parley.testing import bearer

LIMIT = 65536  # PARLEY_MAX_MESSAGE_BYTES of the test servers (conftest)
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT


def code_of(function: Any, *args: Any, **kwargs: Any) -> grpc.StatusCode:
    try:
        function(*args, **kwargs)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def user_count(stack: Any) -> int:
    return int(stack.sql("SELECT count(*) FROM users")[0][0])


@pytest.mark.parametrize("size", [LIMIT + 1, 4 * LIMIT, 3 * 1024 * 1024])
def test_oversized_requests_are_resource_exhausted(stack: Any, size: int) -> None:
    writer = bearer(stack.writer_token)
    users_before = user_count(stack)
    big = "x" * size
    email = f"big-{uuid.uuid4().hex[:8]}@example.com"
    users = stack.users()
    assert (
        code_of(
            users.CreateUser,
            user_pb2.CreateUserRequest(name=big, email=email),
            metadata=writer,
            timeout=10,
        )
        == RESOURCE_EXHAUSTED
    )
    rows = [
        user_pb2.CreateUserRequest(name="Fine", email=f"ok-{uuid.uuid4().hex[:8]}@example.com"),
        user_pb2.CreateUserRequest(name=big, email=email),
    ]
    assert code_of(users.ImportUsers, iter(rows), metadata=writer, timeout=10) == RESOURCE_EXHAUSTED
    assert user_count(stack) == users_before, "an import with an oversized row stored something"

    chats = stack.chats()
    reader = bearer(stack.chatter_token)
    room = f"big-{uuid.uuid4().hex[:12]}"
    assert (
        code_of(
            chats.ListMessages, chat_pb2.ListMessagesRequest(room=big), metadata=reader, timeout=10
        )
        == RESOURCE_EXHAUSTED
    )
    received, code = stack.stream_chat(
        [chat_pb2.ChatMessage(text="before"), chat_pb2.ChatMessage(text=big)],
        expect=2,
        token=stack.chatter_token,
        metadata=[(ROOM_KEY, room)],
    )
    assert code == RESOURCE_EXHAUSTED
    assert [m.text for m in received] in ([], ["before"])
    assert [r[0] for r in stack.sql("SELECT text FROM chat_messages WHERE room = %s", room)] in (
        [],
        ["before"],
    )
    stack.assert_serving()


def test_just_under_the_limit_reaches_the_handler(stack: Any) -> None:
    """A request a little under the configured limit is read and judged by the service (the
    limit is the configured 64 KiB, not gRPC's built-in 4 MiB)."""
    near = "y" * (LIMIT - 200)
    users = stack.users()
    code = code_of(
        users.CreateUser,
        user_pb2.CreateUserRequest(name=near, email="near@example.com"),
        metadata=bearer(stack.writer_token),
        timeout=10,
    )
    assert code == INVALID_ARGUMENT
    code = code_of(
        stack.chats().ListMessages,
        chat_pb2.ListMessagesRequest(room=near),
        metadata=bearer(stack.chatter_token),
        timeout=10,
    )
    assert code == INVALID_ARGUMENT


def test_max_message_bytes_setting() -> None:
    def settings(value: str | None) -> ServerSettings:
        env = {} if value is None else {"PARLEY_MAX_MESSAGE_BYTES": value}
        return ServerSettings.from_env(Env(env), default_port=1, default_metrics_port=2)

    assert settings(None).max_message_bytes == 1024 * 1024
    assert settings("65536").max_message_bytes == 65536
    for bad in ("0", "1000", "-5", "1MiB", str(2**40)):
        with pytest.raises(ConfigError, match="PARLEY_MAX_MESSAGE_BYTES"):
            settings(bad)


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _closed_by_server(sock: socket.socket) -> bool:
    """Reads until the server closes the connection (True) or 10 s pass (False)."""
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


@pytest.fixture
def hostile_sockets(stack: Any) -> Iterator[dict[str, list[socket.socket]]]:
    """Raw TCP connections to both gRPC ports: garbage senders, and connections that stall
    part-way through the HTTP/2 preface (open, or half-closed by the client)."""
    rng = random.Random(20261125)
    kinds: dict[str, list[socket.socket]] = {"garbage": [], "stalled": [], "half_closed": []}
    with ExitStack() as stack_of_sockets:
        for port in (stack.user.port, stack.chat.port):
            for n in range(8):
                sock = stack_of_sockets.enter_context(_connect(port))
                payload = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4096)))
                if n % 2:
                    # A valid preface, then a frame header announcing a huge bogus frame.
                    payload = PREFACE + b"\xff\xff\xff\x07\x00\x00\x00\x00\x01" + payload
                sock.sendall(payload)
                kinds["garbage"].append(sock)
            for n in range(20):
                sock = stack_of_sockets.enter_context(_connect(port))
                if n % 2:
                    sock.sendall(PREFACE[: 1 + n])
                kinds["stalled"].append(sock)
            for n in range(4):
                sock = stack_of_sockets.enter_context(_connect(port))
                sock.sendall(PREFACE[: 5 + n])
                sock.shutdown(socket.SHUT_WR)
                kinds["half_closed"].append(sock)
        yield kinds


def test_garbage_and_stalled_connections_leave_the_servers_serving(
    stack: Any, hostile_sockets: dict[str, list[socket.socket]]
) -> None:
    # While 56 stalled connections are held open, ordinary clients are served by both.
    for _ in range(3):
        stack.assert_serving()
        received, code = stack.stream_chat(
            [chat_pb2.ChatMessage(text="still here")],
            expect=1,
            token=stack.chatter_token,
            metadata=[(ROOM_KEY, f"wire-{uuid.uuid4().hex[:12]}")],
        )
        assert code is None and [m.text for m in received] == ["still here"]
    # Garbage is answered by closing the connection, not by waiting for more.
    for sock in hostile_sockets["garbage"] + hostile_sockets["half_closed"]:
        assert _closed_by_server(sock), "the server kept a garbage connection open"
    # A fresh channel works too, and both processes are alive.
    with grpc.insecure_channel(stack.user.target) as channel:
        stub: Any = user_pb2_grpc.UserServiceStub(channel)
        reply = stub.GetUser(
            user_pb2.GetUserRequest(id=stack.chatter_id),
            metadata=bearer(stack.chatter_token),
            timeout=10,
        )
        assert reply.user.id == stack.chatter_id
    stack.assert_serving()
