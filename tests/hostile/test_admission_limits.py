"""The chassis' admission limits and malformed requests, against real `parley-user serve`
processes with small limits: calls per connection, streams per replica, and the
unauthenticated health service (service-name length, Watch streams per connection and per
replica). Every refusal is RESOURCE_EXHAUSTED naming its setting and is counted in
`parley_limit_refusals_total{limit}`; every request whose bytes do not parse is
INVALID_ARGUMENT naming the field, never INTERNAL or UNKNOWN.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from parley.proto import user_pb2, user_pb2_grpc
from parley.testing import bearer, free_port, sample_key, scrape_metrics, wait_until

RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
MARK = "QQQQ"
BAD_UTF8 = b"\xc3\x28\xff\xfe"  # as long as MARK: the length prefix stays right


def _refusals(server: Any, limit: str) -> float:
    return scrape_metrics(server.metrics_port).get(
        sample_key("parley_limit_refusals_total", limit=limit), 0.0
    )


def _handled_rows(server: Any) -> float:
    """Request messages the ImportUsers handler has read."""
    samples = scrape_metrics(server.metrics_port)
    return sum(
        value
        for key, value in samples.items()
        if key.startswith("grpc_server_msg_received_total{") and 'grpc_method="ImportUsers"' in key
    )


def _channel(server: Any, tag: str) -> grpc.aio.Channel:
    # A channel argument of its own, so that no two test channels share a connection.
    return grpc.aio.insecure_channel(server.target, options=[("parley.test.channel", tag)])


class HeldImports:
    """ImportUsers calls whose client sends one (invalid) row and then never half-closes,
    until released. The row shows in grpc_server_msg_received_total once the handler,
    past every interceptor, has read it."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.calls: list[Any] = []

    async def _requests(self) -> AsyncIterator[user_pb2.CreateUserRequest]:
        yield user_pb2.CreateUserRequest(name="", email="held@example.com")
        await self.release.wait()

    def open(self, channel: grpc.aio.Channel, token: str) -> Any:
        stub: Any = user_pb2_grpc.UserServiceStub(channel)
        call = stub.ImportUsers(self._requests(), metadata=bearer(token), timeout=60)
        self.calls.append(call)
        return call

    async def finish(self) -> None:
        self.release.set()
        for call in self.calls:
            await call


