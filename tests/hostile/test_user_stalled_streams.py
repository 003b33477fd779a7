"""Clients that stop reading or stop sending must not hold UserService's Postgres connections.

Each test runs its own `parley-user serve` process (pool of PARLEY_DB_POOL_MAX=10, metrics on
a port of its own) on a private database, opens twice the pool size of stalled calls, and
shows that everybody else is served as before: GetUser (its latency printed), CreateUser,
readiness SERVING, no request waiting for a pooled connection, every connection idle. The
import limits (PARLEY_IMPORT_MAX_ROWS, PARLEY_IMPORT_MAX_DURATION) are tested with small
values.
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from parley.proto import user_pb2, user_pb2_grpc
from parley.proto.contract import EXPLICIT_IMPORT_COMMIT, IMPORT_COMMIT_KEY
from parley.testing import DatabaseFactory, bearer, make_token, rich_error, wait_until_sync
from parley.testing.launcher import JWT_SECRET, Launcher, Served
from parley.testing.metrics import Scrape, metrics_text

from .servers import server_env

POOL_SIZE = 10
STALLED = 2 * POOL_SIZE
SERVICE = "user.UserService"
SERVING = health_pb2.HealthCheckResponse.SERVING
# A client that reads nothing: without BDP probing its window stays at the initial 1 KiB (the
# server sends 5 users of a page, then waits), far less than 1,000 users of ~250 bytes each.
NEVER_READS = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
# Each import and each list runs on a channel of its own: one connection per stalled client.
UNSHARED = [("grpc.use_local_subchannel_pool", 1)]
DECLARE_COMMIT = (IMPORT_COMMIT_KEY, EXPLICIT_IMPORT_COMMIT)


@dataclass
class UserServer:
    server: Served
    database: str

    @property
    def target(self) -> str:
        return self.server.target

    def token(self, sub: str = "1", scope: str = "users:write") -> Any:
        return bearer(make_token(JWT_SECRET, sub, scope))

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the server's samples of `name` with these labels (any value of others)."""
        scrape = Scrape(metrics_text(self.server.metrics_port))
        return sum(sample.value for sample in scrape.samples(name, **labels))

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        """The rows of `query` (none for a statement that returns no rows)."""
        with psycopg.connect(self.database, autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description is not None else []

    def log_text(self) -> str:
        return self.server.log_text()


@pytest.fixture
def start_user_server(
    database_factory: DatabaseFactory, launcher: Launcher
) -> Iterator[Callable[..., UserServer]]:
    """Factory: a `parley-user serve` process on a new database, with env overrides."""
    started: list[UserServer] = []

    def start(**overrides: str) -> UserServer:
        database = database_factory.take()
        env = server_env(
            "user",
            database,
            PARLEY_DB_POOL_MAX=str(POOL_SIZE),
            PARLEY_LOG_LEVEL="WARNING",
            **overrides,
        )
        server = UserServer(launcher.process_sync("user", env), database)
        started.append(server)
        return server

    yield start
    launcher.close_sync()
    for server in started:
        # The service's own faults; grpc itself logs an ExecuteBatchError when a client cancels a
        # stream whose write is waiting for flow control, which is not one.
        assert "unhandled error" not in server.log_text(), server.log_text()


class ReadinessWatch:
    """Every status the server's readiness (health Watch of user.UserService) reports."""

    def __init__(self, target: str) -> None:
        self.statuses: list[int] = []
        self._channel = grpc.insecure_channel(target, options=UNSHARED)
        stub: Any = health_pb2_grpc.HealthStub(self._channel)
        self._call = stub.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=600)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        wait_until_sync(lambda: self.statuses == [SERVING], 10, "readiness SERVING")

    def _read(self) -> None:
        try:
            for reply in self._call:
                self.statuses.append(reply.status)
        except grpc.RpcError:
            pass

    def close(self) -> list[int]:
        self._call.cancel()
        self._thread.join(10)
        self._channel.close()
        return self.statuses


def _seed_users(server: UserServer, count: int) -> int:
    """`count` users with long names and emails (a 1,000-user page is ~250 KB); one id."""
    server.sql(
        "INSERT INTO users (name, email, age)"
        " SELECT rpad('Stalled reader ' || g, 100, '.'), rpad('r' || g, 60, 'x') || '@example.com',"
        " g %% 151 FROM generate_series(1, %s) AS g",
        count,
    )
    return int(server.sql("SELECT min(id) FROM users")[0][0])


def _latencies(stub: Any, auth: list[tuple[str, str]], user_id: int, calls: int) -> list[float]:
    """Seconds taken by each of `calls` sequential GetUser calls; any failure fails the test."""
    request = user_pb2.GetUserRequest(id=user_id)
    taken = []
    for _ in range(calls):
        started = time.perf_counter()
        try:
            reply = stub.GetUser(request, metadata=auth, timeout=10)
        except grpc.RpcError as error:
            pytest.fail(f"GetUser failed: {error.code().name} {error.details()}")
        taken.append(time.perf_counter() - started)
        assert reply.user.id == user_id
    return taken


