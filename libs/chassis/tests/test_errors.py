"""Domain errors become canonical statuses with google.rpc details; surprises become INTERNAL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from parley.chassis import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ServiceError,
    Unauthenticated,
    Unavailable,
)
from parley.chassis.errors import ERROR_DOMAIN, to_status
from parley.proto import user_pb2


def unpack(status: status_pb2.Status) -> tuple[list[Any], list[Any]]:
    """The ErrorInfo and BadRequest details of a status."""
    infos, bad_requests = [], []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            bad_requests.append(bad)
    return infos, bad_requests


async def failing_get_user(server: Any, auth: Any, error: BaseException) -> grpc.aio.AioRpcError:
    async def fail(request: Any, context: Any) -> Any:
        raise error

    server.servicer.get_user = fail
    call = server.stub.GetUser(user_pb2.GetUserRequest(id=1), metadata=auth, timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def test_invalid_argument_carries_bad_request_and_error_info(server: Any, auth: Any):
    error = await failing_get_user(
        server,
        auth,
        InvalidArgument(
            [FieldViolation("email", "must contain @"), FieldViolation("age", "must be 0 to 150")],
            reason="USER_INVALID",
        ),
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "invalid request: email: must contain @; age: must be 0 to 150"

    status = rpc_status.from_call(error)
    assert status is not None
    assert status.code == code_pb2.INVALID_ARGUMENT
    assert status.message == error.details()
    infos, bad_requests = unpack(status)
    assert [(i.reason, i.domain) for i in infos] == [("USER_INVALID", ERROR_DOMAIN)]
    assert len(bad_requests) == 1
    assert [(v.field, v.description) for v in bad_requests[0].field_violations] == [
        ("email", "must contain @"),
        ("age", "must be 0 to 150"),
    ]


async def test_not_found_carries_reason_and_metadata(server: Any, auth: Any):
    error = await failing_get_user(
        server, auth, NotFound("user 9 not found", reason="USER_NOT_FOUND", metadata={"id": "9"})
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == "user 9 not found"
    infos, bad = unpack(rpc_status.from_call(error))
    assert bad == []
    assert len(infos) == 1
    assert infos[0].reason == "USER_NOT_FOUND"
    assert infos[0].domain == "parley"
    assert dict(infos[0].metadata) == {"id": "9"}

    # The same status is in the raw trailing metadata, for clients without grpc_status.
    raw = dict(error.trailing_metadata() or ())["grpc-status-details-bin"]
    assert status_pb2.Status.FromString(raw) == rpc_status.from_call(error)


async def test_unavailable_names_the_dependency(server: Any, auth: Any):
    error = await failing_get_user(server, auth, Unavailable("postgres", "connection refused"))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details() == "postgres is unavailable: connection refused"
    infos, _ = unpack(rpc_status.from_call(error))
    assert infos[0].reason == "DEPENDENCY_UNAVAILABLE"
    assert dict(infos[0].metadata) == {"dependency": "postgres"}


async def test_every_service_error_maps_to_its_code(
    server: Any, auth: Any, subtests: pytest.Subtests
):
    cases: list[tuple[ServiceError, grpc.StatusCode, str]] = [
        (NotFound("x"), grpc.StatusCode.NOT_FOUND, "NOT_FOUND"),
        (AlreadyExists("x"), grpc.StatusCode.ALREADY_EXISTS, "ALREADY_EXISTS"),
        (PermissionDenied("x"), grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"),
        (Unauthenticated("x"), grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"),
        (ResourceExhausted("x"), grpc.StatusCode.RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED"),
        (FailedPrecondition("x"), grpc.StatusCode.FAILED_PRECONDITION, "FAILED_PRECONDITION"),
        (DeadlineExceeded("x"), grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED"),
        (Unavailable("redis", "x"), grpc.StatusCode.UNAVAILABLE, "DEPENDENCY_UNAVAILABLE"),
        (ServiceError("x"), grpc.StatusCode.UNKNOWN, "UNKNOWN"),
    ]
    for raised, code, reason in cases:
        with subtests.test(type(raised).__name__):
            error = await failing_get_user(server, auth, raised)
            assert error.code() == code
            assert error.details() == raised.message
            infos, _ = unpack(rpc_status.from_call(error))
            assert [i.reason for i in infos] == [reason]


async def test_unexpected_exception_is_internal_without_a_traceback(server: Any, auth: Any):
    error = await failing_get_user(server, auth, RuntimeError("secret table users_v2 is gone"))
    assert error.code() == grpc.StatusCode.INTERNAL
    request_id = dict(error.initial_metadata() or ())["x-request-id"]
    assert request_id
    assert request_id in error.details()
    assert "Traceback" not in error.details()
    assert "RuntimeError" not in error.details()
    assert "users_v2" not in error.details()
    assert rpc_status.from_call(error) is None


async def test_handler_abort_passes_through(server: Any, auth: Any):
    async def abort(request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.OUT_OF_RANGE, "page 9 is past the end")

    server.servicer.get_user = abort
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await server.stub.GetUser(user_pb2.GetUserRequest(id=1), metadata=auth, timeout=5)
    assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert info.value.details() == "page 9 is past the end"


async def test_error_after_some_stream_messages(server: Any, auth: Any):
    async def two_then_fail(request: Any, context: Any) -> AsyncIterator[Any]:
        yield user_pb2.User(id=1)
        yield user_pb2.User(id=2)
        raise FailedPrecondition("page token is stale", reason="STALE_TOKEN")

    server.servicer.list_users = two_then_fail
    call = server.stub.ListUsers(user_pb2.ListUsersRequest(), metadata=auth, timeout=5)
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for user in call:
            received.append(user.id)
    assert received == [1, 2]
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    status = await rpc_status.aio.from_call(call)
    assert status is not None
    assert [i.reason for i in unpack(status)[0]] == ["STALE_TOKEN"]


async def test_error_in_a_client_stream_handler(server: Any, auth: Any):
    async def reject_third(requests: AsyncIterator[Any], context: Any) -> Any:
        index = 0
        async for _ in requests:
            index += 1
            if index == 3:
                raise InvalidArgument([FieldViolation("[2].email", "is empty")])
        return user_pb2.ImportUsersResponse(created_count=index)

    async def three_rows_then_wait() -> AsyncIterator[Any]:
        for i in range(3):
            yield user_pb2.CreateUserRequest(name=str(i))
        # More rows would race the server's answer: grpc's client reports a write after the
        # call has ended as INTERNAL "Failed execute_batch" (grpc/grpc#36066). The stream
        # stays open; the server answers without waiting for the client to finish.
        await call.code()

    server.servicer.import_users = reject_third
    call = server.stub.ImportUsers(three_rows_then_wait(), metadata=auth, timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    _, bad = unpack(rpc_status.from_call(info.value))
    assert [v.field for v in bad[0].field_violations] == ["[2].email"]


async def test_unexpected_exception_in_a_server_stream_is_internal(server: Any, auth: Any):
    async def broken(request: Any, context: Any) -> AsyncIterator[Any]:
        yield user_pb2.User(id=1)
        raise KeyError("cursor")

    server.servicer.list_users = broken
    call = server.stub.ListUsers(user_pb2.ListUsersRequest(), metadata=auth, timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            pass
    assert info.value.code() == grpc.StatusCode.INTERNAL
    request_id = dict(await call.initial_metadata())["x-request-id"]
    assert request_id in info.value.details()
    assert "cursor" not in info.value.details()


def test_invalid_argument_needs_a_violation():
    with pytest.raises(ValueError):
        InvalidArgument([])


def test_to_status_round_trips_code_message_and_details():
    status = to_status(AlreadyExists("email taken", reason="EMAIL_TAKEN", metadata={"f": "email"}))
    assert status.code == grpc.StatusCode.ALREADY_EXISTS
    assert status.details == "email taken"
    [(key, value)] = status.trailing_metadata
    assert key == "grpc-status-details-bin"
    decoded = status_pb2.Status.FromString(value)
    assert decoded.code == code_pb2.ALREADY_EXISTS
    assert decoded.message == "email taken"
    infos, _ = unpack(decoded)
    assert infos[0].reason == "EMAIL_TAKEN"
    assert dict(infos[0].metadata) == {"f": "email"}
