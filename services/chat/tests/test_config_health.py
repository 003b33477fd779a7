"""Configuration errors and readiness: Postgres and Redis gate it, UserService only degrades."""

from __future__ import annotations

import os

import grpc
import pytest
from grpc_health.v1 import health_pb2

from parley.chassis import ConfigError, Env
from parley.chat_service import ChatSettings
from parley.testing.launcher import run_to_exit, service_env
from parley.testing.stack import USER_DEPENDENCY

CHAT = "chat.ChatService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def settings_env(**overrides: str) -> dict[str, str]:
    env = {
        "PARLEY_DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/postgres",
        "PARLEY_JWT_SECRET": os.urandom(32).hex(),
        "PARLEY_REDIS_URL": "redis://127.0.0.1:6379/0",
    }
    env.update(overrides)
    return {k: v for k, v in env.items() if v is not None}


def test_settings_from_a_complete_environment():
    settings = ChatSettings.from_env(
        Env(
            settings_env(
                PARLEY_REDIS_PREFIX="team-a.chat_1",
                PARLEY_CHAT_RATE_LIMIT="5",
                PARLEY_CHAT_RATE_BURST="7",
                PARLEY_CHAT_QUEUE_LIMIT="16",
                PARLEY_CHAT_RESYNC_INTERVAL="500ms",
                PARLEY_USER_SERVICE_ADDR="dns:///users:50051",
            )
        )
    )
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.redis_prefix == "team-a.chat_1"
    assert (settings.rate_limit, settings.rate_burst) == (5.0, 7)
    assert settings.queue_limit == 16
    assert settings.resync_interval == pytest.approx(0.5)
    assert settings.subscription_linger == 2.0
    assert settings.user_service == "dns:///users:50051"
    assert settings.server.port == 50052


@pytest.mark.parametrize(
    ("overrides", "variable"),
    [
        ({"PARLEY_REDIS_URL": None}, "PARLEY_REDIS_URL"),
        ({"PARLEY_REDIS_URL": "   "}, "PARLEY_REDIS_URL"),
        ({"PARLEY_REDIS_URL": "http://127.0.0.1:6379"}, "PARLEY_REDIS_URL"),
        ({"PARLEY_REDIS_PREFIX": "has space"}, "PARLEY_REDIS_PREFIX"),
        ({"PARLEY_REDIS_PREFIX": "chat:room"}, "PARLEY_REDIS_PREFIX"),
        ({"PARLEY_REDIS_PREFIX": "p" * 65}, "PARLEY_REDIS_PREFIX"),
        ({"PARLEY_REDIS_PREFIX": "prefix\nsecond line"}, "PARLEY_REDIS_PREFIX"),
        ({"PARLEY_CHAT_QUEUE_LIMIT": "0"}, "PARLEY_CHAT_QUEUE_LIMIT"),
        ({"PARLEY_CHAT_RATE_LIMIT": "fast"}, "PARLEY_CHAT_RATE_LIMIT"),
        ({"PARLEY_CHAT_RESYNC_INTERVAL": "soon"}, "PARLEY_CHAT_RESYNC_INTERVAL"),
        ({"PARLEY_CHAT_SUBSCRIPTION_LINGER": "2h"}, "PARLEY_CHAT_SUBSCRIPTION_LINGER"),
        ({"PARLEY_CHAT_SUBSCRIPTION_LINGER": "-1s"}, "PARLEY_CHAT_SUBSCRIPTION_LINGER"),
        ({"PARLEY_USER_SERVICE_TIMEOUT": "0"}, "PARLEY_USER_SERVICE_TIMEOUT"),
        ({"PARLEY_USER_CACHE_MAX_STALE": "a while"}, "PARLEY_USER_CACHE_MAX_STALE"),
        ({"PARLEY_DATABASE_URL": None}, "PARLEY_DATABASE_URL"),
        ({"PARLEY_JWT_SECRET": "short"}, "PARLEY_JWT_SECRET"),
    ],
)
def test_a_bad_setting_is_a_one_line_config_error_naming_the_variable(overrides, variable):
    with pytest.raises(ConfigError) as caught:
        ChatSettings.from_env(Env(settings_env(**overrides)))
    assert caught.value.variable == variable
    message = str(caught.value)
    assert message.startswith(f"{variable}: ")
    assert "\n" not in message


def test_the_command_reports_a_config_error_on_one_line_and_exits_2():
    env = settings_env(PARLEY_REDIS_URL=None, PARLEY_GRPC_PORT="0", PARLEY_METRICS_PORT="0")
    done = run_to_exit("chat", env, timeout=60)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "parley-chat: configuration error: PARLEY_REDIS_URL: is required but not set"
    ]


async def test_ready_when_postgres_redis_and_user_service_are_up(make_stack, health):
    stack = await make_stack(replicas=1, people=(), in_process=True)
    port = stack.replicas[0].port
    assert await health(port, "") == SERVING
    assert await health(port, CHAT) == SERVING
    assert await health(port, USER_DEPENDENCY) == SERVING


async def test_readiness_follows_redis(
    launcher, database, redis_prefix, private_redis, health, wait_for
):
    redis = await private_redis(running=False)  # a port with nothing listening yet
    env = service_env(
        database,
        PARLEY_REDIS_URL=redis.url,
        PARLEY_REDIS_PREFIX=redis_prefix,
        PARLEY_USER_SERVICE_ADDR="127.0.0.1:1",
    )
    replica = await launcher.app("chat", env, ready=False)

    async def status(name: str = CHAT) -> int:
        return await health(replica.port, name)

    assert await status() == NOT_SERVING
    assert await status("") == SERVING, "liveness does not depend on Redis"

    await redis.start()
    await wait_for(lambda: status_is(status, SERVING), 15, "SERVING once Redis is up")

    await redis.stop()
    await wait_for(lambda: status_is(status, NOT_SERVING), 15, "NOT_SERVING once Redis is gone")
    assert await status("") == SERVING