def _p50_p99(samples: list[float]) -> tuple[float, float]:
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return cuts[49], cuts[98]


def _pool_is_idle(server: UserServer) -> bool:
    size = server.metric("parley_db_pool_connections")
    return (
        size >= 1
        and server.metric("parley_db_pool_idle_connections") == size
        and server.metric("parley_db_pool_waiting_requests") == 0
    )


def test_never_read_list_streams_do_not_hold_the_pool(
    start_user_server: Callable[..., UserServer],
) -> None:
    server = start_user_server()
    user_id = _seed_users(server, 2_000)
    auth = server.token(scope="")
    list_labels = {"grpc_service": SERVICE, "grpc_method": "ListUsers"}

    with ExitStack() as stack:
        channel = stack.enter_context(grpc.insecure_channel(server.target, options=UNSHARED))
        stub = user_pb2_grpc.UserServiceStub(channel)
        _latencies(stub, auth, user_id, 20)  # warm-up: connections, prepared statements
        before = _latencies(stub, auth, user_id, 200)

        readiness = ReadinessWatch(server.target)
        handled_before = server.metric("grpc_server_handled_total", **list_labels)
        calls = []
        for _ in range(STALLED):
            reader = stack.enter_context(
                grpc.insecure_channel(server.target, options=NEVER_READS + UNSHARED)
            )
            call = user_pb2_grpc.UserServiceStub(reader).ListUsers(
                user_pb2.ListUsersRequest(page_size=1000), metadata=auth, timeout=300
            )
            stack.callback(call.cancel)
            calls.append(call)
        # The first user of each stream has arrived: the server is sending on every one.
        for call in calls:
            assert next(call).id == user_id

        during = []
        waiting = []
        for _ in range(8):
            during += _latencies(stub, auth, user_id, 25)
            waiting.append(server.metric("parley_db_pool_waiting_requests"))
        wait_until_sync(lambda: _pool_is_idle(server), 10, "every pooled connection idle")

        # The streams were stalled all along: none of them has finished, none sent its page.
        assert server.metric("grpc_server_handled_total", **list_labels) == handled_before
        assert all(call.is_active() for call in calls)
        statuses = readiness.close()

    p50_before, p99_before = _p50_p99(before)
    p50_during, p99_during = _p50_p99(during)
    print(
        f"\nGetUser, 200 calls: p50 {p50_before * 1000:.2f} ms, p99 {p99_before * 1000:.2f} ms;"
        f" with {STALLED} stalled ListUsers streams: p50 {p50_during * 1000:.2f} ms,"
        f" p99 {p99_during * 1000:.2f} ms"
    )
    assert statuses == [SERVING], f"readiness changed: {statuses}"
    assert waiting == [0] * len(waiting), f"requests waited for a pooled connection: {waiting}"
    # The latencies are reported, not asserted: on a shared 2-core machine a busy neighbour
    # moved p99 tenfold. What shows that the stalled streams hold no connection is the pool
    # itself: no request ever waited for one, and every connection was idle while all the
    # streams stood stalled (performance proper is `make bench`'s).
    # The stalled streams ended when cancelled, and their server side with them.
    wait_until_sync(
        lambda: (
            server.metric("grpc_server_handled_total", **list_labels) == handled_before + STALLED
        ),
        20,
        "the cancelled streams to end on the server",
    )


def test_import_clients_that_never_finish_sending_do_not_hold_the_pool(
    start_user_server: Callable[..., UserServer],
) -> None:
    server = start_user_server()
    user_id = _seed_users(server, 10)
    writer = server.token()
    import_labels = {"grpc_service": SERVICE, "grpc_method": "ImportUsers"}
    tag = uuid.uuid4().hex[:10]
    release = threading.Event()

    def one_row_then_stall(index: int) -> Iterator[user_pb2.CreateUserRequest]:
        yield user_pb2.CreateUserRequest(name="Stalled", email=f"{tag}.{index}@example.com", age=1)
        release.wait(120)

    with ExitStack() as stack:
        stack.callback(release.set)
        channel = stack.enter_context(grpc.insecure_channel(server.target, options=UNSHARED))
        stub = user_pb2_grpc.UserServiceStub(channel)
        readiness = ReadinessWatch(server.target)
        received_before = server.metric("grpc_server_msg_received_total", **import_labels)
        imports = []
        for index in range(STALLED):
            importer = stack.enter_context(grpc.insecure_channel(server.target, options=UNSHARED))
            # Declared: cut short before its commit, an import stores nothing.
            future = user_pb2_grpc.UserServiceStub(importer).ImportUsers.future(
                one_row_then_stall(index), metadata=[*writer, DECLARE_COMMIT], timeout=300
            )
            stack.callback(future.cancel)
            imports.append(future)
        wait_until_sync(
            lambda: (
                server.metric("grpc_server_msg_received_total", **import_labels)
                >= received_before + STALLED
            ),
            20,
            "the server to receive the first row of every import",
        )

        # Well inside the 5 s pool timeout: a call that had to wait for a connection fails.
        _latencies(stub, server.token(scope=""), user_id, 50)
        for index in range(5):
            reply = stub.CreateUser(
                user_pb2.CreateUserRequest(
                    name="Beside", email=f"{tag}.beside{index}@example.com", age=2
                ),
                metadata=writer,
                timeout=3,
            )
            assert reply.success
        assert server.metric("parley_db_pool_waiting_requests") == 0
        wait_until_sync(lambda: _pool_is_idle(server), 10, "every pooled connection idle")
        assert not any(future.done() for future in imports)

        # Cancelled imports store nothing.
        for future in imports:
            future.cancel()
        statuses = readiness.close()

    assert statuses == [SERVING], f"readiness changed: {statuses}"
    # A declared import the client cancels before its commit may be recorded Canceled or,
    # when its request stream ended first, InvalidArgument (IMPORT_NOT_COMMITTED).
    wait_until_sync(
        lambda: (
            server.metric("grpc_server_handled_total", grpc_code="Canceled", **import_labels)
            + server.metric(
                "grpc_server_handled_total", grpc_code="InvalidArgument", **import_labels
            )
            == STALLED
        ),
        20,
        "the cancelled imports to end on the server",
    )
    stored = server.sql("SELECT email FROM users WHERE email LIKE %s ORDER BY id", f"{tag}.%")
    assert stored == [(f"{tag}.beside{index}@example.com",) for index in range(5)]