async def _code(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


async def test_calls_beyond_the_per_connection_limit_are_refused(
    stack: Any, serve: Callable[..., Any], token: Callable[..., str]
) -> None:
    server = serve("user", PARLEY_MAX_STREAMS_PER_CONNECTION="4")
    writer = token("admin", "users:write")
    held = HeldImports()
    async with _channel(server, "a") as crowded, _channel(server, "b") as other:
        for _ in range(4):
            held.open(crowded, writer)
        await wait_until(lambda: _handled_rows(server) >= 4, what="4 held imports")
        users: Any = user_pb2_grpc.UserServiceStub(crowded)
        get = user_pb2.GetUserRequest(id=stack.chatter_id)
        code, message = await _code(users.GetUser(get, metadata=bearer(writer), timeout=10))
        assert code == RESOURCE_EXHAUSTED
        assert "PARLEY_MAX_STREAMS_PER_CONNECTION=4" in message

        # A flood on the same connection, below HTTP/2's ceiling (100 streams here): every
        # call over the limit is refused at once, so none of them waits for a place.
        flood = [users.GetUser(get, metadata=bearer(writer), timeout=20) for _ in range(30)]
        codes = [code for code, _ in await asyncio.gather(*(_code(call) for call in flood))]
        assert codes == [RESOURCE_EXHAUSTED] * 30

        # Past the ceiling the client queues its calls, and near it a stream may be reset
        # (REFUSED_STREAM, UNAVAILABLE to the client); still none gets through or hangs.
        flood = [users.GetUser(get, metadata=bearer(writer), timeout=20) for _ in range(150)]
        codes = [code for code, _ in await asyncio.gather(*(_code(call) for call in flood))]
        assert set(codes) <= {RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}
        refused = 31 + codes.count(RESOURCE_EXHAUSTED)

        # Another connection of the same client is not affected.
        reply = await user_pb2_grpc.UserServiceStub(other).GetUser(
            get, metadata=bearer(writer), timeout=10
        )
        assert reply.user.id == stack.chatter_id
        assert _refusals(server, "streams_per_connection") == refused

        await held.finish()
        reply = await users.GetUser(get, metadata=bearer(writer), timeout=10)
        assert reply.user.id == stack.chatter_id

        # Every place came back, however its call ended (refused, finished, cancelled): four
        # calls fit on the connection again, and a fifth does not.
        cancelled = users.GetUser(get, metadata=bearer(writer), timeout=10)
        cancelled.cancel()
        again = HeldImports()
        for _ in range(4):
            again.open(crowded, writer)
        await wait_until(lambda: _handled_rows(server) >= 8, what="4 more held imports")
        code, message = await _code(users.GetUser(get, metadata=bearer(writer), timeout=10))
        assert code == RESOURCE_EXHAUSTED, "a place was kept by a call that had ended"
        await again.finish()


async def test_streams_beyond_the_replica_limit_are_refused(
    stack: Any, serve: Callable[..., Any], token: Callable[..., str]
) -> None:
    server = serve("user", PARLEY_MAX_STREAMS="3")
    writer = token("admin", "users:write")
    held = HeldImports()
    channels = [_channel(server, str(n)) for n in range(4)]
    try:
        for channel in channels[:3]:
            held.open(channel, writer)
        await wait_until(lambda: _handled_rows(server) >= 3, what="3 held imports")
        users: Any = user_pb2_grpc.UserServiceStub(channels[3])
        listing = users.ListUsers(user_pb2.ListUsersRequest(), metadata=bearer(writer), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in listing:
                pass
        assert refused.value.code() == RESOURCE_EXHAUSTED
        assert "PARLEY_MAX_STREAMS=3" in (refused.value.details() or "")
        # Reflection needs no token, and its streams count like the service's own.
        reflection: Any = reflection_pb2_grpc.ServerReflectionStub(channels[3])
        asking = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in asking:
                pass
        assert refused.value.code() == RESOURCE_EXHAUSTED
        # Unary calls and the health service are not streams of the service.
        get = user_pb2.GetUserRequest(id=stack.chatter_id)
        assert (await users.GetUser(get, metadata=bearer(writer), timeout=10)).user.id
        health: Any = health_pb2_grpc.HealthStub(channels[3])
        status = await health.Check(health_pb2.HealthCheckRequest(service="user.UserService"))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        assert _refusals(server, "streams_per_replica") == 2
        assert scrape_metrics(server.metrics_port)["parley_streams_open"] == 3

        await held.finish()
        listed = [
            u
            async for u in users.ListUsers(
                user_pb2.ListUsersRequest(), metadata=bearer(writer), timeout=10
            )
        ]
        assert any(u.id == stack.chatter_id for u in listed)
    finally:
        for channel in channels:
            await channel.close()


async def test_the_health_service_is_bounded_without_a_token(
    serve: Callable[..., Any],
) -> None:
    health_port = free_port()
    server = serve(
        "user",
        PARLEY_HEALTH_MAX_SERVICE_NAME="64",
        PARLEY_HEALTH_MAX_WATCHES_PER_CONNECTION="2",
        PARLEY_HEALTH_MAX_WATCHES="3",
        PARLEY_HEALTH_PORT=str(health_port),
    )
    long_name = health_pb2.HealthCheckRequest(service="s" * 65)
    channels = [_channel(server, str(n)) for n in range(3)]
    watches: list[Any] = []
    try:
        stub: Any = health_pb2_grpc.HealthStub(channels[0])
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Check(long_name, timeout=10)
        assert refused.value.code() == RESOURCE_EXHAUSTED
        assert "PARLEY_HEALTH_MAX_SERVICE_NAME=64" in (refused.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stub.Watch(long_name, timeout=10):
                pass
        assert refused.value.code() == RESOURCE_EXHAUSTED
        # The plain health-only port has the same limits.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as plain:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await health_pb2_grpc.HealthStub(plain).Check(long_name, timeout=10)  # type: ignore[no-untyped-call]
            assert refused.value.code() == RESOURCE_EXHAUSTED
        # A name at the limit is only an unknown service.
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await stub.Check(health_pb2.HealthCheckRequest(service="s" * 64), timeout=10)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        assert _refusals(server, "health_service_name") == 3

        async def watch(channel: grpc.aio.Channel) -> Any:
            call = health_pb2_grpc.HealthStub(channel).Watch(  # type: ignore[no-untyped-call]
                health_pb2.HealthCheckRequest(service=""), timeout=60
            )
            watches.append(call)
            return call

        for _ in range(2):
            first = await (await watch(channels[0])).read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING
        # Refused as UNIMPLEMENTED: a client that watches health to pick connections then
        # takes this one as healthy, instead of unusable.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await (await watch(channels[0])).read()
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "PARLEY_HEALTH_MAX_WATCHES_PER_CONNECTION=2" in (refused.value.details() or "")
        assert (await (await watch(channels[1])).read()).status == 1  # the third on the replica
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await (await watch(channels[2])).read()
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "PARLEY_HEALTH_MAX_WATCHES=3" in (refused.value.details() or "")
        assert _refusals(server, "health_watches_per_connection") == 1
        assert _refusals(server, "health_watches_per_replica") == 1

        # Ended watches give their places back.
        for call in watches:
            call.cancel()

        async def watch_opens() -> bool:
            try:
                reply = await (await watch(channels[2])).read()
            except grpc.aio.AioRpcError:
                return False
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

        await wait_until(watch_opens, what="a new Watch once the others ended")
    finally:
        for call in watches:
            call.cancel()
        for channel in channels:
            await channel.close()


def _with_bad_utf8(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    assert data.count(MARK.encode()) == 1
    return data.replace(MARK.encode(), BAD_UTF8)


MALFORMED = [
    ("GetUser", False, b"\x08", "request"),  # a varint field cut short
    ("GetUser", False, b"\xff\xff\xff\xff", "request"),
    ("CreateUser", False, _with_bad_utf8(user_pb2.CreateUserRequest(name=MARK)), "name"),
    ("CreateUser", False, _with_bad_utf8(user_pb2.CreateUserRequest(email=MARK)), "email"),
    (
        "UpdateUser",
        False,
        _with_bad_utf8(user_pb2.UpdateUserRequest(user=user_pb2.User(id=1, name=MARK))),
        "user.name",
    ),
    ("ListUsers", True, _with_bad_utf8(user_pb2.ListUsersRequest(page_token=MARK)), "page_token"),
    ("ImportUsers", True, _with_bad_utf8(user_pb2.CreateUserRequest(name=MARK)), "name"),
]


@pytest.mark.parametrize(("method", "streaming", "payload", "field"), MALFORMED)
def test_requests_that_do_not_parse_are_invalid_argument(
    stack: Any, token: Callable[..., str], method: str, streaming: bool, payload: bytes, field: str
) -> None:
    path = f"/user.UserService/{method}"
    channel = stack.channel(stack.user.target)
    metadata = bearer(token("admin", "users:write"))
    with pytest.raises(grpc.RpcError) as failed:
        if method == "ImportUsers":
            channel.stream_unary(path)(iter([payload]), metadata=metadata, timeout=10)
        elif streaming:
            list(channel.unary_stream(path)(payload, metadata=metadata, timeout=10))
        else:
            channel.unary_unary(path)(payload, metadata=metadata, timeout=10)
    error: Any = failed.value
    assert error.code() == INVALID_ARGUMENT, error.details()
    assert f"{field}: " in error.details()
    stack.assert_serving()


def test_a_health_request_that_does_not_parse_is_invalid_argument(stack: Any) -> None:
    payload = _with_bad_utf8(health_pb2.HealthCheckRequest(service=MARK))
    channel = stack.channel(stack.user.target)
    with pytest.raises(grpc.RpcError) as failed:
        channel.unary_unary("/grpc.health.v1.Health/Check")(payload, timeout=10)
    error: Any = failed.value
    assert error.code() == INVALID_ARGUMENT
    assert "service: is not valid UTF-8" in error.details()


def test_an_oversized_request_names_the_limit_and_is_counted(
    serve: Callable[..., Any], token: Callable[..., str]
) -> None:
    """Up to twice PARLEY_MAX_MESSAGE_BYTES the chassis refuses a request itself (named and
    counted); beyond that grpc refuses it before any Parley code runs (RESOURCE_EXHAUSTED
    too, tested in test_wire.py)."""
    server = serve("user", PARLEY_MAX_MESSAGE_BYTES="65536")
    big = user_pb2.CreateUserRequest(name="x" * 65536, email="big@example.com")
    with grpc.insecure_channel(server.target) as channel:
        users: Any = user_pb2_grpc.UserServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            users.CreateUser(big, metadata=bearer(token("admin", "users:write")), timeout=10)
        error: Any = refused.value
        assert error.code() == RESOURCE_EXHAUSTED
        assert "PARLEY_MAX_MESSAGE_BYTES=65536" in error.details()
        with pytest.raises(grpc.RpcError) as refused:
            users.ImportUsers(
                iter([big]), metadata=bearer(token("admin", "users:write")), timeout=10
            )
        assert refused.value.code() == RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    assert _refusals(server, "message_bytes") == 2


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload
    )


def _fields(headers: list[tuple[str, str]]) -> bytes:
    block = b""
    for name, value in headers:
        block += b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()
    return block


def test_a_watch_whose_client_never_reads_does_not_stop_the_drain(
    serve: Callable[..., Any],
) -> None:
    """A raw HTTP/2 client, no token, that grants the server no flow-control window and opens
    Watch: the server can never write the first status. SIGTERM must still drain and exit
    within PARLEY_SHUTDOWN_GRACE (grpc's own health servicer writes while holding the lock
    that setting a status takes, so this client froze the drain for good)."""
    server = serve("user", PARLEY_SHUTDOWN_GRACE="2")
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    try:
        no_window = (4).to_bytes(2, "big") + (0).to_bytes(4, "big")  # INITIAL_WINDOW_SIZE=0
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, 0, no_window))
        assert sock.recv(65536), "the server sent no SETTINGS"
        headers = _fields(
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", "/grpc.health.v1.Health/Watch"),
                (":authority", f"127.0.0.1:{server.port}"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ]
        )
        request = b"\x00" + (0).to_bytes(4, "big")  # an empty HealthCheckRequest: service ""
        sock.sendall(
            _frame(4, 1, 0)  # SETTINGS ACK
            + _frame(1, 4, 1, headers)  # HEADERS, END_HEADERS
            + _frame(0, 1, 1, request)  # DATA, END_STREAM
        )

        def watch_started() -> bool:
            samples = scrape_metrics(server.metrics_port)
            return any(
                key.startswith("grpc_server_msg_received_total{")
                and 'grpc_method="Watch"' in key
                and value >= 1
                for key, value in samples.items()
            )

        asyncio.run(wait_until(watch_started, what="the stalled Watch to reach its handler"))
        server.service.process.send(signal.SIGTERM)
        if not server.service.process.wait(15):
            pytest.fail("SIGTERM did not stop the server: the stalled Watch froze the drain")
        assert server.returncode == 0
    finally:
        sock.close()
