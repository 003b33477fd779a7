"""PARLEY_REDIS_URL carries Redis credentials (a password, or an ACL user and its password)
and may use TLS (`rediss://`, with the CA and a client certificate as redis-py query
parameters). Each is tested against a private redis-server that requires it, with two
`parley-chat serve` replicas whose messages must cross through Redis (the periodic check
against Postgres is off). A wrong password keeps a replica NOT_SERVING with a log line that
says so, and no password ever shows in a log or on /metrics.
"""

from __future__ import annotations

import asyncio
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2
from redis.exceptions import NoPermissionError

from parley.chat_service.bus import presence_key, room_channel
from parley.testing import RedisServer, wait_until

PASSWORD = "redis-pw-" + uuid.uuid4().hex
ROOM = "secured"
# What a chat replica needs, and nothing of another deployment's keys or channels.
ACL_RULES = (
    "~{prefix}:chat:* &{prefix}:chat:room:* &{prefix}:chat:access:* -@all +@connection"
    " +publish +subscribe +unsubscribe +psubscribe +punsubscribe +zadd +zrem"
    " +zremrangebyscore +zrangebyscore"
)
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


async def converse(
    make_stack: Any, chat: Any, stored: Any, conversation_intact: Any, redis_url: str
) -> Any:
    """Two replicas on `redis_url`; a sender and a listener on each; every message reaches
    every stream exactly once. Returns the stack."""
    stack = await make_stack(
        replicas=2,
        redis_url=redis_url,
        PARLEY_CHAT_RESYNC_INTERVAL="1h",
        PARLEY_LOG_LEVEL="DEBUG",
    )
    a, b = stack.replicas
    ada, grace = stack.people["Ada"], stack.people["Grace"]
    clients = [
        await chat(ada, a, room=ROOM, resume_after=0),
        await chat(grace, b, room=ROOM, resume_after=0),
        await chat(grace, a, room=ROOM, resume_after=0),
        await chat(ada, b, room=ROOM, resume_after=0),
    ]
    # A message from each side: every stream sees both, so each replica is listening.
    await clients[0].send("hello from a")
    await wait_until(lambda: all(c.received for c in clients), 15, "the first message")
    for i in range(5):
        await clients[0].send(f"a {i}")
        await clients[1].send(f"b {i}")
    total = 11
    await wait_until(
        lambda: all(len(c.received) >= total for c in clients), 15, "every message everywhere"
    )
    rows = await stored(stack.database, ROOM)
    assert len(rows) == total
    conversation_intact(clients, rows)
    return stack


async def assert_no_password(stack: Any, launcher: Any, *secrets: str) -> None:
    scraped = [
        await asyncio.to_thread(_metrics_text, replica.metrics_port) for replica in stack.replicas
    ]
    for replica in stack.replicas:
        await launcher.stop(replica)
    logs = [replica.log_text() for replica in stack.replicas]
    assert all("DEBUG" in log for log in logs), "the replicas logged at DEBUG"
    for secret in secrets:
        assert not any(secret in text for text in scraped + logs)


async def test_a_password_in_the_url(
    tmp_path: Path,
    make_stack: Any,
    launcher: Any,
    chat: Any,
    stored: Any,
    conversation_intact: Any,
) -> None:
    server = RedisServer(tmp_path, password=PASSWORD)
    await server.start()
    try:
        stack = await converse(make_stack, chat, stored, conversation_intact, server.url)
        assert server.url.startswith(f"redis://:{PASSWORD}@127.0.0.1:")
        await assert_no_password(stack, launcher, PASSWORD)
    finally:
        await server.stop()


async def test_an_acl_user_limited_to_the_deployment_prefix(
    tmp_path: Path,
    redis_prefix: str,
    make_stack: Any,
    launcher: Any,
    chat: Any,
    stored: Any,
    conversation_intact: Any,
) -> None:
    other_password = "other-" + uuid.uuid4().hex
    server = RedisServer(
        tmp_path,
        users={"parley-chat": PASSWORD, "other-deployment": other_password},
        user_rules={
            "parley-chat": ACL_RULES.format(prefix=redis_prefix),
            "other-deployment": ACL_RULES.format(prefix="other-deployment"),
        },
    )
    await server.start()
    try:
        url = server.url_for("parley-chat", PASSWORD)
        stack = await converse(make_stack, chat, stored, conversation_intact, url)
        # Another deployment's user on the same Redis can neither publish on this one's
        # channels nor read them.
        other = aioredis.Redis.from_url(server.url_for("other-deployment", other_password))
        try:
            with pytest.raises(NoPermissionError):
                await other.publish(room_channel(redis_prefix, ROOM), b"forged")
            with pytest.raises(NoPermissionError):
                await other.zadd(presence_key(redis_prefix, ROOM), {"forged": 1})
            assert await other.publish("other-deployment:chat:room:x", b"its own") == 0
        finally:
            await other.aclose()
        await assert_no_password(stack, launcher, PASSWORD)
    finally:
        await server.stop()


async def test_tls_with_a_client_certificate(
    tmp_path: Path,
    make_stack: Any,
    launcher: Any,
    chat: Any,
    stored: Any,
    conversation_intact: Any,
) -> None:
    server = RedisServer(tmp_path, tls=True, password=PASSWORD)
    await server.start()
    try:
        assert server.url.startswith("rediss://") and "ssl_ca_certs=" in server.url
        stack = await converse(make_stack, chat, stored, conversation_intact, server.url)
        await assert_no_password(stack, launcher, PASSWORD)
    finally:
        await server.stop()


@pytest.mark.parametrize(
    ("credentials", "refusal"),
    [
        pytest.param(
            ("", "wrong-" + uuid.uuid4().hex),
            "Redis refused the credentials in PARLEY_REDIS_URL: invalid username-password",
            id="wrong",
        ),
        pytest.param(
            None,
            "Redis requires a password or an ACL user, and PARLEY_REDIS_URL has none",
            id="none",
        ),
    ],
)
async def test_wrong_credentials_keep_the_replica_not_ready_and_say_why(
    tmp_path: Path,
    redis_not_ready: Any,
    credentials: tuple[str, str] | None,
    refusal: str,
) -> None:
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis", password=PASSWORD)
    await server.start()
    try:
        url = server.url_for(*credentials) if credentials else server.url_for()
        line, text, metrics_text = await redis_not_ready(
            PARLEY_REDIS_URL=url, PARLEY_LOG_LEVEL="DEBUG"
        )
    finally:
        await server.stop()
    assert refusal in line, line
    secrets = [PASSWORD] + ([credentials[1]] if credentials else [])
    for secret in secrets:
        assert secret not in text
        assert secret not in metrics_text


async def test_an_acl_user_that_may_not_subscribe_keeps_the_replica_not_ready(
    tmp_path: Path, redis_prefix: str, redis_not_ready: Any
) -> None:
    """The ACL that sufficed when replicas subscribed by pattern (no +subscribe): the replica
    says so and stays out of service, instead of delivering across replicas only at the
    periodic check."""
    server = RedisServer(
        tmp_path,
        users={"parley-chat": PASSWORD},
        user_rules={
            "parley-chat": ACL_RULES.format(prefix=redis_prefix).replace(" +subscribe", "")
        },
    )
    await server.start()
    try:
        line, text, _ = await redis_not_ready(
            PARLEY_REDIS_URL=server.url_for("parley-chat", PASSWORD)
        )
    finally:
        await server.stop()
    assert "Redis refused to subscribe this replica to a room's channel" in line, line
    assert "+subscribe" in line
    assert PASSWORD not in text
