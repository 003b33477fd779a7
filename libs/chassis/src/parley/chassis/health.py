"""grpc.health.v1 statuses driven by background dependency checks, not by the probes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from parley.chassis.config import ServerSettings
from parley.chassis.errors import LimitExceeded, NotFound
from parley.chassis.limits import (
    HEALTH_SERVICE_NAME,
    HEALTH_WATCHES_PER_CONNECTION,
    HEALTH_WATCHES_PER_REPLICA,
    Quota,
)
from parley.chassis.metrics import GrpcServerMetrics
from parley.chassis.tasks import cancel_and_wait

__all__ = ["BoundedHealthServicer", "DependencyCheck", "DependencyMonitor", "WatchRefused"]

_log = logging.getLogger("parley.health")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class WatchRefused(LimitExceeded):
    """A health Watch over a limit. UNIMPLEMENTED rather than RESOURCE_EXHAUSTED: a client
    that watches health to pick connections (gRFC A17, as the SDK does) then treats the
    connection as healthy and goes on, where any other code would make it unusable."""

    code = grpc.StatusCode.UNIMPLEMENTED


class BoundedHealthServicer(health_pb2_grpc.HealthServicer):
    """grpc.health.v1 with limits, since anyone may call it without a token: the length of
    a service name, and the Watch streams one connection and the replica hold.

    Written here rather than on grpc's aio HealthServicer, whose Watch writes to the client
    while holding the lock that setting a status takes: one client that never read froze
    every status change, and with it readiness and the drain on SIGTERM. Here a Watch waits
    for a change without a lock, and a client that does not read stalls only its own call.
    """

    def __init__(self, settings: ServerSettings) -> None:
        self._statuses: dict[str, int] = {"": SERVING}
        self._changed = asyncio.Event()  # set, and replaced, at every change
        self._shutting_down = False
        self._max_name = settings.health_max_service_name
        self._per_connection = Quota(settings.health_max_watches_per_connection)
        self._watches = Quota(settings.health_max_watches)

    async def set(self, service: str, status: int) -> None:
        """Sets a service's status; ignored once the servicer is shutting down."""
        if not self._shutting_down:
            self._statuses[service] = status
            self._notify()

    async def enter_graceful_shutdown(self) -> None:
        """Every status NOT_SERVING, for good."""
        if not self._shutting_down:
            self._shutting_down = True
            for service in self._statuses:
                self._statuses[service] = NOT_SERVING
            self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _check_name(self, service: str) -> None:
        size = len(service.encode())
        if size > self._max_name:
            raise LimitExceeded(
                HEALTH_SERVICE_NAME,
                "PARLEY_HEALTH_MAX_SERVICE_NAME",
                self._max_name,
                f"the service name is {size} bytes long; no service here has so long a name",
            )

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        self._check_name(request.service)
        status = self._statuses.get(request.service)
        if status is None:
            raise NotFound(f"no service {request.service!r} here", reason="UNKNOWN_SERVICE")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        self._check_name(request.service)
        peer = context.peer()
        if not self._per_connection.take(peer):
            raise WatchRefused(
                HEALTH_WATCHES_PER_CONNECTION,
                "PARLEY_HEALTH_MAX_WATCHES_PER_CONNECTION",
                self._per_connection.limit,
                "too many health Watch streams open on this connection; use Check",
            )
        if not self._watches.take(None):
            self._per_connection.give_back(peer)
            raise WatchRefused(
                HEALTH_WATCHES_PER_REPLICA,
                "PARLEY_HEALTH_MAX_WATCHES",
                self._watches.limit,
                "this replica holds as many health Watch streams as it may; use Check",
            )
        try:
            sent = None
            while True:
                changed = self._changed  # taken before the status is read: no change is missed
                status = self._statuses.get(request.service, SERVICE_UNKNOWN)
                if status != sent:
                    await context.write(health_pb2.HealthCheckResponse(status=status))
                    sent = status
                await changed.wait()
        finally:
            self._per_connection.give_back(peer)
            self._watches.give_back(None)


@dataclass(frozen=True)
class DependencyCheck:
    """A named probe of one dependency; it raises (or times out) when the dependency is down."""

    name: str
    probe: Callable[[], Awaitable[None]]
    # A failing non-critical dependency leaves the service ready but degraded: the health
    # service "dependency/<name>" goes NOT_SERVING and the log says what is degraded.
    critical: bool = True


class DependencyMonitor:
    """Checks every dependency on an interval and sets the services' readiness from the results.

    The overall service "" stays SERVING while the process runs (liveness); each named
    service is SERVING only while every critical dependency passes (readiness).
    """

    def __init__(
        self,
        servicer: BoundedHealthServicer,
        service_names: Sequence[str],
        checks: Sequence[DependencyCheck],
        metrics: GrpcServerMetrics,
        interval: float,
    ) -> None:
        self._servicer = servicer
        self._service_names = list(service_names)
        self._checks = list(checks)
        self._metrics = metrics
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self._failures: dict[str, str] = {}
        self._ready: bool | None = None
        self._degraded: dict[str, int] = {}

    def add(self, check: DependencyCheck) -> None:
        """Adds a check before `start()`."""
        self._checks.append(check)

    @property
    def failures(self) -> dict[str, str]:
        """Dependency name to the last error, for each dependency that is down."""
        return dict(self._failures)

    async def start(self) -> None:
        await self._servicer.set("", SERVING)
        for name in self._service_names:
            await self._servicer.set(name, NOT_SERVING)
        await self.check_once()
        self._task = asyncio.create_task(self._loop(), name="dependency-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.check_once()

    async def check_once(self) -> bool:
        results = await asyncio.gather(*(self._run(check) for check in self._checks))
        for check, ok in zip(self._checks, results, strict=True):
            if check.critical:
                continue
            status = SERVING if ok else NOT_SERVING
            if self._degraded.get(check.name) != status:
                self._degraded[check.name] = status
                await self._servicer.set(f"dependency/{check.name}", status)
                if not ok:
                    _log.warning("degraded: %s: %s", check.name, self._failures.get(check.name))
        ready = all(ok for check, ok in zip(self._checks, results, strict=True) if check.critical)
        if ready != self._ready:
            status = SERVING if ready else NOT_SERVING
            for name in self._service_names:
                await self._servicer.set(name, status)
            if ready:
                _log.info("ready: every dependency is reachable")
            else:
                _log.warning(
                    "not ready: %s", "; ".join(f"{k}: {v}" for k, v in self._failures.items())
                )
            self._ready = ready
        return ready

    async def _run(self, check: DependencyCheck) -> bool:
        start = time.perf_counter()
        try:
            await asyncio.wait_for(check.probe(), timeout=max(self._interval, 1.0))
        except Exception as exc:  # any failure of a probe means the dependency is down
            self._failures[check.name] = str(exc) or type(exc).__name__
            ok = False
        else:
            self._failures.pop(check.name, None)
            ok = True
        self._metrics.dependency_check_seconds.labels(check.name).observe(
            time.perf_counter() - start
        )
        self._metrics.dependency_up.labels(check.name).set(1 if ok else 0)
        return ok
