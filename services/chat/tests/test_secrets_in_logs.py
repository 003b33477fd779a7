"""No secret reaches a log line or a metric: the JWT secret, tokens (good, expired, forged),
and the passwords in the Postgres and Redis URLs. Both services run as `parley-* serve`
processes at DEBUG level; their whole output and /metrics are searched afterwards."""

from __future__ import annotations

import asyncio
import urllib.request
import uuid
from typing import Any

import grpc
import psycopg
import pytest
import redis

from parley.proto import chat_pb2, chat_pb2_grpc, user_pb2, user_pb2_grpc
from parley.testing import bearer, free_port, make_token, wait_until
from parley.testing.launcher import JWT_SECRET, chat_env, service_env
from parley.testing.stack import USER_DEPENDENCY, Person

DB_PASSWORD = "s3cret-pw-" + uuid.uuid4().hex[:8]
REDIS_PASSWORD = "r3dis-pw-" + uuid.uuid4().hex[:8]


def with_password(url: str) -> str:
    """The same database as `url`, as a postgresql:// URL with a password (trust auth on the
    test server ignores it; the point is that the services never print it)."""
    params = psycopg.conninfo.conninfo_to_dict(url)
    host = params.get("host", "127.0.0.1")
    port = params.get("port", "5432")
    user = params.get("user", "postgres")
    return f"postgresql://{user}:{DB_PASSWORD}@{host}:{port}/{params['dbname']}"


def fetch_metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


async def test_no_secret_or_token_in_logs_or_metrics(
    launcher: Any,
    database: str,
    private_redis: Any,
    redis_prefix: str,
    chat: Any,
    wait_for: Any,
    token: Any,
) -> None:
    server = await private_redis()
    admin = redis.Redis(port=server.port)
    with admin:
        admin.config_set("requirepass", REDIS_PASSWORD)
    redis_url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{server.port}/0"
    db_url = with_password(database)
    debug = {"PARLEY_LOG_LEVEL": "DEBUG"}

    users = await launcher.process("user", service_env(db_url, **debug))
    replica = await launcher.process(
        "chat", chat_env(db_url, redis_url, redis_prefix, users.target, **debug)
    )
    await launcher.wait_ready(replica, name=USER_DEPENDENCY)

    writer = token("admin", scope="users:write")
    expired = token("admin", scope="users:write", ttl=-120)
    forged = make_token(uuid.uuid4().hex * 2, "admin", "users:write", 600)
    async with grpc.aio.insecure_channel(users.target) as channel:
        stub = user_pb2_grpc.UserServiceStub(channel)
        created = await stub.CreateUser(
            user_pb2.CreateUserRequest(name="Ada", email=f"ada.{uuid.uuid4().hex[:6]}@x.org"),
            metadata=bearer(writer),
            timeout=10,
        )
        for bad in (expired, forged, "not-a-jwt-" + DB_PASSWORD):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stub.GetUser(
                    user_pb2.GetUserRequest(id=created.user.id), metadata=bearer(bad), timeout=5
                )
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    ada_token = token(str(created.user.id))
    ada = Person(created.user.id, "Ada", ada_token)

    sender = await chat(ada, replica, room="lobby", resume_after=0)
    await sender.send("hello")
    await wait_for(lambda: sender.received, 10, "the message")
    async with grpc.aio.insecure_channel(replica.target) as channel:
        stub_chat = chat_pb2_grpc.ChatServiceStub(channel)
        for bad in (expired, forged):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stub_chat.ListMessages(
                    chat_pb2.ListMessagesRequest(room="lobby"), metadata=bearer(bad), timeout=5
                )
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED

    scraped = {
        f"{service.kind} metrics": await asyncio.to_thread(fetch_metrics, service.metrics_port)
        for service in (users, replica)
    }
    for service in (users, replica):
        await launcher.stop(service)
    texts = {
        **scraped,
        **{f"{service.kind} log": service.log_text() for service in (users, replica)},
    }
    # The logs said something about the calls, so the search below searched real output.
    assert "UNAUTHENTICATED" in texts["user log"] or "Unauthenticated" in texts["user log"], texts[
        "user log"
    ][-2000:]

    secrets = {
        "JWT secret": JWT_SECRET,
        "database password": DB_PASSWORD,
        "Redis password": REDIS_PASSWORD,
    }
    for name, token in (
        ("good token", writer),
        ("expired token", expired),
        ("forged token", forged),
        ("chat token", ada_token),
    ):
        secrets[name] = token
        # Part of a token is as bad: its signature.
        secrets[f"{name} signature"] = token.rsplit(".", 1)[1]
    leaks = [
        f"{name} in {where}"
        for where, text in texts.items()
        for name, secret in secrets.items()
        if secret in text
    ]
    assert leaks == []


async def test_no_password_in_the_errors_of_unreachable_dependencies(launcher: Any) -> None:
    """Failing Postgres and Redis connections are logged with their errors: not their URLs'
    passwords, nor the JWT secret."""
    dead_db, dead_redis = free_port(), free_port()
    env = chat_env(
        f"postgresql://parley:{DB_PASSWORD}@127.0.0.1:{dead_db}/parley",
        f"redis://:{REDIS_PASSWORD}@127.0.0.1:{dead_redis}/0",
        "secrets-test",
        "127.0.0.1:1",
        PARLEY_LOG_LEVEL="DEBUG",
    )
    replica = await launcher.process("chat", env, ready=False)

    def reported() -> bool:
        assert replica.alive(), replica.log_text()
        return "not ready:" in replica.log_text()

    await wait_until(reported, 30, "the chat service to report its dependencies down")
    await launcher.stop(replica)
    text = replica.log_text()
    assert str(dead_db) in text or "postgres" in text, text
    for name, secret in (
        ("JWT secret", JWT_SECRET),
        ("database password", DB_PASSWORD),
        ("Redis password", REDIS_PASSWORD),
    ):
        assert secret not in text, f"{name} in the log:\n{text}"
