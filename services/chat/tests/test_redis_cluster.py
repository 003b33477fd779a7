"""Chat over a Redis Cluster (PARLEY_REDIS_CLUSTER=true): rooms use sharded pub/sub, a room's
channel and presence share its hash slot, and a primary killed mid-conversation loses and
duplicates nothing. A real local cluster: 3 primaries and 3 replicas on loopback."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from parley.chassis import ConfigError, Env
from parley.chat_service.bus import presence_key, room_channel
from parley.chat_service.settings import ChatSettings
from parley.testing import chat_client
from parley.testing.chat_client import everyone_has
from parley.testing.redis_cluster import ClusterNode, LocalRedisCluster

EACH = 8


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[LocalRedisCluster]:
    (tmp_path / "cluster").mkdir()
    made = LocalRedisCluster(tmp_path / "cluster")
    try:
        await made.start()
        yield made
    finally:
        await made.stop()


async def rooms_on_two_primaries(
    cluster: LocalRedisCluster, prefix: str
) -> tuple[str, str, ClusterNode]:
    """Two room names whose channels two different primaries serve, and the first's primary:
    the node the replicas' URL names (when it is a primary), the one they first ask."""
    names = [f"room-{index}" for index in range(200)]
    primaries = [await cluster.primary_for(room_channel(prefix, name)) for name in names]
    seed = cluster.nodes[0] if cluster.nodes[0] in primaries else primaries[0]
    first = names[primaries.index(seed)]
    second = next(name for name, p in zip(names, primaries, strict=True) if p is not seed)
    return first, second, seed


async def shard_subscribers(node: ClusterNode, channel: str) -> int:
    async with aioredis.Redis.from_url(node.url, socket_timeout=5) as client:
        [_, count] = await client.execute_command("PUBSUB", "SHARDNUMSUB", channel)
        return int(count)


async def classic_subscribers(node: ClusterNode, channel: str) -> int:
    async with aioredis.Redis.from_url(node.url, socket_timeout=5) as client:
        [(_, count)] = await client.pubsub_numsub(channel)
        return int(count)


async def send_round(senders, label: str) -> None:
    await chat_client.send_round(senders, label, EACH)


async def test_rooms_use_shard_channels_and_keep_their_keys_in_one_slot(
    cluster, make_stack, redis_prefix, chat, streams_joined, stream_counts, wait_for
):
    # No periodic resync: only sharded pub/sub carries messages between the replicas.
    stack = await make_stack(
        replicas=2,
        people=("Ada", "Grace"),
        redis_url=cluster.url,
        PARLEY_REDIS_CLUSTER="true",
        PARLEY_CHAT_RESYNC_INTERVAL="3600s",
        PARLEY_CHAT_SUBSCRIPTION_LINGER="0s",
    )
    a, b = stack.replicas
    ada, grace = stack.people["Ada"], stack.people["Grace"]
    first, second, primary = await rooms_on_two_primaries(cluster, redis_prefix)
    assert key_slot(room_channel(redis_prefix, first).encode()) == key_slot(
        presence_key(redis_prefix, first).encode()
    )
    clients = {}
    for room in (first, second):
        clients[room] = [await chat(ada, a, room=room), await chat(grace, b, room=room)]
        # Presence (a sorted set in the room's slot) lists both streams, from either replica.
        await streams_joined(b, grace, room, stream_counts(clients[room]))

    # Each replica holds a shard subscription on the room's primary, and none in classic
    # pub/sub there.
    channel = room_channel(redis_prefix, first)
    await wait_for(
        lambda: _equals(shard_subscribers(primary, channel), 2), 10, "both replicas subscribed"
    )
    assert await classic_subscribers(primary, channel) == 0

    for room in (first, second):
        await send_round(clients[room], room)
    everyone = [c for pair in clients.values() for c in pair]
    await wait_for(everyone_has(everyone, 2 * EACH), 20, "every message on both replicas")
    for pair in clients.values():
        assert [m.text for m in pair[0].received] == [m.text for m in pair[1].received]

    # The last stream gone (no linger), the replicas unsubscribe.
    for client in clients[first]:
        await client.close()
    await wait_for(
        lambda: _equals(shard_subscribers(primary, channel), 0), 10, "both replicas unsubscribed"
    )