def _import(stub: Any, rows: Iterator[user_pb2.CreateUserRequest], auth: Any) -> Any:
    return stub.ImportUsers(rows, metadata=auth, timeout=60)


def test_an_import_over_the_row_limit_is_refused_and_stores_nothing(
    start_user_server: Callable[..., UserServer],
) -> None:
    server = start_user_server(PARLEY_IMPORT_MAX_ROWS="5")
    writer = server.token()
    refusals = {"limit": "import_rows"}
    assert server.metric("parley_limit_refusals_total", **refusals) == 0
    tag = uuid.uuid4().hex[:10]

    def rows(count: int, prefix: str) -> Iterator[user_pb2.CreateUserRequest]:
        for i in range(count):
            yield user_pb2.CreateUserRequest(name="Row", email=f"{prefix}{i}@example.com", age=3)

    with grpc.insecure_channel(server.target) as channel:
        stub = user_pb2_grpc.UserServiceStub(channel)
        at_limit = _import(stub, rows(5, f"{tag}.a"), writer)
        assert (at_limit.created_count, at_limit.failed_count) == (5, 0)

        with pytest.raises(grpc.RpcError) as info:
            _import(stub, rows(6, f"{tag}.b"), writer)

    error = rich_error(info.value)
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    assert error.message.endswith("(limit PARLEY_IMPORT_MAX_ROWS=5)"), error.message
    assert "5 rows" in error.message
    assert error.metadata["limit"] == "import_rows"
    assert server.sql("SELECT count(*) FROM users WHERE email LIKE %s", f"{tag}.b%") == [(0,)]
    assert server.metric("parley_limit_refusals_total", **refusals) == 1


def test_an_import_over_the_time_limit_is_refused_and_stores_nothing(
    start_user_server: Callable[..., UserServer],
) -> None:
    server = start_user_server(PARLEY_IMPORT_MAX_DURATION="1s")
    writer = server.token()
    refusals = {"limit": "import_duration"}
    assert server.metric("parley_limit_refusals_total", **refusals) == 0
    tag = uuid.uuid4().hex[:10]
    release = threading.Event()

    def stalled() -> Iterator[user_pb2.CreateUserRequest]:
        yield user_pb2.CreateUserRequest(name="Slow", email=f"{tag}.stalled@example.com", age=4)
        release.wait(120)

    def trickle() -> Iterator[user_pb2.CreateUserRequest]:
        # Rows keep coming, each soon after the last, but the whole import takes over 1 s.
        for i in range(20):
            yield user_pb2.CreateUserRequest(name="Slow", email=f"{tag}.{i}@example.com", age=4)
            if release.wait(0.1):
                return

    codes = []
    with grpc.insecure_channel(server.target) as channel:
        stub = user_pb2_grpc.UserServiceStub(channel)
        for rows in (stalled(), trickle()):
            started = time.monotonic()
            try:
                with pytest.raises(grpc.RpcError) as info:
                    _import(stub, rows, writer)
            finally:
                release.set()
            release.clear()
            elapsed = time.monotonic() - started
            error = rich_error(info.value)
            codes.append(error.code)
            assert error.message.endswith("(limit PARLEY_IMPORT_MAX_DURATION=1)"), error.message
            assert error.metadata["limit"] == "import_duration"
            assert 0.9 <= elapsed < 30, elapsed

    assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
    assert server.sql("SELECT count(*) FROM users WHERE email LIKE %s", f"{tag}.%") == [(0,)]
    assert server.metric("parley_limit_refusals_total", **refusals) == 2
