"""GetUser, CreateUser, UpdateUser and DeleteUser: success paths and every documented error."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import field_mask_pb2

from parley.proto import user_pb2
from parley.testing.tokens import make_token

INVALID = grpc.StatusCode.INVALID_ARGUMENT


async def create(stub, auth, name="Ada Lovelace", email="ada@example.com", age=36):
    response = await stub.CreateUser(
        user_pb2.CreateUserRequest(name=name, email=email, age=age), metadata=auth
    )
    return response.user


async def failure(call):
    """The AioRpcError a call ends with; fails the test if the call succeeds."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def row_count(pg) -> int:
    cur = await pg.execute("SELECT count(*) FROM users")
    (count,) = await cur.fetchone()
    return count


# --- GetUser ---------------------------------------------------------------------------------


async def test_get_user_returns_the_stored_user(stub, auth, read_auth):
    created = await create(stub, auth)
    other = await create(stub, auth, name="Grace", email="grace@example.com", age=45)

    got = (await stub.GetUser(user_pb2.GetUserRequest(id=created.id), metadata=auth)).user

    assert got == created
    assert got.id != other.id
    assert got.create_time.seconds > 0

    # Any token may read; without users:read or users:write, another user's email is left
    # empty (test_privacy.py has the whole rule).
    seen = (await stub.GetUser(user_pb2.GetUserRequest(id=created.id), metadata=read_auth)).user
    assert seen.email == ""
    seen.email = created.email
    assert seen == created


async def test_get_user_rejects_non_positive_ids(stub, auth, details, subtests):
    for user_id in (0, -1, -(2**31)):
        with subtests.test(id=user_id):
            error = await failure(stub.GetUser(user_pb2.GetUserRequest(id=user_id), metadata=auth))

            found = details(error)
            assert found.code == INVALID
            assert found.fields == ["id"]
            assert "positive" in found.violations[0][1]


async def test_get_missing_user_is_not_found(stub, auth, details):
    await create(stub, auth)
    error = await failure(stub.GetUser(user_pb2.GetUserRequest(id=2**31 - 1), metadata=auth))

    found = details(error)
    assert found.code == grpc.StatusCode.NOT_FOUND
    assert found.reason == "USER_NOT_FOUND"
    assert str(2**31 - 1) in found.message


# --- Authentication, for every RPC -----------------------------------------------------------


def _calls(stub):
    user = user_pb2.User(id=1, name="X")
    return {
        "GetUser": lambda md: stub.GetUser(user_pb2.GetUserRequest(id=1), metadata=md),
        "ListUsers": lambda md: _drain(stub.ListUsers(user_pb2.ListUsersRequest(), metadata=md)),
        "CreateUser": lambda md: stub.CreateUser(
            user_pb2.CreateUserRequest(name="A", email="a@example.com", age=1), metadata=md
        ),
        "UpdateUser": lambda md: stub.UpdateUser(
            user_pb2.UpdateUserRequest(user=user), metadata=md
        ),
        "DeleteUser": lambda md: stub.DeleteUser(user_pb2.DeleteUserRequest(id=1), metadata=md),
        "ImportUsers": lambda md: stub.ImportUsers(
            iter([user_pb2.CreateUserRequest(name="A", email="a@example.com")]), metadata=md
        ),
    }


async def _drain(call):
    return [user async for user in call]


ALL_RPCS = ["GetUser", "ListUsers", "CreateUser", "UpdateUser", "DeleteUser", "ImportUsers"]
WRITE_RPCS = ["CreateUser", "UpdateUser", "DeleteUser", "ImportUsers"]


async def test_every_rpc_needs_a_token(stub, details, pg, subtests):
    for rpc in ALL_RPCS:
        with subtests.test(rpc=rpc):
            error = await failure(_calls(stub)[rpc](None))

            found = details(error)
            assert found.code == grpc.StatusCode.UNAUTHENTICATED
            assert found.reason == "TOKEN_MISSING"
    assert await row_count(pg) == 0


