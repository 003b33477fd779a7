"""A server on a database without the schema is alive but not ready, and says what to do."""

from __future__ import annotations

import logging

from grpc_health.v1 import health_pb2

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
