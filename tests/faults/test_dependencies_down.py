"""Redis, then UserService, stop and come back while clients chat across two replicas."""

from __future__ import annotations

import asyncio
import time

from parley.testing.chat_load import Chatter, settle_room
from parley.testing.launcher import Launcher
from parley.testing.stack import USER_DEPENDENCY, create_people, stored_messages

from .conftest import NOT_SERVING, SERVING, TOKEN_TTL, Cluster, Fleet


async def two_replicas(fleet: Fleet) -> tuple[list[Chatter], list[str]]:
    users = await fleet.add("user")
    chats = await asyncio.gather(
        *(fleet.add("chat", PARLEY_USER_SERVICE_ADDR=users.target) for _ in range(2))
    )
    for chat in chats:
        await fleet.wait_health(chat, SERVING, 20, name=USER_DEPENDENCY)
    people = (await create_people(users.target, ["Ada", "Grace"], ttl=TOKEN_TTL)).values()
    # Ada on one replica, Grace on the other: each sees the other's messages only via Redis
    # (or the replicas' backfill from Postgres).
    targets = [chats[0].target, chats[1].target]
    chatters = [Chatter(p.name, p, targets[i:] + targets[:i], "deps") for i, p in enumerate(people)]
    await asyncio.gather(*(c.open() for c in chatters))
    return chatters, targets


async def test_redis_stops_and_comes_back(cluster: Cluster, fleet: Fleet) -> None:
    chatters, _ = await two_replicas(fleet)
    chats = [p for p in fleet.procs if p.kind == "chat"]
    stop = asyncio.Event()
    load = [asyncio.create_task(c.chat(stop, 0.02)) for c in chatters]
    try:
        await asyncio.sleep(0.5)  # pacing: traffic before the fault
        before = len(await stored_messages(cluster.database, "deps"))
        await cluster.redis.stop()
        down_at = time.monotonic()
        not_serving = await fleet.wait_health(chats[0], NOT_SERVING, 10)
        await asyncio.sleep(1.0)  # pacing: chat on while Redis is down
        during = len(await stored_messages(cluster.database, "deps")) - before
        restarted = time.monotonic()
        await cluster.redis.start()
        down_for = restarted - down_at
        back = await asyncio.gather(*(fleet.wait_health(c, SERVING, 15) for c in chats))
        await asyncio.sleep(0.5)  # pacing: traffic after the fault
    finally:
        stop.set()
        await asyncio.gather(*load)
    try:
        caught_up = time.monotonic()
        rows = await settle_room(chatters, cluster.database, "deps")
        caught_up = time.monotonic() - caught_up
        reconnects = [c.reconnects for c in chatters]
    finally:
        await asyncio.gather(*(c.close() for c in chatters))
    print(
        f"\nRedis down {down_for:.2f}s: chat NOT_SERVING after {not_serving:.2f}s, SERVING"
        f" {[round(b, 2) for b in back]}s after restart; {during} messages stored while down;"
        f" {len(rows)} stored, {sum(len(c.sent) for c in chatters)} sent, received"
        f" {[len(c.received) for c in chatters]}; caught up in {caught_up:.2f}s;"
        f" reconnects {reconnects}"
    )
    assert during > 0, "no chat message was stored while Redis was down"
    assert all(c.alive() for c in chats), "a replica died"


async def test_user_service_stops_while_chatting(
    cluster: Cluster, fleet: Fleet, launcher: Launcher
) -> None:
    chatters, _ = await two_replicas(fleet)
    users = next(p for p in fleet.procs if p.kind == "user")
    chats = [p for p in fleet.procs if p.kind == "chat"]
    stop = asyncio.Event()
    load = [asyncio.create_task(c.chat(stop, 0.02)) for c in chatters]
    try:
        await asyncio.sleep(0.5)  # pacing: traffic before the fault
        exit_after, code = await launcher.terminate(users)
        assert code == 0, f"UserService exited with {code} on SIGTERM"
        before = len(await stored_messages(cluster.database, "deps"))
        degraded = await asyncio.gather(
            *(fleet.wait_health(c, NOT_SERVING, 10, name=USER_DEPENDENCY) for c in chats)
        )
        ready = [await fleet.health(c) for c in chats]
        # A known user joins with a new session while UserService is down.
        joined = Chatter("Ada-2", chatters[0].person, chatters[0].targets, "deps")
        chatters.append(joined)
        await joined.open()
        await asyncio.sleep(1.0)  # pacing: chat on while UserService is down
        during = len(await stored_messages(cluster.database, "deps")) - before
        await launcher.restart(users)
        back = await asyncio.gather(
            *(fleet.wait_health(c, SERVING, 15, name=USER_DEPENDENCY) for c in chats)
        )
    finally:
        stop.set()
        await asyncio.gather(*load)
    try:
        rows = await settle_room(chatters, cluster.database, "deps")
    finally:
        await asyncio.gather(*(c.close() for c in chatters))
    print(
        f"\nUserService stopped in {exit_after:.2f}s; chat dependency/user-service NOT_SERVING"
        f" after {[round(d, 2) for d in degraded]}s, chat.ChatService meanwhile {ready};"
        f" {during} messages stored while it was down; dependency SERVING again"
        f" {[round(b, 2) for b in back]}s after its restart; {len(rows)} stored"
    )
    assert ready == [SERVING, SERVING], f"chat readiness while UserService is down: {ready}"
    assert during > 0, "no chat message was stored while UserService was down"