MALFORMED_HEADERS = [
    ("Bearer not-a-jwt", "TOKEN_INVALID"),
    ("Basic dXNlcjpwYXNz", "TOKEN_MALFORMED"),
    ("Bearer ", "TOKEN_MALFORMED"),
    ("", "TOKEN_MALFORMED"),
]


async def test_malformed_tokens_are_unauthenticated(stub, details, pg, subtests):
    for header, reason in MALFORMED_HEADERS:
        for rpc in ("GetUser", "CreateUser"):
            with subtests.test(header=header, rpc=rpc):
                error = await failure(_calls(stub)[rpc]([("authorization", header)]))
                found = details(error)
                assert found.code == grpc.StatusCode.UNAUTHENTICATED
                assert found.reason == reason
    assert await row_count(pg) == 0


async def test_expired_and_wrongly_signed_tokens_are_unauthenticated(stub, details, token):
    expired = token("1", "users:write", ttl=-3600)
    forged = make_token("another-secret-that-is-long-enough-for-hs256", "1", "users:write")
    for bad, reason in ((expired, "TOKEN_EXPIRED"), (forged, "TOKEN_INVALID")):
        error = await failure(_calls(stub)["CreateUser"]([("authorization", f"Bearer {bad}")]))
        found = details(error)
        assert found.code == grpc.StatusCode.UNAUTHENTICATED
        assert found.reason == reason


async def test_writes_need_the_write_scope(stub, auth, read_auth, details, pg, subtests):
    existing = await create(stub, auth, email="keep@example.com")
    assert existing.id == 1  # the user that UpdateUser and DeleteUser name

    for rpc in WRITE_RPCS:
        with subtests.test(rpc=rpc):
            error = await failure(_calls(stub)[rpc](read_auth))

            found = details(error)
            assert found.code == grpc.StatusCode.PERMISSION_DENIED
            assert found.reason == "MISSING_SCOPE"
            assert found.metadata == {"scope": "users:write"}
            assert await row_count(pg) == 1
            got = (await stub.GetUser(user_pb2.GetUserRequest(id=1), metadata=auth)).user
            assert got == existing


async def test_a_token_with_the_scope_in_scp_may_write(stub, token):
    md = [("authorization", f"Bearer {token('1', scp=['users:write'])}")]
    user = await create(stub, md)
    assert user.id > 0


# --- CreateUser ------------------------------------------------------------------------------


async def test_create_user_stores_trimmed_values(stub, auth, pg):
    response = await stub.CreateUser(
        user_pb2.CreateUserRequest(name="  Ada Lovelace ", email=" Ada@Example.com  ", age=36),
        metadata=auth,
    )

    assert response.success is True
    user = response.user
    assert user.id > 0
    assert (user.name, user.email, user.age) == ("Ada Lovelace", "Ada@Example.com", 36)
    assert user.create_time == user.update_time
    cur = await pg.execute("SELECT name, email, age FROM users WHERE id = %s", (user.id,))
    assert await cur.fetchone() == ("Ada Lovelace", "Ada@Example.com", 36)


BOUNDARY_USERS = [
    ("x" * 100, "edge@example.com", 0),
    ("Émile Zoë 李", "e" * 242 + "@example.com", 150),
    ("O'Brien; DROP TABLE users", "o'brien+tag@sub.example.co.uk", 1),
]


async def test_create_user_accepts_boundary_values(stub, auth, subtests):
    assert len(BOUNDARY_USERS[1][1]) == 254
    for name, email, age in BOUNDARY_USERS:
        with subtests.test(name=name[:20], email=email[:20], age=age):
            user = await create(stub, auth, name=name, email=email, age=age)
            got = (await stub.GetUser(user_pb2.GetUserRequest(id=user.id), metadata=auth)).user
            assert (got.name, got.email, got.age) == (name, email, age)


