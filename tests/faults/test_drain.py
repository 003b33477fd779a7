"""A replica stopped with SIGTERM under a steady load of calls: with the client's health
checking (the SDK's service config), not one call fails, even with retries turned off.

Without it, calls that reach a stopping grpc.aio server between its last request for work and
its shutdown are cancelled by grpc itself (the client sees CANCELLED: 12 and 88 in two runs of
this test without health checking). The server reports its overall health ("") NOT_SERVING as
it starts to drain; a client that watches it sends its new calls to the other replica during
PARLEY_SHUTDOWN_DELAY, before the listener closes.
"""

from __future__ import annotations

import asyncio
import collections

import grpc

from parley.client._channel import USER_SERVICE, channel_options
from parley.proto import user_pb2, user_pb2_grpc
from parley.testing import bearer, wait_until
from parley.testing.launcher import Launcher
from parley.testing.stack import create_people

from .conftest import ADMIN_TOKEN, TOKEN_TTL, Cluster, Fleet, ipv4_target

DRAIN = {"PARLEY_SHUTDOWN_DELAY": "1", "PARLEY_SHUTDOWN_GRACE": "5"}
IN_FLIGHT = 128


async def test_sigterm_under_load_fails_no_call(
    cluster: Cluster, fleet: Fleet, launcher: Launcher
) -> None:
    replicas = list(await asyncio.gather(*(fleet.add("user", **DRAIN) for _ in range(2))))
    (ada,) = (await create_people(ipv4_target(replicas), ["Ada"], ttl=TOKEN_TTL)).values()
    # The SDK's channel settings, with retries off: every failure the server causes shows.
    options = channel_options(USER_SERVICE, [("grpc.enable_retries", 0)])
    outcomes: collections.Counter[str] = collections.Counter()
    stop = asyncio.Event()

    async with grpc.aio.insecure_channel(ipv4_target(replicas), options=options) as channel:
        stub = user_pb2_grpc.UserServiceStub(channel)
        request = user_pb2.GetUserRequest(id=ada.id)
        metadata = bearer(ADMIN_TOKEN)

        async def load() -> None:
            while not stop.is_set():
                try:
                    await stub.GetUser(request, metadata=metadata, timeout=5)
                    outcomes["OK"] += 1
                except grpc.aio.AioRpcError as error:
                    outcomes[f"{error.code().name}: {error.details()}"] += 1

        workers = [asyncio.create_task(load()) for _ in range(IN_FLIGHT)]
        try:
            # Both replicas are taking calls before one is stopped.
            async def both_serve() -> bool:
                handled = [await fleet.handled(r, ["GetUser"]) for r in replicas]
                return all(count >= 50 for count in handled)

            await wait_until(both_serve, 20, "both replicas to serve GetUser")
            exit_took, code = await launcher.terminate(replicas[0], 15)
            before_end = outcomes["OK"]

            async def more_after_stop() -> bool:
                return outcomes["OK"] >= before_end + 500

            await wait_until(more_after_stop, 10, "calls to go on on the other replica")
        finally:
            stop.set()
            await asyncio.gather(*workers)

    print(f"\nstopped replica exited {code} after {exit_took:.2f}s; outcomes {dict(outcomes)}")
    assert code == 0, f"the stopped replica exited with {code}"
    failed = {k: v for k, v in outcomes.items() if k != "OK"}
    assert not failed, f"calls failed while a replica drained: {failed}"
