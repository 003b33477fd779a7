"""The UserService answers its four call patterns over a real port."""

import grpc
import pytest

from parley.proto import user_pb2


async def test_create_then_get(stub, auth):
    created = await stub.CreateUser(
        user_pb2.CreateUserRequest(name="Ada", email="ada@example.com", age=36), metadata=auth
    )
    assert created.success
    got = await stub.GetUser(user_pb2.GetUserRequest(id=created.user.id), metadata=auth)
    assert got.user.email == "ada@example.com"


async def test_missing_user_is_not_found(stub, auth):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetUser(user_pb2.GetUserRequest(id=12345), metadata=auth)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