BAD_CREATES = [
    ("", "a@example.com", 30, "name"),
    ("   \t ", "a@example.com", 30, "name"),
    ("x" * 101, "a@example.com", 30, "name"),
    ("bell\x07", "a@example.com", 30, "name"),
    ("nul\x00", "a@example.com", 30, "name"),
    ("del\x7f", "a@example.com", 30, "name"),
    ("c1 \x80 start", "a@example.com", 30, "name"),
    ("c1 \x9f end", "a@example.com", 30, "name"),
    ("next\x85line inside", "a@example.com", 30, "name"),
    ("\x1b[31mred", "a@example.com", 30, "name"),
    ("Ada", "", 30, "email"),
    ("Ada", "   ", 30, "email"),
    ("Ada", "plainaddress", 30, "email"),
    ("Ada", "ada@localhost", 30, "email"),
    ("Ada", "ada@@example.com", 30, "email"),
    ("Ada", "@example.com", 30, "email"),
    ("Ada", "ada lovelace@example.com", 30, "email"),
    ("Ada", "ada@example.", 30, "email"),
    ("Ada", "ada@example.com\x00", 30, "email"),
    ("Ada", "ad\x7fa@example.com", 30, "email"),
    ("Ada", "ada\x80@example.com", 30, "email"),
    ("Ada", "ada@exa\x9fmple.com", 30, "email"),
    ("Ada", "a" * 243 + "@example.com", 30, "email"),
    ("Ada", "a@example.com", -1, "age"),
    ("Ada", "a@example.com", 151, "age"),
    ("Ada", "a@example.com", 2**31 - 1, "age"),
]


async def test_create_user_rejects_each_bad_field(stub, auth, details, pg, subtests):
    for name, email, age, field in BAD_CREATES:
        with subtests.test(name=name[:20], email=email[:20], age=age):
            request = user_pb2.CreateUserRequest(name=name, email=email, age=age)
            error = await failure(stub.CreateUser(request, metadata=auth))

            found = details(error)
            assert found.code == INVALID
            assert found.fields == [field]
            assert found.violations[0][1]
            assert f"{field}:" in found.message
    assert await row_count(pg) == 0


CONTROL_CHARACTERS = ["\x00", "\x01", "\x1b", "\x7f", "\x80", "\x85", "\x9b", "\x9f"]


async def test_control_characters_anywhere_inside_are_named_as_the_problem(
    stub, auth, details, pg, subtests
):
    for char in CONTROL_CHARACTERS:
        for field, request in (
            ("name", user_pb2.CreateUserRequest(name=f"A{char}da", email="a@example.com")),
            ("email", user_pb2.CreateUserRequest(name="Ada", email=f"a{char}da@example.com")),
        ):
            with subtests.test(field=field, char=hex(ord(char))):
                found = details(await failure(stub.CreateUser(request, metadata=auth)))
                assert found.code == INVALID
                assert found.violations == [(field, "must not contain control characters")]
    assert await row_count(pg) == 0


async def test_white_space_controls_around_a_value_are_trimmed(stub, auth):
    # Trimming removes white space at both ends, which includes the controls that Python's
    # str.strip() counts as white space (\t \n \v \f \r, \x1c-\x1f and \x85).
    user = await create(stub, auth, name="\x85\x1fAda\t\x1c", email="\x1d ada@example.com\x85")
    assert (user.name, user.email) == ("Ada", "ada@example.com")


async def test_create_user_reports_every_bad_field_once(stub, auth, details, pg):
    error = await failure(
        stub.CreateUser(user_pb2.CreateUserRequest(name=" ", email="nope", age=-1), metadata=auth)
    )

    found = details(error)
    assert found.code == INVALID
    assert sorted(found.fields) == ["age", "email", "name"]
    assert len(found.violations) == 3
    assert found.reason == "INVALID_ARGUMENT"
    assert await row_count(pg) == 0


async def test_create_user_with_a_taken_email_in_another_case_already_exists(
    stub, auth, details, pg
):
    first = await create(stub, auth, email="ada@example.com")

    error = await failure(
        stub.CreateUser(
            user_pb2.CreateUserRequest(name="Other", email="  ADA@Example.COM ", age=2),
            metadata=auth,
        )
    )

    found = details(error)
    assert found.code == grpc.StatusCode.ALREADY_EXISTS
    assert found.reason == "EMAIL_TAKEN"
    assert found.metadata == {"field": "email"}
    assert await row_count(pg) == 1
    got = (await stub.GetUser(user_pb2.GetUserRequest(id=first.id), metadata=auth)).user
    assert got == first


