"""Parley's services, started for a test.

A service runs either as a child process, `parley-<kind> serve` started by
`parley.devstack.services.Service` (the one way Parley's tools and tests start one), or as a
`GrpcApp` inside the test's own process, where a test needs to look at its insides. Either
way the test gets a `Served`; the `Launcher` stops whatever is still running afterwards.

Child processes listen on ports picked below the kernel's ephemeral range and keep them across
restarts. Their output goes to a log file in the launcher's directory.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from parley.chassis import Env, GrpcApp
from parley.devstack.errors import DevstackError
from parley.devstack.processes import stop_all
from parley.devstack.services import Service, ServiceSpec
from parley.devstack.services import run_to_exit as devstack_run_to_exit
from parley.proto.contract import CHAT_SERVICE, USER_SERVICE
from parley.testing.network import free_port, health_status
from parley.testing.waiting import wait_until

__all__ = [
    "HEALTH_NAMES",
    "JWT_SECRET",
    "SERVING",
    "Launcher",
    "Served",
    "chat_env",
    "run_to_exit",
    "service_env",
]

# The HS256 secret every service a test starts accepts: one per test process, never written.
JWT_SECRET = secrets.token_urlsafe(32)

HEALTH_NAMES = {"user": USER_SERVICE, "chat": CHAT_SERVICE}
SERVING = health_pb2.HealthCheckResponse.SERVING

# What a service says when a port it was given is taken, and how often to try new ones.
_PORT_TAKEN = ("cannot listen on", "Address already in use")
_BIND_ATTEMPTS = 3

# How long a service may take to report SERVING, and to drain after SIGTERM.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


def service_env(database: str, **overrides: str) -> dict[str, str]:
    """The PARLEY_* settings of a test's UserService (and the base of a ChatService's) on
    `database`: loopback, ports picked by the launcher (0), quick health checks, short drain."""
    env = {
        "PARLEY_DATABASE_URL": database,
        "PARLEY_JWT_SECRET": JWT_SECRET,
        "PARLEY_GRPC_HOST": "127.0.0.1",
        "PARLEY_GRPC_PORT": "0",
        "PARLEY_METRICS_HOST": "127.0.0.1",
        "PARLEY_METRICS_PORT": "0",
        "PARLEY_HEALTH_CHECK_INTERVAL": "0.2",
        "PARLEY_SHUTDOWN_GRACE": "3",
        "PARLEY_LOG_LEVEL": "INFO",
    }
    env.update(overrides)
    return env


def chat_env(
    database: str, redis_url: str, prefix: str, user_service: str, **overrides: str
) -> dict[str, str]:
    """`service_env` plus what a ChatService needs, with rate limits no test reaches by
    accident and a quick re-check of open streams."""
    env = service_env(
        database,
        PARLEY_REDIS_URL=redis_url,
        PARLEY_REDIS_PREFIX=prefix,
        PARLEY_USER_SERVICE_ADDR=user_service,
        PARLEY_CHAT_RATE_LIMIT="100000",
        PARLEY_CHAT_RATE_BURST="100000",
        PARLEY_CHAT_RESYNC_INTERVAL="0.5",
    )
    env.update(overrides)
    return env


@dataclass
class Served:
    """A running UserService or ChatService: in this process (`app`) or a child (`service`)."""

    kind: str  # "user" or "chat"
    app: GrpcApp | None = None
    service: Service | None = None
    # Where an in-process app listened; kept once it has stopped.
    _app_ports: tuple[int, int] = (0, 0)

    @property
    def port(self) -> int:
        if self.service is not None:
            return self.service.port
        return self.app.port if self.app is not None else self._app_ports[0]

    @property
    def metrics_port(self) -> int:
        if self.service is not None:
            return self.service.metrics_port
        return self.app.metrics_port if self.app is not None else self._app_ports[1]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def health_name(self) -> str:
        return HEALTH_NAMES[self.kind]

    @property
    def pid(self) -> int:
        assert self.service is not None, "an in-process server has no pid of its own"
        return self.service.process.pid

    @property
    def returncode(self) -> int | None:
        assert self.service is not None, "an in-process server has no exit code"
        return self.service.process.returncode

    def alive(self) -> bool:
        return self.service is not None and self.service.running()

    def log_text(self) -> str:
        return self.service.log_text() if self.service is not None else ""


def run_to_exit(
    kind: str, env: Mapping[str, str], *, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Runs `parley-<kind> serve` that is meant to refuse to start, until it exits, with its
    stdout and stderr apart (for tests of what a misconfigured service says). The environment
    is the test's without the developer's PARLEY_* and OTEL_* settings, plus `env`. The test
    fails if the service is still running after `timeout`."""
    try:
        return devstack_run_to_exit(f"parley-{kind}", "serve", _child_environ(env), timeout=timeout)
    except DevstackError as exc:
        pytest.fail(str(exc), pytrace=False)


