"""Chat replicas die while clients chat: one by SIGKILL, another by SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter

import grpc
import psycopg

from parley.proto import chat_pb2, chat_pb2_grpc
from parley.testing import bearer, wait_until
from parley.testing.chat_load import Chatter, settle_room
from parley.testing.launcher import Launcher
from parley.testing.metrics import scrape_metrics
from parley.testing.stack import USER_DEPENDENCY, create_people

from .conftest import SERVING, TOKEN_TTL, Cluster, Fleet

GRACE = 5.0


async def test_sigkill_and_sigterm_while_chatting(
    cluster: Cluster, fleet: Fleet, launcher: Launcher
) -> None:
    users = await fleet.add("user")
    replicas = await asyncio.gather(
        *(
            fleet.add("chat", PARLEY_USER_SERVICE_ADDR=users.target, PARLEY_SHUTDOWN_GRACE="5")
            for _ in range(3)
        )
    )
    for replica in replicas:
        await fleet.wait_health(replica, SERVING, 20, name=USER_DEPENDENCY)
    killed, termed, survivor = replicas
    people = list(
        (await create_people(users.target, ["Ada", "Grace", "Linus"], ttl=TOKEN_TTL)).values()
    )
    targets = [r.target for r in replicas]
    # Each chatter starts on a different replica: the first two lose their stream.
    chatters = [
        Chatter(p.name, p, targets[i:] + targets[:i], "faults") for i, p in enumerate(people)
    ]
    await asyncio.gather(*(c.open() for c in chatters))

    # Unary calls kept in flight on the replica that gets SIGTERM.
    calls: list[tuple[float, float, grpc.StatusCode]] = []
    messages: list[str] = []
    stop_unary = asyncio.Event()

    async def unary_load(channel: grpc.aio.Channel) -> None:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        request = chat_pb2.ListMessagesRequest(room="faults", page_size=100)
        while not stop_unary.is_set():
            started = time.monotonic()
            try:
                await stub.ListMessages(request, metadata=bearer(people[0].token), timeout=10)
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as error:
                code = error.code()
                messages.append(f"{code.name} {error.details()} at {time.monotonic():.3f}")
            calls.append((started, time.monotonic(), code))
            if code != grpc.StatusCode.OK:
                return  # the replica is gone for this worker

    async def held_calls(
        stub: chat_pb2_grpc.ChatServiceStub, n: int
    ) -> list[asyncio.Task[grpc.StatusCode]]:
        """`n` ListMessages calls started on the replica; they wait in its handler while the
        test holds a lock on chat_messages."""

        async def one() -> grpc.StatusCode:
            try:
                await stub.ListMessages(
                    chat_pb2.ListMessagesRequest(room="faults", page_size=10),
                    metadata=bearer(people[0].token),
                    timeout=GRACE + 5,
                )
                return grpc.StatusCode.OK
            except grpc.aio.AioRpcError as error:
                return error.code()

        return [asyncio.create_task(one()) for _ in range(n)]

    async def lock_waiters(conn: psycopg.AsyncConnection[tuple[int]]) -> int:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND query LIKE 'SELECT%chat_messages%'"
        )
        row = await cur.fetchone()
        return row[0] if row else 0

    stop = asyncio.Event()
    async with (
        grpc.aio.insecure_channel(termed.target) as channel,
        await psycopg.AsyncConnection.connect(cluster.database, autocommit=True) as watcher,
        await psycopg.AsyncConnection.connect(cluster.database) as locker,
    ):
        unary = [asyncio.create_task(unary_load(channel)) for _ in range(4)]
        load = [asyncio.create_task(c.chat(stop, 0.02)) for c in chatters]
        try:
            await asyncio.sleep(0.5)  # pacing: let some traffic flow before the faults
            await launcher.kill(killed)
            await asyncio.sleep(0.5)  # pacing: keep chatting on the remaining two
            # Hold ListMessages calls inside the handler of the replica about to drain.
            await locker.execute("LOCK TABLE chat_messages IN ACCESS EXCLUSIVE MODE")
            held = await held_calls(chat_pb2_grpc.ChatServiceStub(channel), 3)

            async def all_held() -> bool:
                # The background load's ListMessages wait on the lock too: the 3 of the test are
                # in the handler once the replica has every one of them open as well.
                samples = await asyncio.to_thread(scrape_metrics, termed.metrics_port)
                open_calls = samples.get("parley_unary_calls_open", 0)
                expected = len(held) + sum(not task.done() for task in unary)
                return open_calls >= expected and await lock_waiters(watcher) >= expected

            await wait_until(all_held, 10, "ListMessages calls to wait on the lock")
            in_handler = await lock_waiters(watcher)
            signalled = time.monotonic()
            termed.service.process.send(signal.SIGTERM)  # type: ignore[union-attr]
            await fleet.wait_health(survivor, SERVING, 5)  # pacing: the drain is under way
            await asyncio.sleep(1.0)  # the held calls stay in flight for a second of the drain
            await locker.rollback()
            held_codes = await asyncio.gather(*held)
            await asyncio.to_thread(termed.service.process.wait, GRACE + 5)  # type: ignore[union-attr]
            exit_code = termed.returncode
            exit_after = time.monotonic() - signalled
            await asyncio.sleep(1.0)  # pacing: keep chatting on the survivor
        finally:
            stop.set()
            stop_unary.set()
            await asyncio.gather(*load, *unary)
    try:
        rows = await settle_room(chatters, cluster.database, "faults")
        reconnects = [c.reconnects for c in chatters]
    finally:
        await asyncio.gather(*(c.close() for c in chatters))

    racing = Counter(c[2].name for c in calls if c[0] < signalled < c[1])
    bad = [m for m in messages if not m.startswith(("UNAVAILABLE", "CANCELLED"))]
    print(
        f"\nSIGTERM'd replica exited {exit_after:.2f}s after the signal (code {exit_code});"
        f" {in_handler} ListMessages held in its handler at SIGTERM;"
        f" the 3 of the test ended {held_codes};"
        f" {len(rows)} messages stored, {sum(len(c.sent) for c in chatters)} sent,"
        f" each of {len(chatters)} readers received {[len(c.received) for c in chatters]};"
        f" reconnects {reconnects}; background ListMessages {len(calls)}, racing SIGTERM"
        f" {dict(racing)}; errors {messages}"
    )
    assert in_handler >= 3, f"only {in_handler} ListMessages calls were held in the handler"
    assert held_codes == [grpc.StatusCode.OK] * 3, (
        f"ListMessages calls in flight at SIGTERM ended {held_codes}, not completed"
    )
    assert exit_code == 0, f"the SIGTERM'd replica exited with {exit_code}"
    assert exit_after < GRACE, f"the SIGTERM'd replica took {exit_after:.2f}s to exit"
    assert not bad, f"background calls on the draining replica failed unexpectedly: {bad}"
    assert survivor.alive(), "survivor died"
    assert reconnects[0] >= 1 and reconnects[1] >= 1, f"no failover happened: {reconnects}"
