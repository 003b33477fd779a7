"""Every call gets an x-request-id: the client's if it sent one, else a fresh one."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from parley.chassis import FieldViolation, InvalidArgument, NotFound
from parley.chassis.logs import request_id_var
from parley.proto import user_pb2

GENERATED = re.compile(r"^[0-9a-f]{32}$")


async def echo_request_id(request: Any, context: Any) -> Any:
    return user_pb2.GetUserResponse(user=user_pb2.User(id=request.id, name=request_id_var.get()))


async def test_server_returns_a_request_id(server: Any, auth: Any):
    server.servicer.get_user = echo_request_id
    ids = []
    for _ in range(2):
        call = server.stub.GetUser(user_pb2.GetUserRequest(id=1), metadata=auth, timeout=5)
        response = await call
        request_id = dict(await call.initial_metadata())["x-request-id"]
        assert GENERATED.match(request_id)
        # The handler sees the same id (it is what its log lines carry).
        assert response.user.name == request_id
        ids.append(request_id)
    assert ids[0] != ids[1]


async def test_client_request_id_is_echoed_unless_unusable(server: Any, auth: Any):
    server.servicer.get_user = echo_request_id
    call = server.stub.GetUser(
        user_pb2.GetUserRequest(id=1), metadata=[*auth, ("x-request-id", "req-123")], timeout=5
    )
    response = await call
    assert dict(await call.initial_metadata())["x-request-id"] == "req-123"
    assert response.user.name == "req-123"

    for unusable in ["x" * 129, ""]:
        call = server.stub.GetUser(
            user_pb2.GetUserRequest(id=1), metadata=[*auth, ("x-request-id", unusable)], timeout=5
        )
        response = await call
        request_id = dict(await call.initial_metadata())["x-request-id"]
        assert GENERATED.match(request_id)
        assert response.user.name == request_id


async def test_failed_calls_carry_the_request_id(server: Any, auth: Any):
    async def missing(request: Any, context: Any) -> Any:
        raise NotFound("nope")

    server.servicer.get_user = missing
    for metadata, code in [
        ([*auth, ("x-request-id", "failing-1")], grpc.StatusCode.NOT_FOUND),
        ([("x-request-id", "failing-1")], grpc.StatusCode.UNAUTHENTICATED),
    ]:
        call = server.stub.GetUser(user_pb2.GetUserRequest(id=1), metadata=metadata, timeout=5)
        assert await call.code() == code
        assert dict(await call.initial_metadata())["x-request-id"] == "failing-1"


async def test_streaming_calls_carry_the_request_id(server: Any, auth: Any):
    stream = server.stub.ListUsers(
        user_pb2.ListUsersRequest(page_size=2),
        metadata=[*auth, ("x-request-id", "stream-1")],
        timeout=5,
    )
    assert [u.id async for u in stream] == [1, 2]
    assert dict(await stream.initial_metadata())["x-request-id"] == "stream-1"

    upload = server.stub.ImportUsers(
        iter([user_pb2.CreateUserRequest()] * 2), metadata=auth, timeout=5
    )
    assert (await upload).created_count == 2
    assert GENERATED.match(dict(await upload.initial_metadata())["x-request-id"])


async def test_a_client_stream_gets_its_headers_once_admitted(server: Any, auth: Any):
    """A call whose client streams requests gets its headers when the handler first reads
    (or answers), so a client waiting for them never writes into a call already refused."""
    admit = asyncio.Event()

    async def read_when_told(requests: AsyncIterator[Any], context: Any) -> Any:
        await admit.wait()
        return user_pb2.ImportUsersResponse(created_count=len([r async for r in requests]))

    server.servicer.import_users = read_when_told
    upload = server.stub.ImportUsers(metadata=[*auth, ("x-request-id", "upload-1")], timeout=5)
    headers = asyncio.ensure_future(upload.initial_metadata())
    await asyncio.wait_for(server.servicer.entered.wait(), 5)
    # Had the headers been sent, they would be here before the answer to a later call on the
    # same connection.
    await server.stub.GetUser(user_pb2.GetUserRequest(id=1), metadata=auth, timeout=5)
    assert not headers.done()
    admit.set()
    assert dict(await asyncio.wait_for(headers, 5))["x-request-id"] == "upload-1"
    await upload.write(user_pb2.CreateUserRequest())
    await upload.done_writing()
    assert (await upload).created_count == 1


@pytest.mark.parametrize(
    ("metadata", "code"),
    [
        ([("x-request-id", "refused-1")], grpc.StatusCode.UNAUTHENTICATED),
        ("auth", grpc.StatusCode.INVALID_ARGUMENT),  # the handler refuses before reading
    ],
)
async def test_a_client_stream_refused_before_admission_has_no_headers(
    server: Any, auth: Any, metadata: Any, code: grpc.StatusCode
):
    async def refuse(requests: AsyncIterator[Any], context: Any) -> Any:
        raise InvalidArgument([FieldViolation("x-import-commit", "is not understood")])

    server.servicer.import_users = refuse
    if metadata == "auth":
        metadata = [*auth, ("x-request-id", "refused-1")]
    upload = server.stub.ImportUsers(metadata=metadata, timeout=5)
    # Trailers only: grpcio hands over empty headers, and the request id is in the trailers.
    assert list(await upload.initial_metadata()) == []
    assert await upload.code() == code
    assert dict(await upload.trailing_metadata())["x-request-id"] == "refused-1"
