"""Postgres down: the service keeps running, says NOT_SERVING, and answers UNAVAILABLE."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2

from parley.devstack.processes import switch_user_command, unprivileged_user
from parley.proto import user_pb2, user_pb2_grpc
from parley.user_service import SERVICE_NAME
from parley.user_service.migrations import apply_migrations

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
FAST_FAIL = {"PARLEY_DB_POOL_TIMEOUT": "1s", "PARLEY_HEALTH_CHECK_INTERVAL": "0.2"}


def calls(stub, auth):
    """One call of every RPC, each awaitable on its own."""
    user = user_pb2.User(id=1, name="New")
    rows = [user_pb2.CreateUserRequest(name="A", email="a@example.com", age=1)]

    async def list_users():
        return [u async for u in stub.ListUsers(user_pb2.ListUsersRequest(), metadata=auth)]

    return {
        "GetUser": stub.GetUser(user_pb2.GetUserRequest(id=1), metadata=auth),
        "ListUsers": list_users(),
        "CreateUser": stub.CreateUser(rows[0], metadata=auth),
        "UpdateUser": stub.UpdateUser(user_pb2.UpdateUserRequest(user=user), metadata=auth),
        "DeleteUser": stub.DeleteUser(user_pb2.DeleteUserRequest(id=1), metadata=auth),
        "ImportUsers": stub.ImportUsers(iter(rows), metadata=auth),
    }


def assert_postgres_unavailable(details, error: grpc.RpcError) -> None:
    found = details(error)
    assert found.code == grpc.StatusCode.UNAVAILABLE, (found.code, found.message)
    assert found.message.startswith("postgres is unavailable"), found.message
    assert "Traceback" not in found.message
    assert "\n" not in found.message
    assert found.reason == "DEPENDENCY_UNAVAILABLE"
    assert found.metadata == {"dependency": "postgres"}


async def test_unreachable_postgres_is_unavailable_not_an_internal_error(
    start_server, unused_port, auth, health, details
):
    app = await start_server(f"postgresql://postgres@127.0.0.1:{unused_port}/parley", **FAST_FAIL)

    assert await health(app.port, "") == SERVING
    assert await health(app.port, SERVICE_NAME) == NOT_SERVING
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = user_pb2_grpc.UserServiceStub(channel)
        pending = calls(stub, auth)
        results = await asyncio.gather(*pending.values(), return_exceptions=True)

    for rpc, result in zip(pending, results, strict=True):
        assert isinstance(result, grpc.aio.AioRpcError), f"{rpc} returned {result!r}"
        assert_postgres_unavailable(details, result)
    assert app.monitor.failures.keys() == {"postgres"}


# --- A private Postgres that the test stops and starts -----------------------------------


def _binary(name: str) -> str:
    for candidate in (shutil.which(name), f"/usr/lib/postgresql/15/bin/{name}"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip(f"{name} is not installed")


class PrivatePostgres:
    """A throwaway Postgres cluster on a free port; as root it runs as `nobody`."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.root = Path(tempfile.mkdtemp(prefix="parley-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.process: subprocess.Popen[bytes] | None = None
        # As root, a setpriv prefix rather than user=/group=, which make subprocess fork()
        # (see parley.devstack.processes): this process has grpc channels open.
        self._as: list[str] = []
        run_as = unprivileged_user()
        if run_as is not None:
            os.chown(self.root, run_as.uid, run_as.gid)
            self._as = switch_user_command(run_as)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres?connect_timeout=2"

    def initdb(self) -> None:
        subprocess.run(
            [*self._as, _binary("initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust"]
            + ["--no-sync", "-E", "UTF8", "--locale=C.UTF-8"],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [*self._as, _binary("postgres"), "-D", str(self.data), "-p", str(self.port)]
                + ["-k", str(self.root), "-c", "listen_addresses=127.0.0.1"]
                + ["-c", "fsync=off", "-c", "max_connections=20"],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 15
        while not self._accepts_connections():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"private postgres did not start:\n{self.log.read_text()}")
            time.sleep(0.05)

    def _accepts_connections(self) -> bool:
        try:
            with psycopg.connect(self.url, connect_timeout=1):
                return True
        except psycopg.OperationalError:
            return False

    def stop_immediately(self) -> None:
        """Immediate shutdown: like a crash, every connection drops and nothing is flushed."""
        assert self.process is not None
        self.process.send_signal(signal.SIGQUIT)
        self.process.wait(timeout=15)
        self.process = None

    def close(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def private_postgres(unused_port) -> Iterator[PrivatePostgres]:
    cluster = PrivatePostgres(unused_port)
    try:
        cluster.initdb()
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.mark.timeout(40)
async def test_postgres_going_away_and_coming_back(
    private_postgres, start_server, auth, health, details, wait_for
):
    started = time.monotonic()
    await apply_migrations(private_postgres.url)
    app = await start_server(private_postgres.url, **FAST_FAIL)
    await wait_for(lambda: _ready_is(health, app, SERVING), 5, "readiness")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = user_pb2_grpc.UserServiceStub(channel)
        user = (
            await stub.CreateUser(
                user_pb2.CreateUserRequest(name="Ada", email="ada@example.com", age=36),
                metadata=auth,
            )
        ).user

        private_postgres.stop_immediately()

        outage_errors: list[grpc.aio.AioRpcError] = []

        async def get_fails() -> bool:
            try:
                await stub.GetUser(user_pb2.GetUserRequest(id=user.id), metadata=auth, timeout=5)
            except grpc.aio.AioRpcError as error:
                outage_errors.append(error)
                return True
            return False

        await wait_for(get_fails, 5, "calls to fail while postgres is down")
        await get_fails()  # with the pool's connections gone, too
        for error in outage_errors:
            assert_postgres_unavailable(details, error)
        await wait_for(lambda: _ready_is(health, app, NOT_SERVING), 5, "readiness to drop")
        assert await health(app.port, "") == SERVING

        private_postgres.start()

        async def get_works() -> bool:
            try:
                got = await stub.GetUser(
                    user_pb2.GetUserRequest(id=user.id), metadata=auth, timeout=5
                )
            except grpc.aio.AioRpcError as error:
                assert_postgres_unavailable(details, error)
                return False
            assert got.user == user
            return True

        await wait_for(get_works, 10, "calls to succeed once postgres is back")
        await wait_for(lambda: _ready_is(health, app, SERVING), 5, "readiness to return")
    assert time.monotonic() - started < 20


async def _ready_is(health, app, status) -> bool:
    return await health(app.port, SERVICE_NAME) == status
