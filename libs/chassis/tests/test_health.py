"""grpc.health.v1: liveness on "", readiness of the service following its dependency probes."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from parley.chassis import DependencyCheck

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE = "user.UserService"


async def test_serving_once_started_without_dependencies(server: Any):
    assert await server.health_status("") == SERVING
    assert await server.health_status(SERVICE) == SERVING
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await server.health_status("no.such.Service")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_readiness_follows_the_probe(serve: Any, probe: Any, scrape: Any, wait_for: Any):
    probe.up = False
    running = await serve(checks=[DependencyCheck("postgres", probe)])

    # Down from the first check, which runs before start() returns.
    assert await running.health_status("") == SERVING
    assert await running.health_status(SERVICE) == NOT_SERVING
    metrics = await scrape(running.app)
    assert metrics.value("parley_dependency_up", dependency="postgres") == 0
    assert running.app.monitor.failures == {"postgres": "connection refused"}

    async def status_is(expected: int) -> bool:
        return await running.health_status(SERVICE) == expected

    async def gauge_is(expected: float) -> bool:
        metrics = await scrape(running.app)
        return metrics.value("parley_dependency_up", dependency="postgres") == expected

    probe.up = True
    await wait_for(lambda: status_is(SERVING), 5, "SERVING after the probe passes")
    assert await gauge_is(1)
    assert running.app.monitor.failures == {}

    probe.up = False
    await wait_for(lambda: status_is(NOT_SERVING), 5, "NOT_SERVING after the probe fails")
    assert await gauge_is(0)
    assert await running.health_status("") == SERVING

    probe.up = True
    await wait_for(lambda: status_is(SERVING), 5, "SERVING again")
    assert await gauge_is(1)
    assert probe.calls >= 4

    metrics = await scrape(running.app)
    assert metrics.value("parley_dependency_check_seconds_count", dependency="postgres") >= 4


async def test_any_failing_dependency_makes_the_service_not_ready(
    serve: Any, wait_for: Any, scrape: Any
):
    postgres_up = True
    redis_up = True

    async def postgres() -> None:
        if not postgres_up:
            raise OSError("postgres down")

    async def redis() -> None:
        if not redis_up:
            raise RuntimeError()

    running = await serve(
        checks=[DependencyCheck("postgres", postgres), DependencyCheck("redis", redis)]
    )
    assert await running.health_status(SERVICE) == SERVING

    redis_up = False

    async def not_serving() -> bool:
        return await running.health_status(SERVICE) == NOT_SERVING

    await wait_for(not_serving, 5, "NOT_SERVING with redis down")
    # An exception with no message is reported by its type.
    assert running.app.monitor.failures == {"redis": "RuntimeError"}
    metrics = await scrape(running.app)
    assert metrics.value("parley_dependency_up", dependency="postgres") == 1
    assert metrics.value("parley_dependency_up", dependency="redis") == 0


async def test_a_hanging_probe_counts_as_down(serve: Any, wait_for: Any):
    release = asyncio.Event()
    hang = False

    async def probe() -> None:
        if hang:
            await release.wait()

    running = await serve(checks=[DependencyCheck("postgres", probe)])
    assert await running.health_status(SERVICE) == SERVING
    hang = True

    async def not_serving() -> bool:
        return await running.health_status(SERVICE) == NOT_SERVING

    try:
        await wait_for(not_serving, 10, "NOT_SERVING while the probe hangs")
        assert "postgres" in running.app.monitor.failures
    finally:
        release.set()


async def test_watch_sees_transitions(serve: Any, probe: Any):
    running = await serve(checks=[DependencyCheck("postgres", probe)])
    watch = running.health.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
    try:
        assert (await watch.read()).status == SERVING
        probe.up = False
        assert (await asyncio.wait_for(watch.read(), 5)).status == NOT_SERVING
        probe.up = True
        assert (await asyncio.wait_for(watch.read(), 5)).status == SERVING
    finally:
        watch.cancel()