# --- UpdateUser ------------------------------------------------------------------------------


def update_request(user_id, mask=None, **fields):
    request = user_pb2.UpdateUserRequest(user=user_pb2.User(id=user_id, **fields))
    if mask is not None:
        request.update_mask.CopyFrom(field_mask_pb2.FieldMask(paths=mask))
    return request


MASKED_UPDATES = [
    (["name"], {"name": " Countess ", "email": "x@example.com", "age": 99}, ("Countess",)),
    (["email"], {"name": "ignored", "email": "new@example.org"}, ("new@example.org",)),
    (["age"], {"age": 0, "name": ""}, (0,)),
    (["name", "age"], {"name": "N", "age": 150}, ("N", 150)),
    (["name", "email", "age"], {"name": "A", "email": "b@c.de", "age": 7}, ("A", "b@c.de", 7)),
]


async def test_update_user_changes_only_masked_fields(stub, auth, pg, subtests):
    for mask, fields, expected in MASKED_UPDATES:
        with subtests.test(mask=mask):
            await pg.execute("DELETE FROM users")
            before = await create(stub, auth, name="Ada", email="ada@example.com", age=36)

            request = update_request(before.id, mask, **fields)
            after = (await stub.UpdateUser(request, metadata=auth)).user

            changed = dict(zip(mask, expected, strict=True))
            for name in ("name", "email", "age"):
                assert getattr(after, name) == changed.get(name, getattr(before, name)), name
            assert after.id == before.id
            assert after.create_time == before.create_time
            assert after.update_time.ToDatetime() > before.update_time.ToDatetime()
            got = (await stub.GetUser(user_pb2.GetUserRequest(id=before.id), metadata=auth)).user
            assert got == after


async def test_update_with_an_empty_mask_changes_the_non_default_fields(stub, auth):
    before = await create(stub, auth, name="Ada", email="ada@example.com", age=36)

    after = (await stub.UpdateUser(update_request(before.id, name="Augusta"), metadata=auth)).user
    assert (after.name, after.email, after.age) == ("Augusta", "ada@example.com", 36)

    after = (
        await stub.UpdateUser(
            update_request(before.id, email="aug@example.com", age=37), metadata=auth
        )
    ).user
    assert (after.name, after.email, after.age) == ("Augusta", "aug@example.com", 37)


async def test_update_with_an_empty_mask_and_no_fields_is_invalid(stub, auth, details):
    user = await create(stub, auth)
    error = await failure(stub.UpdateUser(update_request(user.id), metadata=auth))

    found = details(error)
    assert found.code == INVALID
    assert found.fields == ["update_mask"]


BAD_MASKS = [["nickname"], ["id"], ["create_time"], ["name", "update_time"], [""], ["user.name"]]


async def test_update_rejects_unknown_and_read_only_paths(stub, auth, details, subtests):
    user = await create(stub, auth)

    for mask in BAD_MASKS:
        with subtests.test(mask=mask):
            request = update_request(user.id, mask, name="New")
            error = await failure(stub.UpdateUser(request, metadata=auth))

            found = details(error)
            assert found.code == INVALID
            assert found.fields == ["update_mask"]
            got = (await stub.GetUser(user_pb2.GetUserRequest(id=user.id), metadata=auth)).user
            assert got == user


BAD_UPDATES = [
    (["name"], {"name": "  "}, ["user.name"]),
    (["email"], {"email": "no-at-sign"}, ["user.email"]),
    (["age"], {"age": 151}, ["user.age"]),
    (
        ["name", "email", "age"],
        {"name": "", "email": "x", "age": -1},
        ["user.name", "user.email", "user.age"],
    ),
    ([], {"age": -5}, ["user.age"]),
]


