"""A server on a database without the schema is alive but not ready, and says what to do."""

from __future__ import annotations

import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2

from parley.proto import user_pb2, user_pb2_grpc
from parley.user_service import SERVICE_NAME
from parley.user_service.migrations import apply_migrations

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_an_unmigrated_database_is_not_ready_until_migrated(
    start_server, empty_database, health, wait_for, caplog
):
    caplog.set_level(logging.WARNING, logger="parley.health")
    app = await start_server(empty_database)

    assert await health(app.port, "") == SERVING
    assert await health(app.port, SERVICE_NAME) == NOT_SERVING
    warnings = [r.getMessage() for r in caplog.records if r.name == "parley.health"]
    assert any(
        "schema is at version 0" in m and "run `parley-user migrate`" in m for m in warnings
    ), warnings
    assert "run `parley-user migrate`" in app.monitor.failures["postgres"]

    await apply_migrations(empty_database)

    async def ready() -> bool:
        return await health(app.port, SERVICE_NAME) == SERVING

    await wait_for(ready, 5, "readiness after migrating")
    assert app.monitor.failures == {}


async def test_calls_on_an_unmigrated_database_are_unavailable_not_internal(
    start_server, empty_database, auth
):
    app = await start_server(empty_database)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = user_pb2_grpc.UserServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetUser(user_pb2.GetUserRequest(id=1), metadata=auth, timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "schema is missing" in (info.value.details() or "")
