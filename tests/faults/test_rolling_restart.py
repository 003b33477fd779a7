"""A rolling restart of every replica of both services, one by one, under load through the SDK.

The load is idempotent unary calls (GetUser, ListUsers, ListMessages, which the SDK retries on
UNAVAILABLE) plus chat sessions (whose sends carry client message ids, so resending is safe).
CreateUser is left out: the SDK does not retry it, and a retry could create the user twice.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from parley.client import AsyncChatClient, AsyncUserClient, ParleyError
from parley.testing import wait_until
from parley.testing.chat_load import Chatter, Tally, settle_room
from parley.testing.launcher import Launcher, Served
from parley.testing.stack import USER_DEPENDENCY, create_people

from .conftest import SERVING, TOKEN_TTL, Cluster, Fleet, ipv4_target

LOAD_METHODS = {"user": ("GetUser", "ListUsers"), "chat": ("ListMessages", "StreamChat")}
DRAIN = {"PARLEY_SHUTDOWN_DELAY": "1", "PARLEY_SHUTDOWN_GRACE": "5"}


@pytest.mark.timeout(180)
async def test_rolling_restart_under_load(
    cluster: Cluster, fleet: Fleet, launcher: Launcher
) -> None:
    users = list(await asyncio.gather(*(fleet.add("user", **DRAIN) for _ in range(2))))
    user_target = ipv4_target(users)
    chats = list(
        await asyncio.gather(
            *(fleet.add("chat", PARLEY_USER_SERVICE_ADDR=user_target, **DRAIN) for _ in range(2))
        )
    )
    for chat in chats:
        await fleet.wait_health(chat, SERVING, 20, name=USER_DEPENDENCY)
    people = list(
        (await create_people(user_target, ["Ada", "Grace", "Linus"], ttl=TOKEN_TTL)).values()
    )
    chat_targets = [c.target for c in chats]
    chatters = [
        Chatter(p.name, p, chat_targets[i % 2 :] + chat_targets[: i % 2], "rolling")
        for i, p in enumerate(people)
    ]
    await asyncio.gather(*(c.open() for c in chatters))

    user_calls, chat_calls = Tally(), Tally()
    stop = asyncio.Event()

    async def user_load(client: AsyncUserClient, n: int) -> None:
        while not stop.is_set():
            try:
                if n % 2:
                    await client.get_user(people[n % len(people)].id)
                else:
                    await client.list_users_page(page_size=10)
                user_calls.ok += 1
            except ParleyError as error:
                user_calls.fail(error)
            await asyncio.sleep(0.01)  # pacing

    async def chat_load(client: AsyncChatClient) -> None:
        while not stop.is_set():
            try:
                await client.list_messages_page("rolling", page_size=20)
                chat_calls.ok += 1
            except ParleyError as error:
                chat_calls.fail(error)
            await asyncio.sleep(0.01)  # pacing

    restarts: list[str] = []

    async def restart(proc: Served) -> None:
        started = time.monotonic()
        exit_after, code = await launcher.terminate(proc, timeout=15)
        assert code == 0, f"parley-{proc.kind} on {proc.port} exited with {code} on SIGTERM"
        await launcher.restart(proc)
        if proc.kind == "chat":
            await fleet.wait_health(proc, SERVING, 20, name=USER_DEPENDENCY)
        ready = time.monotonic() - started
        # As a rollout waits for a new pod to take traffic before it replaces the next one:
        # the clients reconnect after their backoff (up to a few seconds here).
        methods = LOAD_METHODS[proc.kind]

        async def taking_traffic() -> bool:
            return await fleet.handled(proc, methods) >= 5

        await wait_until(taking_traffic, 15, f"{proc.target} to serve the load again")
        restarts.append(
            f"{proc.kind}:{proc.port} exit {exit_after:.2f}s, ready {ready:.2f}s,"
            f" taking traffic {time.monotonic() - started:.2f}s"
        )

    async with (
        AsyncUserClient(user_target, token=people[0].token, timeout=10) as user_client,
        AsyncChatClient(ipv4_target(chats), token=people[0].token, timeout=10) as chat_client,
    ):
        load = [asyncio.create_task(user_load(user_client, n)) for n in range(2)]
        load += [asyncio.create_task(chat_load(chat_client)) for _ in range(2)]
        load += [asyncio.create_task(c.chat(stop, 0.05)) for c in chatters]
        rolled = time.monotonic()
        try:
            for proc in [*users, *chats]:
                await restart(proc)
            rolled = time.monotonic() - rolled
            await asyncio.sleep(0.5)  # pacing: some load on the fully restarted fleet
        finally:
            stop.set()
            await asyncio.gather(*load)
    try:
        rows = await settle_room(chatters, cluster.database, "rolling")
        reconnects = [c.reconnects for c in chatters]
    finally:
        await asyncio.gather(*(c.close() for c in chatters))

    print(
        f"\nrolled 4 replicas in {rolled:.1f}s ({restarts}); UserService calls {user_calls};"
        f" ListMessages calls {chat_calls}; chat: {len(rows)} stored,"
        f" {sum(len(c.sent) for c in chatters)} sent, received"
        f" {[len(c.received) for c in chatters]}, reconnects {reconnects}"
    )
    assert all(p.service and p.service.starts == 2 for p in [*users, *chats]), (
        "not every replica was restarted"
    )
    assert user_calls.failed == 0, f"UserService calls failed during the roll: {user_calls}"
    assert chat_calls.failed == 0, f"ListMessages calls failed during the roll: {chat_calls}"
    assert user_calls.ok > 50 and chat_calls.ok > 20, (
        f"too little load ran: {user_calls.ok} user calls, {chat_calls.ok} chat calls"
    )
    assert sum(reconnects) >= len(chatters), f"chat sessions did not fail over: {reconnects}"
