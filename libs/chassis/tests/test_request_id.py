"""Every call gets an x-request-id: the client's if it sent one, else a fresh one."""

from __future__ import annotations

import re
from typing import Any

import grpc

from parley.chassis import NotFound
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