async def test_update_rejects_bad_values_in_masked_fields(stub, auth, details, subtests):
    user = await create(stub, auth)

    for mask, fields, bad in BAD_UPDATES:
        with subtests.test(mask=mask, fields=fields):
            request = update_request(user.id, mask, **fields)
            error = await failure(stub.UpdateUser(request, metadata=auth))

            found = details(error)
            assert found.code == INVALID
            assert sorted(found.fields) == sorted(bad)
            got = (await stub.GetUser(user_pb2.GetUserRequest(id=user.id), metadata=auth)).user
            assert got == user


async def test_update_rejects_a_non_positive_id(stub, auth, details):
    error = await failure(stub.UpdateUser(update_request(0, ["name"], name="X"), metadata=auth))
    found = details(error)
    assert found.code == INVALID
    assert found.fields == ["user.id"]


async def test_update_of_a_missing_user_is_not_found(stub, auth, details, pg):
    user = await create(stub, auth)
    error = await failure(
        stub.UpdateUser(update_request(user.id + 1000, ["name"], name="X"), metadata=auth)
    )

    found = details(error)
    assert found.code == grpc.StatusCode.NOT_FOUND
    assert found.reason == "USER_NOT_FOUND"
    assert await row_count(pg) == 1


async def test_update_to_a_taken_email_already_exists(stub, auth, details):
    ada = await create(stub, auth, email="ada@example.com")
    grace = await create(stub, auth, name="Grace", email="grace@example.com")

    error = await failure(
        stub.UpdateUser(
            update_request(grace.id, ["email", "name"], email="ADA@example.COM", name="G"),
            metadata=auth,
        )
    )

    found = details(error)
    assert found.code == grpc.StatusCode.ALREADY_EXISTS
    assert found.reason == "EMAIL_TAKEN"
    assert found.metadata == {"field": "email"}
    for user in (ada, grace):
        got = (await stub.GetUser(user_pb2.GetUserRequest(id=user.id), metadata=auth)).user
        assert got == user


async def test_update_may_change_the_case_of_its_own_email(stub, auth):
    user = await create(stub, auth, email="ada@example.com")
    after = (
        await stub.UpdateUser(
            update_request(user.id, ["email"], email="ADA@example.com"), metadata=auth
        )
    ).user
    assert after.email == "ADA@example.com"


# --- DeleteUser ------------------------------------------------------------------------------


async def test_delete_user_removes_only_that_user(stub, auth, details):
    ada = await create(stub, auth, email="ada@example.com")
    grace = await create(stub, auth, name="Grace", email="grace@example.com")

    response = await stub.DeleteUser(user_pb2.DeleteUserRequest(id=ada.id), metadata=auth)
    assert response == user_pb2.DeleteUserResponse()

    error = await failure(stub.GetUser(user_pb2.GetUserRequest(id=ada.id), metadata=auth))
    assert details(error).code == grpc.StatusCode.NOT_FOUND
    kept = (await stub.GetUser(user_pb2.GetUserRequest(id=grace.id), metadata=auth)).user
    assert kept == grace

    again = await failure(stub.DeleteUser(user_pb2.DeleteUserRequest(id=ada.id), metadata=auth))
    found = details(again)
    assert found.code == grpc.StatusCode.NOT_FOUND
    assert found.reason == "USER_NOT_FOUND"


async def test_a_deleted_users_email_can_be_reused(stub, auth):
    ada = await create(stub, auth, email="ada@example.com")
    await stub.DeleteUser(user_pb2.DeleteUserRequest(id=ada.id), metadata=auth)

    again = await create(stub, auth, email="Ada@Example.com")
    assert again.id != ada.id


async def test_delete_rejects_non_positive_ids(stub, auth, details, subtests):
    for user_id in (0, -7):
        with subtests.test(id=user_id):
            request = user_pb2.DeleteUserRequest(id=user_id)
            error = await failure(stub.DeleteUser(request, metadata=auth))
            found = details(error)
            assert found.code == INVALID
            assert found.fields == ["id"]
