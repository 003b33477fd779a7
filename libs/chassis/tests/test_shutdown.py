"""Graceful shutdown: NOT_SERVING, in-flight calls finish, stragglers are cancelled at the grace."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from parley.chassis import DependencyCheck
from parley.proto import user_pb2, user_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE = "user.UserService"


async def _slow(request: Any, context: Any) -> Any:
    await asyncio.sleep(0.5)
    return user_pb2.GetUserResponse(user=user_pb2.User(id=request.id, name="slow"))


async def assert_refused(target: str) -> None:
    """A new connection to `target` gets UNAVAILABLE."""
    async with grpc.aio.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_in_flight_call_completes_while_draining(serve: Any, auth: Any):
    running = await serve(PARLEY_SHUTDOWN_GRACE="5s")
    running.servicer.get_user = _slow
    metrics_url = f"http://127.0.0.1:{running.app.metrics_port}/metrics"
    watch = running.health.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
    assert (await watch.read()).status == SERVING

    call = running.stub.GetUser(user_pb2.GetUserRequest(id=5), metadata=auth, timeout=10)
    await asyncio.wait_for(running.servicer.entered.wait(), 5)
    started = time.monotonic()
    stopping = asyncio.create_task(running.stop())

    # Draining is announced to watchers while the slow call is still running.
    assert (await asyncio.wait_for(watch.read(), 5)).status == NOT_SERVING
    assert not call.done()
    watch.cancel()

    response = await call
    assert response.user.id == 5 and response.user.name == "slow"
    assert await call.code() == grpc.StatusCode.OK
    await asyncio.wait_for(stopping, 10)
    # It waited for the call, not for the whole grace period.
    assert time.monotonic() - started < 4

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await running.stub.GetUser(user_pb2.GetUserRequest(id=1), metadata=auth, timeout=2)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    await assert_refused(running.target)
    # The metrics endpoint is closed too.
    with pytest.raises(urllib.error.URLError):
        await asyncio.to_thread(urllib.request.urlopen, metrics_url, None, 2)


async def test_not_serving_before_the_listener_closes(serve: Any, auth: Any, wait_for: Any):
    delay = 0.3
    drain_started: list[float] = []
    draining = asyncio.Event()
    release = asyncio.Event()

    async def hold_drain() -> None:
        drain_started.append(time.monotonic())
        draining.set()
        await release.wait()

    running = await serve(
        PARLEY_SHUTDOWN_DELAY=f"{delay}s", before_start=lambda app: app.on_drain(hold_drain)
    )
    assert await running.health_status(SERVICE) == SERVING
    started = time.monotonic()
    stopping = asyncio.create_task(running.stop())

    async def not_serving() -> bool:
        statuses = {await running.health_status(""), await running.health_status(SERVICE)}
        return statuses == {NOT_SERVING}

    await wait_for(not_serving, 5, "NOT_SERVING once stop() begins")
    await asyncio.wait_for(draining.wait(), 5)
    # Load balancers were given the shutdown delay to see NOT_SERVING ...
    assert drain_started[0] - started >= delay - 0.01
    # ... and the listener is still open, so calls still work until the server stops.
    assert await not_serving()
    response = await running.stub.GetUser(user_pb2.GetUserRequest(id=3), metadata=auth, timeout=2)
    assert response.user.id == 3
    assert not stopping.done()

    release.set()
    await asyncio.wait_for(stopping, 10)
    await assert_refused(running.target)


async def test_call_past_the_grace_is_cancelled(serve: Any, auth: Any):
    grace = 0.5
    running = await serve(PARLEY_SHUTDOWN_GRACE=f"{grace}s")
    handler_cancelled = asyncio.Event()

    async def forever(request: Any, context: Any) -> Any:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            handler_cancelled.set()
            raise

    running.servicer.get_user = forever
    call = running.stub.GetUser(user_pb2.GetUserRequest(id=1), metadata=auth, timeout=30)
    await asyncio.wait_for(running.servicer.entered.wait(), 5)

    started = time.monotonic()
    await asyncio.wait_for(running.stop(), grace + 5)
    elapsed = time.monotonic() - started
    assert grace - 0.05 <= elapsed < grace + 2

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() in {grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE}
    await asyncio.wait_for(handler_cancelled.wait(), 5)
    canceled = running.app.metrics.registry.get_sample_value(
        "grpc_server_handled_total",
        {
            "grpc_type": "unary",
            "grpc_service": SERVICE,
            "grpc_method": "GetUser",
            "grpc_code": "Canceled",
        },
    )
    assert canceled == 1


async def test_hooks_run_in_order_and_drain_can_end_streams(serve: Any, auth: Any):
    running = await serve(PARLEY_SHUTDOWN_GRACE="10s")
    app = running.app
    events: list[str] = []
    end_streams = asyncio.Event()

    async def until_drained(request: Any, context: Any) -> AsyncIterator[Any]:
        yield user_pb2.User(id=1)
        await end_streams.wait()
        yield user_pb2.User(id=2)

    async def on_drain() -> None:
        # The listener is still open while drain hooks run.
        events.append(f"drain health={await running.health_status(SERVICE)}")
        end_streams.set()

    async def on_stop() -> None:
        events.append("stop")

    app.on_drain(on_drain)
    app.on_stop(on_stop)
    running.servicer.list_users = until_drained
    call = running.stub.ListUsers(user_pb2.ListUsersRequest(), metadata=auth, timeout=20)
    assert (await call.read()).id == 1

    started = time.monotonic()
    await running.stop()
    assert time.monotonic() - started < 5
    assert (await call.read()).id == 2
    assert await call.read() is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK
    assert events == [f"drain health={NOT_SERVING}", "stop"]


async def test_on_start_hooks_run_before_serving(serve: Any):
    events: list[str] = []
    ports: list[int] = []

    async def probe() -> None:
        events.append("probe")

    def register(app: Any) -> None:
        async def on_start() -> None:
            events.append("start")
            ports.append(app.metrics_port)

        app.on_start(on_start)

    running = await serve(checks=[DependencyCheck("db", probe)], before_start=register)
    assert events[:2] == ["start", "probe"]
    assert ports == [0]  # the metrics endpoint was not up yet
    assert running.app.metrics_port != 0


SERVER_SCRIPT = textwrap.dedent(
    """
    import asyncio

    from parley.chassis import (
        AuthSettings, Env, GrpcApp, ServerSettings, TokenVerifier, configure_logging,
    )
    from parley.proto import user_pb2, user_pb2_grpc


    class Slow(user_pb2_grpc.UserServiceServicer):
        async def GetUser(self, request, context):
            print("entered", flush=True)
            await asyncio.sleep(1)
            return user_pb2.GetUserResponse(user=user_pb2.User(id=request.id, name="slow"))


    async def main():
        env = Env()
        settings = ServerSettings.from_env(env, default_port=0, default_metrics_port=0)
        configure_logging(settings.log_format, settings.log_level)
        app = GrpcApp(
            settings,
            services=[user_pb2.DESCRIPTOR.services_by_name["UserService"]],
            verifier=TokenVerifier(AuthSettings.from_env(env)),
        )
        user_pb2_grpc.add_UserServiceServicer_to_server(Slow(), app.server)
        print(app.port, flush=True)
        await app.run()
        print("exited", flush=True)


    asyncio.run(main())
    """
)


async def _read_line(stream: asyncio.StreamReader, timeout: float = 20) -> str:
    line = await asyncio.wait_for(stream.readline(), timeout)
    return line.decode().strip()


async def test_sigterm_drains_and_exits_zero(
    tmp_path: Path, jwt_secret: str, auth: Any, wait_for: Any
):
    script = tmp_path / "slow_server.py"
    script.write_text(SERVER_SCRIPT)
    grace = 5.0
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_")}
    environ.update(
        PARLEY_GRPC_HOST="127.0.0.1",
        PARLEY_GRPC_PORT="0",
        PARLEY_METRICS_HOST="127.0.0.1",
        PARLEY_METRICS_PORT="0",
        PARLEY_SHUTDOWN_GRACE=f"{grace}s",
        PARLEY_JWT_SECRET=jwt_secret,
        PARLEY_LOG_FORMAT="json",
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        env=environ,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    stderr = asyncio.create_task(process.stderr.read())
    try:
        port = int(await _read_line(process.stdout))
        target = f"127.0.0.1:{port}"
        async with grpc.aio.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def serving() -> bool:
                try:
                    response = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                except grpc.aio.AioRpcError:
                    return False
                return response.status == SERVING

            await wait_for(serving, 20, "the subprocess to serve")

            stub = user_pb2_grpc.UserServiceStub(channel)
            call = stub.GetUser(user_pb2.GetUserRequest(id=9), metadata=auth, timeout=15)
            assert await _read_line(process.stdout) == "entered"
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)

            response = await call
            assert response.user.id == 9 and response.user.name == "slow"
            returncode = await asyncio.wait_for(process.wait(), grace + 5)
            assert returncode == 0
            assert time.monotonic() - signalled < grace
            assert await _read_line(process.stdout) == "exited"
        await assert_refused(target)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        log = (await stderr).decode()
    # The service logged JSON, one object per line, and never the caller's token.
    messages = [json.loads(line)["message"] for line in log.splitlines()]
    assert any(m.startswith("draining") for m in messages), log
    assert any(m.startswith("rpc /user.UserService/GetUser OK") for m in messages), log
    assert auth[0][1].split()[1] not in log
