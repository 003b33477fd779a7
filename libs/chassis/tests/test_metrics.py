"""grpc_server_* metrics with go-grpc-middleware's names, labels and code spelling, over HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from parley.chassis import FieldViolation, InvalidArgument, NotFound
from parley.proto import user_pb2

SERVICE = "user.UserService"
GO_CODES = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
]
GO_BUCKETS = ["0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0", "2.5", "5.0", "10.0"]
METHODS = {
    "GetUser": "unary",
    "ListUsers": "server_stream",
    "CreateUser": "unary",
    "UpdateUser": "unary",
    "DeleteUser": "unary",
    "ImportUsers": "client_stream",
}


def labels(method: str, **extra: str) -> dict[str, str]:
    return {"grpc_type": METHODS[method], "grpc_service": SERVICE, "grpc_method": method, **extra}


async def test_every_series_exists_at_zero_before_any_call(server: Any, scrape: Any):
    metrics = await scrape(server.app)
    for method in METHODS:
        for name in [
            "grpc_server_started_total",
            "grpc_server_msg_received_total",
            "grpc_server_msg_sent_total",
            "grpc_server_handling_seconds_count",
            "grpc_server_handling_seconds_sum",
        ]:
            assert metrics.value(name, **labels(method)) == 0, (name, method)
        for code in GO_CODES:
            assert metrics.value("grpc_server_handled_total", **labels(method, grpc_code=code)) == 0
        buckets = metrics.samples("grpc_server_handling_seconds_bucket", **labels(method))
        assert [b.labels["le"] for b in buckets] == [*GO_BUCKETS, "+Inf"]
        assert all(b.value == 0 for b in buckets)

    handled = metrics.samples("grpc_server_handled_total", grpc_service=SERVICE)
    assert len(handled) == len(METHODS) * len(GO_CODES)
    # Health is initialized too, with its own call types.
    health = {"grpc_service": "grpc.health.v1.Health"}
    assert (
        metrics.value("grpc_server_started_total", grpc_type="unary", grpc_method="Check", **health)
        == 0
    )
    assert (
        metrics.value(
            "grpc_server_started_total", grpc_type="server_stream", grpc_method="Watch", **health
        )
        == 0
    )

    # Metric types and label names as go-grpc-middleware exports them.
    base = {"grpc_type", "grpc_service", "grpc_method"}
    expected = {
        "grpc_server_started": ("counter", base),
        "grpc_server_handled": ("counter", base | {"grpc_code"}),
        "grpc_server_msg_received": ("counter", base),
        "grpc_server_msg_sent": ("counter", base),
        "grpc_server_handling_seconds": ("histogram", base),
    }
    for name, (kind, label_names) in expected.items():
        family = metrics.families[name]
        assert family.type == kind
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == label_names, sample
    assert "_created" not in metrics.text


async def test_codes_are_spelled_as_go_spells_them(
    server: Any, scrape: Any, auth: Any, make_token: Any
):
    outcomes = iter(
        [
            None,
            None,
            NotFound("no such user"),
            InvalidArgument([FieldViolation("id", "must be positive")]),
            RuntimeError("boom"),
        ]
    )

    async def next_outcome(request: Any, context: Any) -> Any:
        outcome = next(outcomes)
        if outcome is not None:
            raise outcome
        return user_pb2.GetUserResponse()

    server.servicer.get_user = next_outcome
    expected_codes = [
        grpc.StatusCode.OK,
        grpc.StatusCode.OK,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.INTERNAL,
    ]
    for expected in expected_codes:
        call = server.stub.GetUser(user_pb2.GetUserRequest(id=1), metadata=auth, timeout=5)
        code = await call.code()
        assert code == expected
    unauthenticated = server.stub.GetUser(user_pb2.GetUserRequest(id=1), timeout=5)
    assert await unauthenticated.code() == grpc.StatusCode.UNAUTHENTICATED

    metrics = await scrape(server.app)
    handled = {
        code: metrics.value("grpc_server_handled_total", **labels("GetUser", grpc_code=code))
        for code in GO_CODES
    }
    assert handled == {
        **dict.fromkeys(GO_CODES, 0.0),
        "OK": 2.0,
        "NotFound": 1.0,
        "InvalidArgument": 1.0,
        "Internal": 1.0,
        "Unauthenticated": 1.0,
    }
    assert metrics.value("grpc_server_started_total", **labels("GetUser")) == 6
    assert metrics.value("grpc_server_msg_received_total", **labels("GetUser")) == 6
    assert metrics.value("grpc_server_msg_sent_total", **labels("GetUser")) == 2
    assert metrics.value("grpc_server_handling_seconds_count", **labels("GetUser")) == 6
    # Other methods are untouched.
    assert metrics.value("grpc_server_started_total", **labels("DeleteUser")) == 0


async def test_server_stream_counts_each_sent_message(server: Any, scrape: Any, auth: Any):
    received = [
        u.id
        async for u in server.stub.ListUsers(
            user_pb2.ListUsersRequest(page_size=3), metadata=auth, timeout=5
        )
    ]
    assert received == [1, 2, 3]
    metrics = await scrape(server.app)
    assert metrics.value("grpc_server_started_total", **labels("ListUsers")) == 1
    assert metrics.value("grpc_server_msg_received_total", **labels("ListUsers")) == 1
    assert metrics.value("grpc_server_msg_sent_total", **labels("ListUsers")) == 3
    assert metrics.value("grpc_server_handled_total", **labels("ListUsers", grpc_code="OK")) == 1


async def test_client_stream_counts_each_received_message(server: Any, scrape: Any, auth: Any):
    requests = [user_pb2.CreateUserRequest(name=f"u{i}") for i in range(4)]
    response = await server.stub.ImportUsers(iter(requests), metadata=auth, timeout=5)
    assert response.created_count == 4
    metrics = await scrape(server.app)
    assert metrics.value("grpc_server_started_total", **labels("ImportUsers")) == 1
    assert metrics.value("grpc_server_msg_received_total", **labels("ImportUsers")) == 4
    assert metrics.value("grpc_server_msg_sent_total", **labels("ImportUsers")) == 1
    assert metrics.value("grpc_server_handled_total", **labels("ImportUsers", grpc_code="OK")) == 1


async def test_handling_seconds_histogram(server: Any, scrape: Any, auth: Any):
    async def slowish(request: Any, context: Any) -> Any:
        await asyncio.sleep(0.03)
        return user_pb2.GetUserResponse()

    server.servicer.get_user = slowish
    for _ in range(2):
        await server.stub.GetUser(user_pb2.GetUserRequest(id=1), metadata=auth, timeout=5)
    metrics = await scrape(server.app)
    buckets = {
        b.labels["le"]: b.value
        for b in metrics.samples("grpc_server_handling_seconds_bucket", **labels("GetUser"))
    }
    assert list(buckets) == [*GO_BUCKETS, "+Inf"]
    assert buckets["0.005"] == buckets["0.01"] == buckets["0.025"] == 0
    assert buckets["+Inf"] == 2
    values = list(buckets.values())
    assert values == sorted(values)  # cumulative
    assert metrics.value("grpc_server_handling_seconds_count", **labels("GetUser")) == 2
    assert metrics.value("grpc_server_handling_seconds_sum", **labels("GetUser")) >= 0.06


async def _hang(request: Any, context: Any) -> Any:
    await asyncio.Event().wait()


async def test_cancelled_call_is_counted_as_canceled(
    server: Any, scrape: Any, auth: Any, wait_for: Any
):
    server.servicer.get_user = _hang
    call = server.stub.GetUser(user_pb2.GetUserRequest(id=1), metadata=auth, timeout=30)
    await asyncio.wait_for(server.servicer.entered.wait(), 5)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call

    async def counted() -> bool:
        metrics = await scrape(server.app)
        return (
            metrics.value("grpc_server_handled_total", **labels("GetUser", grpc_code="Canceled"))
            == 1
        )

    await wait_for(counted, 5, "a Canceled GetUser")
    metrics = await scrape(server.app)
    assert metrics.value("grpc_server_handled_total", **labels("GetUser", grpc_code="OK")) == 0
    assert metrics.value("grpc_server_msg_sent_total", **labels("GetUser")) == 0


async def test_cancelled_server_stream_is_counted_as_canceled(
    server: Any, scrape: Any, auth: Any, wait_for: Any
):
    async def endless(request: Any, context: Any) -> AsyncIterator[Any]:
        n = 0
        while True:
            n += 1
            yield user_pb2.User(id=n)
            await asyncio.sleep(0.01)

    server.servicer.list_users = endless
    call = server.stub.ListUsers(user_pb2.ListUsersRequest(), metadata=auth, timeout=30)
    first = await call.read()
    assert first.id == 1
    call.cancel()

    async def counted() -> bool:
        metrics = await scrape(server.app)
        key = labels("ListUsers", grpc_code="Canceled")
        return metrics.value("grpc_server_handled_total", **key) == 1

    await wait_for(counted, 5, "a Canceled ListUsers")


async def test_call_past_its_deadline_is_counted_as_deadline_exceeded(
    server: Any, scrape: Any, auth: Any, wait_for: Any
):
    server.servicer.get_user = _hang
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await server.stub.GetUser(user_pb2.GetUserRequest(id=1), metadata=auth, timeout=0.2)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    async def counted() -> bool:
        metrics = await scrape(server.app)
        key = labels("GetUser", grpc_code="DeadlineExceeded")
        return metrics.value("grpc_server_handled_total", **key) == 1

    await wait_for(counted, 5, "a DeadlineExceeded GetUser")
    metrics = await scrape(server.app)
    assert (
        metrics.value("grpc_server_handled_total", **labels("GetUser", grpc_code="Canceled")) == 0
    )


async def test_each_app_has_its_own_registry(serve: Any, scrape: Any, auth: Any):
    first = await serve()
    second = await serve()
    await first.stub.GetUser(user_pb2.GetUserRequest(id=1), metadata=auth, timeout=5)
    assert first.app.metrics_port != second.app.metrics_port
    one, two = await scrape(first.app), await scrape(second.app)
    assert one.value("grpc_server_started_total", **labels("GetUser")) == 1
    assert two.value("grpc_server_started_total", **labels("GetUser")) == 0
