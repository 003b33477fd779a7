"""The chat service starts on the chassis, reports readiness from Postgres and Redis, and says
clearly that StreamChat is not served yet."""

from __future__ import annotations

import asyncio
import os
import time

import grpc
import jwt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from parley.chassis import ConfigError, Env
from parley.chat_service import ChatSettings, create_server
from parley.proto import chat_pb2, chat_pb2_grpc

DATABASE_URL = os.environ.get(
    "PARLEY_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("PARLEY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
SECRET = "chat-test-" + "c" * 32


def settings(**overrides: str) -> ChatSettings:
    env = {
        "PARLEY_DATABASE_URL": DATABASE_URL,
        "PARLEY_REDIS_URL": REDIS_URL,
        "PARLEY_JWT_SECRET": SECRET,
        "PARLEY_GRPC_HOST": "127.0.0.1",
        "PARLEY_GRPC_PORT": "0",
        "PARLEY_METRICS_HOST": "127.0.0.1",
        "PARLEY_METRICS_PORT": "0",
        "PARLEY_HEALTH_CHECK_INTERVAL": "0.2",
    }
    env.update(overrides)
    return ChatSettings.from_env(Env(env))


async def wait_for_status(stub, service: str, expected: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        status = reply.status
        if status == expected:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{service!r} stayed {status}, expected {expected}")


def test_defaults_are_the_documented_ports() -> None:
    loaded = ChatSettings.from_env(
        Env(
            {
                "PARLEY_DATABASE_URL": DATABASE_URL,
                "PARLEY_REDIS_URL": REDIS_URL,
                "PARLEY_JWT_SECRET": SECRET,
            }
        )
    )
    assert (loaded.server.port, loaded.server.metrics_port) == (50052, 9102)


def test_redis_url_is_required_and_checked() -> None:
    with pytest.raises(ConfigError, match="^PARLEY_REDIS_URL: is required"):
        ChatSettings.from_env(Env({"PARLEY_DATABASE_URL": DATABASE_URL}))
    with pytest.raises(ConfigError, match="^PARLEY_REDIS_URL: must be a redis://"):
        settings(PARLEY_REDIS_URL="http://localhost:6379")


async def test_ready_with_dependencies_and_stream_chat_is_unimplemented() -> None:
    app = create_server(settings())
    await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            await wait_for_status(
                health, "chat.ChatService", health_pb2.HealthCheckResponse.SERVING
            )
            token = jwt.encode(
                {"sub": "1", "iss": "parley", "aud": "parley", "exp": int(time.time()) + 60},
                SECRET,
                algorithm="HS256",
            )
            chat = chat_pb2_grpc.ChatServiceStub(channel)
            call = chat.StreamChat(
                iter([chat_pb2.ChatMessage(user="a", text="hi")]),
                metadata=[("authorization", f"Bearer {token}")],
            )
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in call:
                    pass
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await app.stop()


async def test_not_ready_while_redis_is_unreachable(unused_tcp_port: int) -> None:
    app = create_server(settings(PARLEY_REDIS_URL=f"redis://127.0.0.1:{unused_tcp_port}/0"))
    await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            await wait_for_status(health, "", health_pb2.HealthCheckResponse.SERVING)
            await wait_for_status(
                health, "chat.ChatService", health_pb2.HealthCheckResponse.NOT_SERVING
            )
            assert "redis" in app.monitor.failures
    finally:
        await app.stop()