async def status_is(status, expected: int) -> bool:
    return await status() == expected


async def test_readiness_follows_postgres_and_its_schema(
    launcher, empty_database, redis_url, redis_prefix, health, wait_for
):
    from parley.chat_service.migrations import MIGRATIONS

    env = service_env(
        empty_database,
        PARLEY_REDIS_URL=redis_url,
        PARLEY_REDIS_PREFIX=redis_prefix,
        PARLEY_USER_SERVICE_ADDR="127.0.0.1:1",
    )
    replica = await launcher.app("chat", env, ready=False)

    async def status() -> int:
        return await health(replica.port, CHAT)

    assert await status() == NOT_SERVING, "ready although the chat schema is missing"
    await MIGRATIONS.apply(empty_database)
    await wait_for(lambda: status_is(status, SERVING), 15, "SERVING once migrated")


async def test_not_ready_when_postgres_is_unreachable(
    launcher, redis_url, redis_prefix, unused_port, health
):
    env = service_env(
        f"postgresql://postgres@127.0.0.1:{unused_port}/nowhere",
        PARLEY_REDIS_URL=redis_url,
        PARLEY_REDIS_PREFIX=redis_prefix,
        PARLEY_USER_SERVICE_ADDR="127.0.0.1:1",
    )
    replica = await launcher.app("chat", env, ready=False)
    assert await health(replica.port, CHAT) == NOT_SERVING
    assert await health(replica.port, "") == SERVING


async def test_user_service_down_degrades_but_keeps_the_chat_ready(
    make_stack, launcher, chat, health, wait_for, details
):
    # No name cache: every lookup goes to UserService, so its outage is felt at once.
    stack = await make_stack(
        replicas=1, people=("Ada", "Grace"), in_process=True, PARLEY_USER_CACHE_TTL="0"
    )
    replica = stack.replicas[0]
    ada, grace = stack.people["Ada"], stack.people["Grace"]
    before = await chat(ada, replica, room="ops", resume_after=0)
    await before.send("before the outage")
    await wait_for(lambda: before.received, 10, "the first message")

    users_port = stack.users.port
    await launcher.stop(stack.users)

    async def degraded() -> bool:
        return await health(replica.port, USER_DEPENDENCY) == NOT_SERVING

    await wait_for(degraded, 15, "dependency/user-service to go NOT_SERVING")
    assert await health(replica.port, CHAT) == SERVING
    assert await health(replica.port, "") == SERVING

    # A sender whose name was looked up before keeps chatting under that name.
    await before.send("during the outage")
    await wait_for(lambda: len(before.received) == 2, 10, "the second message")
    assert [(m.user, m.text) for m in before.received] == [
        ("Ada", "before the outage"),
        ("Ada", "during the outage"),
    ]
    again = await chat(ada, replica, room="ops", resume_after=0)
    await wait_for(lambda: len(again.received) == 2, 10, "history on a new stream")

    # Nobody can vouch for a sender never seen: the stream fails as UNAVAILABLE.
    stranger = await chat(grace, replica, room="ops")
    assert await stranger.wait_until_ended() == grpc.StatusCode.UNAVAILABLE
    assert details(stranger.error).metadata == {"dependency": "user-service"}
    assert await health(replica.port, CHAT) == SERVING

    # UserService comes back at the same address: the replica notices within seconds (its
    # channel's reconnect backoff is capped at 5 s, not grpcio's two minutes).
    await launcher.app("user", service_env(stack.database, PARLEY_GRPC_PORT=str(users_port)))

    async def recovered() -> bool:
        return await health(replica.port, USER_DEPENDENCY) == SERVING

    await wait_for(recovered, 15, "dependency/user-service to be SERVING again")
    newcomer = await chat(grace, replica, room="ops", resume_after=0)
    await wait_for(lambda: len(newcomer.received) == 2, 10, "history for a sender now known")


async def test_a_one_second_user_service_timeout_leaves_time_for_the_lookup(
    make_stack, chat, health, wait_for
):
    stack = await make_stack(
        replicas=1, people=("Ada",), in_process=True, PARLEY_USER_SERVICE_TIMEOUT="1s"
    )
    replica = stack.replicas[0]
    assert await health(replica.port, USER_DEPENDENCY) == SERVING
    client = await chat(stack.people["Ada"], replica, room="quick")
    await client.send("hello")
    await wait_for(lambda: client.received or client.ended, 10, "the message or an error")
    assert client.error is None
    assert [m.user for m in client.received] == ["Ada"]


async def test_a_cached_user_is_honoured_only_for_the_stale_allowance(
    make_stack, launcher, chat, wait_for, details
):
    """PARLEY_USER_CACHE_MAX_STALE bounds how long a known user goes on unconfirmed while
    UserService cannot answer (a user deleted just before the outage goes no further)."""
    stack = await make_stack(
        replicas=1,
        people=("Ada",),
        in_process=True,
        PARLEY_USER_CACHE_TTL="0",
        PARLEY_USER_CACHE_MAX_STALE="0",
    )
    replica = stack.replicas[0]
    ada = stack.people["Ada"]
    before = await chat(ada, replica, room="ops", resume_after=0)
    await before.send("before the outage")
    await wait_for(lambda: before.received, 10, "the first message")

    await launcher.stop(stack.users)
    again = await chat(ada, replica, room="ops", resume_after=0)
    assert await again.wait_until_ended() == grpc.StatusCode.UNAVAILABLE
    assert details(again.error).metadata == {"dependency": "user-service"}