async def _equals(value, expected: int) -> bool:
    return await value == expected


async def test_a_killed_primary_loses_and_duplicates_nothing(
    cluster,
    make_stack,
    redis_prefix,
    chat,
    stored,
    metrics,
    streams_joined,
    stream_counts,
    conversation_intact,
    wait_for,
):
    # No periodic resync: only the bus, subscribing anew after the failover, fills the gap.
    stack = await make_stack(
        replicas=2,
        people=("Ada", "Grace", "Linus"),
        redis_url=cluster.url,
        PARLEY_REDIS_CLUSTER="true",
        PARLEY_CHAT_RESYNC_INTERVAL="3600s",
        # Readiness is checked often enough to see the failover's seconds.
        PARLEY_HEALTH_CHECK_INTERVAL="0.2s",
    )
    a, b = stack.replicas
    ada, grace, linus = (stack.people[n] for n in ("Ada", "Grace", "Linus"))
    doomed_room, other_room, primary = await rooms_on_two_primaries(cluster, redis_prefix)
    talks = {}
    for room in (doomed_room, other_room):
        senders = [await chat(ada, a, room=room), await chat(grace, b, room=room)]
        listeners = [await chat(linus, replica, room=room) for replica in (a, b)]
        await streams_joined(a, linus, room, stream_counts(senders + listeners))
        talks[room] = (senders, listeners)
    everyone = [c for senders, listeners in talks.values() for c in senders + listeners]

    async def talk(label: str) -> None:
        await asyncio.gather(*(send_round(senders, label) for senders, _ in talks.values()))

    await talk("before")
    await wait_for(everyone_has(everyone, 2 * EACH), 20, "the messages sent before the kill")

    await cluster.kill(primary)
    await talk("during")  # while the primary is gone and before its replica takes over
    await cluster.wait_for_failover()
    await wait_for(everyone_has(everyone, 4 * EACH), 30, "the failover's messages everywhere")
    await talk("after")
    await wait_for(everyone_has(everyone, 6 * EACH), 30, "the messages sent after the failover")

    for room, (senders, listeners) in talks.items():
        rows = await stored(stack.database, room)
        assert len(rows) == 6 * EACH
        conversation_intact(senders + listeners, rows)
    assert all(c.connections == 1 and not c.ended for c in everyone), "no stream reconnected"
    for replica in stack.replicas:
        counted = (await metrics(replica.metrics_port))["parley_chat_redis_reconnects_total"]
        assert counted >= 1, "each replica subscribed anew after the failover"
        # One primary down is not the cluster down: the replicas stayed ready throughout.
        assert "not ready" not in replica.log_text()


@pytest.mark.parametrize(
    ("variables", "variable", "problem"),
    [
        ({"PARLEY_REDIS_CLUSTER": "yes"}, "PARLEY_REDIS_CLUSTER", "true"),
        (
            {"PARLEY_REDIS_CLUSTER": "true", "PARLEY_REDIS_URL": "unix:///run/redis.sock"},
            "PARLEY_REDIS_URL",
            "must be a redis:// or rediss:// URL of a node",
        ),
        (
            {"PARLEY_REDIS_CLUSTER": "true", "PARLEY_REDIS_URL": "redis://127.0.0.1:7000/2"},
            "PARLEY_REDIS_URL",
            "must name database 0",
        ),
    ],
)
def test_a_bad_cluster_setting_stops_start_up_with_one_line(
    variables: dict[str, str], variable: str, problem: str
) -> None:
    env = {
        "PARLEY_DATABASE_URL": "postgresql://127.0.0.1/parley",
        "PARLEY_REDIS_URL": "redis://127.0.0.1:6379/0",
        "PARLEY_JWT_SECRET": os.urandom(32).hex(),
        **variables,
    }
    with pytest.raises(ConfigError) as raised:
        ChatSettings.from_env(Env(env))
    assert raised.value.variable == variable
    assert problem in str(raised.value)
    assert "\n" not in str(raised.value)


def acl_rules(prefix: str) -> str:
    """The README's ACL for a chat replica on a Redis Cluster."""
    return (
        f"~{prefix}:chat:* &{prefix}:chat:room:* &{prefix}:chat:access:* -@all +@connection"
        " +publish +subscribe +unsubscribe +psubscribe +punsubscribe +zadd +zrem"
        " +zremrangebyscore +zrangebyscore +spublish +ssubscribe +sunsubscribe"
        " +cluster|slots"
    )