def _child_environ(env: Mapping[str, str]) -> dict[str, str]:
    """The test's environment without the developer's PARLEY_* and OTEL_* settings, plus
    `env`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PARLEY_", "OTEL_"))}
    return {**base, **env}


class Launcher:
    """Starts services for a test (or a session) and stops whatever still runs afterwards.

    Stopping an in-process app leaves its metrics HTTP server to finish on a thread of its own
    (it polls for shutdown twice a second); those threads go in `background`.
    """

    def __init__(self, directory: Path, background: list[threading.Thread] | None = None) -> None:
        self.directory = directory
        self.background = background if background is not None else []
        self.served: list[Served] = []
        self._numbers = itertools.count(1)  # next() is atomic: processes start on threads

    # --- in this process ----------------------------------------------------------------

    async def app(self, kind: str, env: Mapping[str, str], *, ready: bool = True) -> Served:
        """A server in this process; `ready` waits until its service reports SERVING."""
        if kind == "chat":
            from parley.chat_service import ChatSettings, create_server

            app = create_server(ChatSettings.from_env(Env(dict(env))))
        else:
            from parley.user_service import UserSettings
            from parley.user_service import create_server as create_user_server

            app = create_user_server(UserSettings.from_env(Env(dict(env))))
        await app.start()
        served = Served(kind, app=app, _app_ports=(app.port, app.metrics_port))
        self.served.append(served)
        if ready:
            await self.wait_ready(served)
        return served

    # --- child processes ----------------------------------------------------------------

    def process_sync(
        self, kind: str, env: Mapping[str, str], *, ready: bool = True, timeout: float = 0
    ) -> Served:
        """`parley-<kind> serve` as a child process; with `ready`, once it reports SERVING,
        else once it answers at all (liveness). The test fails, with the end of the service's
        log, if it exits or times out first.

        Ports not given in `env` are picked below the kernel's ephemeral range (`free_port`),
        so that no outgoing connection takes one while a restarted service is down; a start
        that loses its port to another process anyway is tried again on new ones."""
        timeout = timeout or START_TIMEOUT
        for attempt in range(1, _BIND_ATTEMPTS + 1):
            number = next(self._numbers)
            spec = ServiceSpec(
                f"parley-{kind} #{number}",
                f"parley-{kind}",
                HEALTH_NAMES[kind],
                int(env.get("PARLEY_GRPC_PORT", "0")) or free_port(),
                int(env.get("PARLEY_METRICS_PORT", "0")) or free_port(),
            )
            log = self.directory / f"parley-{kind}-{number}.log"
            service = Service(spec, _child_environ(env), log_path=log)
            served = Served(kind, service=service)
            self.served.append(served)
            try:
                service.wait_serving(timeout, name=None if ready else "")
                return served
            except DevstackError as exc:
                lost_port = any(sign in served.log_text() for sign in _PORT_TAKEN)
                if not (lost_port and attempt < _BIND_ATTEMPTS):
                    pytest.fail(str(exc), pytrace=False)
        raise AssertionError("unreachable")

    async def process(self, kind: str, env: Mapping[str, str], *, ready: bool = True) -> Served:
        """`process_sync` without blocking the event loop."""
        return await asyncio.to_thread(self.process_sync, kind, env, ready=ready)

    async def restart(self, served: Served, *, ready: bool = True) -> None:
        """Starts an ended child process again, on the same ports."""
        service = served.service
        assert service is not None
        service.start()
        try:
            await asyncio.to_thread(service.wait_serving, START_TIMEOUT, None if ready else "")
        except DevstackError as exc:
            pytest.fail(str(exc), pytrace=False)

    async def wait_ready(
        self, served: Served, timeout: float = 20, *, name: str | None = None
    ) -> None:
        """Waits until `served` reports its service (or the health name `name`) SERVING."""
        name = name or served.health_name

        async def serving() -> bool:
            try:
                return await health_status(served.port, name) == SERVING
            except grpc.aio.AioRpcError:
                return False

        await wait_until(serving, timeout, f"{name} on port {served.port} to be SERVING")

    async def terminate(self, served: Served, timeout: float = 30) -> tuple[float, int]:
        """SIGTERM a child process and wait for it to exit: (seconds it took, exit code). The
        test fails if it is still running after `timeout`."""
        assert served.service is not None
        process = served.service.process
        started = time.monotonic()
        process.send(signal.SIGTERM)
        if not await asyncio.to_thread(process.wait, timeout):
            process.stop(signal.SIGKILL, 10)
            pytest.fail(
                f"parley-{served.kind} did not exit {timeout:g}s after SIGTERM:\n"
                + served.log_text()[-3000:]
            )
        code = process.returncode
        assert code is not None
        return time.monotonic() - started, code

    async def kill(self, served: Served) -> None:
        """SIGKILL a child process and wait until it is gone."""
        assert served.service is not None
        await asyncio.to_thread(served.service.stop, signal.SIGKILL, 10)

    async def stop(self, served: Served) -> None:
        """Stops a server as in production: it drains on SIGTERM (or `GrpcApp.stop()`)."""
        if served.app is not None:
            app, served.app = served.app, None
            stopping = app.release_metrics_server()
            if stopping is not None:
                self.background.append(stopping)
            await app.stop()
        if served.service is not None and served.service.running():
            await asyncio.to_thread(served.service.stop, signal.SIGTERM, STOP_TIMEOUT)

    async def close(self) -> None:
        """Stops everything still running: the child processes together (one SIGTERM each,
        then they drain), the in-process apps alongside."""
        apps = [served for served in reversed(self.served) if served.app is not None]
        results = await asyncio.gather(
            asyncio.to_thread(self._stop_processes),
            *(self.stop(served) for served in apps),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def close_sync(self) -> None:
        """`close` for sessions without an event loop: child processes only."""
        assert all(s.app is None for s in self.served), "in-process apps need `await close()`"
        self._stop_processes()

    def _stop_processes(self) -> None:
        processes = [
            served.service.process
            for served in self.served
            if served.service is not None and served.service.running()
        ]
        stop_all(processes, signal.SIGTERM, STOP_TIMEOUT)