async def test_the_readme_acl_is_enough_on_a_cluster(
    cluster, make_stack, redis_prefix, chat, streams_joined, stream_counts, wait_for
):
    password = os.urandom(16).hex()
    for node in cluster.nodes:
        async with aioredis.Redis.from_url(node.url, socket_timeout=5) as client:
            await client.execute_command(
                "ACL",
                "SETUSER",
                "parley-chat",
                "on",
                f">{password}",
                *acl_rules(redis_prefix).split(),
            )
    stack = await make_stack(
        replicas=2,
        people=("Ada", "Grace"),
        redis_url=cluster.nodes[0].url_for("parley-chat", password),
        PARLEY_REDIS_CLUSTER="true",
        PARLEY_CHAT_RESYNC_INTERVAL="3600s",
    )
    a, b = stack.replicas
    first, second, _ = await rooms_on_two_primaries(cluster, redis_prefix)
    everyone = []
    for room in (first, second):
        pair = [await chat(stack.people["Ada"], a, room=room),
                await chat(stack.people["Grace"], b, room=room)]  # fmt: skip
        await streams_joined(b, stack.people["Grace"], room, stream_counts(pair))
        await send_round(pair, room)
        everyone += pair
    await wait_for(everyone_has(everyone, 2 * EACH), 20, "every message on both replicas")
    for replica in stack.replicas:
        assert "refused" not in replica.log_text()


async def test_a_slot_handed_to_another_node_loses_and_duplicates_nothing(
    cluster,
    make_stack,
    redis_prefix,
    chat,
    stored,
    metrics,
    streams_joined,
    stream_counts,
    conversation_intact,
    wait_for,
):
    """A manual failover: no node fails and no connection drops, Redis ends the shard
    subscriptions of the slots that moved (an unasked SUNSUBSCRIBE)."""
    stack = await make_stack(
        replicas=2,
        people=("Ada", "Grace"),
        redis_url=cluster.url,
        PARLEY_REDIS_CLUSTER="true",
        PARLEY_CHAT_RESYNC_INTERVAL="3600s",
    )
    a, b = stack.replicas
    room, _, _ = await rooms_on_two_primaries(cluster, redis_prefix)
    talk = [await chat(stack.people["Ada"], a, room=room),
            await chat(stack.people["Grace"], b, room=room)]  # fmt: skip
    await streams_joined(b, stack.people["Grace"], room, stream_counts(talk))
    await send_round(talk, "before")
    await wait_for(everyone_has(talk, 2 * EACH), 20, "the messages before the hand-over")

    new_primary = await cluster.hand_over(room_channel(redis_prefix, room))
    channel = room_channel(redis_prefix, room)
    await wait_for(
        lambda: _equals(shard_subscribers(new_primary, channel), 2),
        20,
        "both replicas subscribed on the new primary",
    )
    await send_round(talk, "after")
    await wait_for(everyone_has(talk, 4 * EACH), 20, "the messages after the hand-over")
    conversation_intact(talk, await stored(stack.database, room))
    for replica in stack.replicas:
        counted = (await metrics(replica.metrics_port))["parley_chat_redis_reconnects_total"]
        assert counted >= 1, "each replica subscribed anew"


async def test_an_acl_without_cluster_slots_says_so_in_readiness(
    cluster, redis_prefix, redis_not_ready
):
    password = os.urandom(16).hex()
    rules = acl_rules(redis_prefix).replace(" +cluster|slots", "")
    for node in cluster.nodes:
        async with aioredis.Redis.from_url(node.url, socket_timeout=5) as client:
            await client.execute_command(
                "ACL", "SETUSER", "parley-chat", "on", f">{password}", *rules.split()
            )
    line, text, _ = await redis_not_ready(
        PARLEY_REDIS_URL=cluster.nodes[0].url_for("parley-chat", password),
        PARLEY_REDIS_CLUSTER="true",
        PARLEY_HEALTH_CHECK_INTERVAL="0.2s",
    )
    assert "Redis refused a command chat needs" in line and "+cluster|slots" in line
    assert "Traceback" not in text
