"""The UserService as a client sees it: health, reflection, auth, CRUD, errors and deadlines."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from google.protobuf import descriptor_pool, field_mask_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from grpc_status import rpc_status

from parley.client.tokens import mint_token
from parley.proto import user_pb2, user_pb2_grpc
from parley.proto.contract import NEXT_PAGE_TOKEN_KEY

CALL_TIMEOUT = 10.0
UNSHARED_CHANNEL = [("grpc.use_local_subchannel_pool", 1)]
# ImportUsers' declaration that the client ends its import with `commit` (see ImportUsers in
# proto/user.proto), and a message that carries only that signal.
IMPORT_COMMIT = ("x-import-commit", "explicit")
COMMIT = user_pb2.CreateUserRequest(commit=True)
# How many imports the deadline test cuts off, each with a short deadline.
DEADLINE_RUNS = 30

Metadata = tuple[tuple[str, str], ...]
CreateUser = Callable[..., user_pb2.User]


def _status_details(error: grpc.RpcError) -> tuple[list[tuple[str, str]], list[str]]:
    """The BadRequest field violations and ErrorInfo domains of an error's rich status."""
    assert isinstance(error, grpc.Call)
    status = rpc_status.from_call(error)
    assert status is not None, "the error carries no google.rpc.Status details"
    violations: list[tuple[str, str]] = []
    domains: list[str] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations += [(v.field, v.description) for v in bad_request.field_violations]
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            domains.append(info.domain)
    return violations, domains


def _error_reason(error: grpc.RpcError) -> str:
    """The ErrorInfo reason of an error's rich status."""
    assert isinstance(error, grpc.Call)
    status = rpc_status.from_call(error)
    assert status is not None, "the error carries no google.rpc.Status details"
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    raise AssertionError("the error carries no google.rpc.ErrorInfo")


def _trailing(call: grpc.Call, key: str) -> str | None:
    values = [value for k, value in call.trailing_metadata() or () if k == key]
    assert len(values) <= 1, f"{key} appears {len(values)} times in the trailing metadata"
    return str(values[0]) if values else None


# Health and reflection: public, no token.


@pytest.mark.parametrize("service", ["", "user.UserService"])
def test_health_check_is_serving_without_a_token(user_channel: grpc.Channel, service: str) -> None:
    response = health_pb2_grpc.HealthStub(user_channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT
    )
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_health_check_of_an_unknown_service_is_not_found(user_channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as info:
        health_pb2_grpc.HealthStub(user_channel).Check(
            health_pb2.HealthCheckRequest(service="no.SuchService"), timeout=CALL_TIMEOUT
        )
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_user_service_without_a_token(user_channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(user_channel)
    responses = list(
        stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
            timeout=CALL_TIMEOUT,
        )
    )
    assert len(responses) == 1
    names = {s.name for s in responses[0].list_services_response.service}
    assert {"user.UserService", "grpc.health.v1.Health"} <= names


def test_reflection_describes_the_seed_methods(user_channel: grpc.Channel) -> None:
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(user_channel))
    service = pool.FindServiceByName("user.UserService")
    methods = {m.name: m for m in service.methods}
    assert {"GetUser", "ListUsers", "CreateUser"} <= set(methods)
    assert methods["ListUsers"].server_streaming and not methods["ListUsers"].client_streaming
    assert methods["GetUser"].output_type.full_name == "user.GetUserResponse"
    user = pool.FindMessageTypeByName("user.User")
    assert [(f.name, f.number) for f in user.fields][:4] == [
        ("id", 1),
        ("name", 2),
        ("email", 3),
        ("age", 4),
    ]


# Authentication and authorization.


@pytest.mark.parametrize(
    "metadata",
    [
        pytest.param((), id="no-token"),
        pytest.param((("authorization", "Bearer not-a-jwt"),), id="garbage-token"),
        pytest.param((("authorization", "Basic dXNlcjpwYXNz"),), id="wrong-scheme"),
    ],
)
def test_calls_without_a_valid_token_are_unauthenticated(
    users: user_pb2_grpc.UserServiceStub, metadata: Metadata
) -> None:
    with pytest.raises(grpc.RpcError) as get_info:
        users.GetUser(user_pb2.GetUserRequest(id=1), metadata=metadata, timeout=CALL_TIMEOUT)
    assert get_info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert get_info.value.details()

    stream = users.ListUsers(
        user_pb2.ListUsersRequest(page_size=1), metadata=metadata, timeout=CALL_TIMEOUT
    )
    with pytest.raises(grpc.RpcError) as list_info:
        list(stream)
    assert list_info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_token_without_the_write_scope_may_read_but_not_create(
    users: user_pb2_grpc.UserServiceStub,
    readonly_auth: Metadata,
    create_user: CreateUser,
    new_email: Callable[[], str],
) -> None:
    existing = create_user()
    got = users.GetUser(
        user_pb2.GetUserRequest(id=existing.id), metadata=readonly_auth, timeout=CALL_TIMEOUT
    )
    # Without users:read, another user's email is left out (see test_user_privacy.py).
    expected = user_pb2.User()
    expected.CopyFrom(existing)
    expected.email = ""
    assert got.user == expected

    email = new_email()
    with pytest.raises(grpc.RpcError) as info:
        users.CreateUser(
            user_pb2.CreateUserRequest(name="Read Only", email=email, age=20),
            metadata=readonly_auth,
            timeout=CALL_TIMEOUT,
        )
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "users:write" in (info.value.details() or "")

    # Nothing was stored: the same email is still free for a caller that may write.
    assert create_user(email=email).email == email


# The full round trip.


def _list_all_pages(
    users: user_pb2_grpc.UserServiceStub, auth: Metadata, page_size: int
) -> list[list[user_pb2.User]]:
    """Every page from the first to the one whose next-page token is empty."""
    pages: list[list[user_pb2.User]] = []
    page_token = ""
    while True:
        call = users.ListUsers(
            user_pb2.ListUsersRequest(page_size=page_size, page_token=page_token),
            metadata=auth,
            timeout=CALL_TIMEOUT,
        )
        pages.append(list(call))
        next_token = _trailing(call, NEXT_PAGE_TOKEN_KEY)
        assert next_token is not None, f"ListUsers sent no {NEXT_PAGE_TOKEN_KEY} trailer"
        if not next_token:
            return pages
        assert next_token != page_token, "the next-page token did not advance"
        page_token = next_token


def test_create_get_update_import_list_delete(
    users: user_pb2_grpc.UserServiceStub,
    auth: Metadata,
    new_email: Callable[[], str],
    created_ids: list[int],
) -> None:
    email = new_email()
    created = users.CreateUser(
        user_pb2.CreateUserRequest(name="  Grace Hopper ", email=email, age=85),
        metadata=auth,
        timeout=CALL_TIMEOUT,
    )
    created_ids.append(created.user.id)
    assert created.success is True
    user = created.user
    assert user.id > 0
    assert (user.name, user.email, user.age) == ("Grace Hopper", email, 85)
    assert user.HasField("create_time") and user.HasField("update_time")

    got = users.GetUser(user_pb2.GetUserRequest(id=user.id), metadata=auth, timeout=CALL_TIMEOUT)
    assert got.user == user

    # Only the masked field changes, even though the request also carries another age.
    updated = users.UpdateUser(
        user_pb2.UpdateUserRequest(
            user=user_pb2.User(id=user.id, name="Rear Admiral Hopper", age=40),
            update_mask=field_mask_pb2.FieldMask(paths=["name"]),
        ),
        metadata=auth,
        timeout=CALL_TIMEOUT,
    ).user
    assert (updated.id, updated.name, updated.email, updated.age) == (
        user.id,
        "Rear Admiral Hopper",
        email,
        85,
    )
    assert updated.create_time == user.create_time
    assert updated.update_time.ToDatetime() >= user.update_time.ToDatetime()
    got = users.GetUser(user_pb2.GetUserRequest(id=user.id), metadata=auth, timeout=CALL_TIMEOUT)
    assert got.user == updated

    imported_email = new_email()
    imported = users.ImportUsers(
        iter(
            [
                user_pb2.CreateUserRequest(name="Imported", email=imported_email, age=50),
                user_pb2.CreateUserRequest(name="   ", email=new_email(), age=50),
            ]
        ),
        metadata=auth,
        timeout=CALL_TIMEOUT,
    )
    assert (imported.created_count, imported.failed_count) == (1, 1)
    assert len(imported.errors) == 1
    error = imported.errors[0]
    assert (error.index, error.code, error.field) == (1, "INVALID_ARGUMENT", "name")
    assert error.message

    # A third user of this test guarantees that pages of two cannot hold them all.
    neighbour = users.CreateUser(
        user_pb2.CreateUserRequest(name="Neighbour", email=new_email(), age=1),
        metadata=auth,
        timeout=CALL_TIMEOUT,
    ).user
    created_ids.append(neighbour.id)

    # Page through with a small page size until the last page, following x-next-page-token.
    pages = _list_all_pages(users, auth, page_size=2)
    listed = [u for page in pages for u in page]
    assert all(len(page) <= 2 for page in pages)
    ids = [u.id for u in listed]
    assert ids == sorted(set(ids)), "ListUsers pages overlap or are out of id order"
    by_email = {u.email: u for u in listed}
    assert by_email[email] == updated
    assert imported_email in by_email, "the good import row is not listed"
    imported_user = by_email[imported_email]
    created_ids.append(imported_user.id)
    assert (imported_user.name, imported_user.age) == ("Imported", 50)
    assert imported_user.id > user.id
    assert neighbour.id in ids
    assert len(pages) >= 2, "three users cannot fit on one page of two"

    for user_id in (user.id, imported_user.id):
        response = users.DeleteUser(
            user_pb2.DeleteUserRequest(id=user_id), metadata=auth, timeout=CALL_TIMEOUT
        )
        assert response == user_pb2.DeleteUserResponse()
        with pytest.raises(grpc.RpcError) as info:
            users.GetUser(user_pb2.GetUserRequest(id=user_id), metadata=auth, timeout=CALL_TIMEOUT)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND

    with pytest.raises(grpc.RpcError) as info:
        users.DeleteUser(
            user_pb2.DeleteUserRequest(id=user.id), metadata=auth, timeout=CALL_TIMEOUT
        )
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_offset_pages_follow_the_page_number(
    users: user_pb2_grpc.UserServiceStub, auth: Metadata, create_user: CreateUser
) -> None:
    create_user()
    create_user()
    first = list(
        users.ListUsers(
            user_pb2.ListUsersRequest(page=1, page_size=1), metadata=auth, timeout=CALL_TIMEOUT
        )
    )
    second = list(
        users.ListUsers(
            user_pb2.ListUsersRequest(page=2, page_size=1), metadata=auth, timeout=CALL_TIMEOUT
        )
    )
    assert len(first) == len(second) == 1
    assert first[0].id < second[0].id


def test_email_is_unique_regardless_of_case(
    users: user_pb2_grpc.UserServiceStub, auth: Metadata, create_user: CreateUser
) -> None:
    existing = create_user()
    with pytest.raises(grpc.RpcError) as info:
        users.CreateUser(
            user_pb2.CreateUserRequest(name="Twin", email=existing.email.upper(), age=1),
            metadata=auth,
            timeout=CALL_TIMEOUT,
        )
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS


# Errors carry google.rpc details.


def test_invalid_create_lists_every_bad_field(
    users: user_pb2_grpc.UserServiceStub, auth: Metadata
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        users.CreateUser(
            user_pb2.CreateUserRequest(name="", email="not-an-email", age=151),
            metadata=auth,
            timeout=CALL_TIMEOUT,
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations, domains = _status_details(info.value)
    assert sorted(field for field, _ in violations) == ["age", "email", "name"]
    assert all(description for _, description in violations)
    assert "parley" in domains


@pytest.mark.parametrize("user_id", [0, -1])
def test_get_with_a_non_positive_id_is_invalid(
    users: user_pb2_grpc.UserServiceStub, auth: Metadata, user_id: int
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        users.GetUser(user_pb2.GetUserRequest(id=user_id), metadata=auth, timeout=CALL_TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations, _ = _status_details(info.value)
    assert [field for field, _ in violations] == ["id"]


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        pytest.param(user_pb2.ListUsersRequest(page_size=-1), "page_size", id="negative-size"),
        pytest.param(user_pb2.ListUsersRequest(page_token="bogus!"), "page_token", id="bad-token"),
    ],
)
def test_invalid_list_requests_name_the_field(
    users: user_pb2_grpc.UserServiceStub,
    auth: Metadata,
    request_: user_pb2.ListUsersRequest,
    field: str,
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(users.ListUsers(request_, metadata=auth, timeout=CALL_TIMEOUT))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations, _ = _status_details(info.value)
    assert [f for f, _ in violations] == [field]


def test_update_with_an_unknown_mask_path_is_invalid(
    users: user_pb2_grpc.UserServiceStub, auth: Metadata, create_user: CreateUser
) -> None:
    user = create_user()
    with pytest.raises(grpc.RpcError) as info:
        users.UpdateUser(
            user_pb2.UpdateUserRequest(
                user=user_pb2.User(id=user.id, name="X"),
                update_mask=field_mask_pb2.FieldMask(paths=["create_time"]),
            ),
            metadata=auth,
            timeout=CALL_TIMEOUT,
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations, _ = _status_details(info.value)
    assert "update_mask" in [f for f, _ in violations]
    got = users.GetUser(user_pb2.GetUserRequest(id=user.id), metadata=auth, timeout=CALL_TIMEOUT)
    assert got.user == user


# Deadlines.


def test_a_tiny_deadline_fails_fast_with_deadline_exceeded(
    user_addr: str, users: user_pb2_grpc.UserServiceStub, auth: Metadata, create_user: CreateUser
) -> None:
    user = create_user()
    # Each call gets a channel of its own that is not connected yet (a local subchannel pool, so
    # it cannot borrow the fixture's connection). gRPC keeps deadlines to the millisecond,
    # rounded up, and with tokens verified once a GetUser on loopback often comes back within
    # that millisecond even on a new connection (6 of 10 here): an answer is a correct outcome.
    # What must never happen is another code, or a wait.
    calls = {
        "GetUser": lambda stub: stub.GetUser(
            user_pb2.GetUserRequest(id=user.id), metadata=auth, timeout=1e-6
        ),
        "ListUsers": lambda stub: list(
            stub.ListUsers(user_pb2.ListUsersRequest(), metadata=auth, timeout=1e-6)
        ),
    }
    started = time.monotonic()
    for name, call in calls.items():
        codes = []
        for _ in range(5):
            with grpc.insecure_channel(user_addr, options=UNSHARED_CHANNEL) as channel:
                try:
                    call(user_pb2_grpc.UserServiceStub(channel))
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as error:
                    codes.append(error.code())
        allowed = {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.OK}
        assert set(codes) <= allowed, f"{name} with a 1 us deadline: {codes}"

    # A call that cannot finish before its deadline: an import whose request stream stays
    # open. It must end DEADLINE_EXCEEDED at the deadline, not when the stream would close.
    release = threading.Event()

    def held_open() -> Iterator[user_pb2.CreateUserRequest]:
        release.wait(CALL_TIMEOUT)
        return
        yield

    deadline_started = time.monotonic()
    try:
        with pytest.raises(grpc.RpcError) as info:
            users.ImportUsers(held_open(), metadata=auth, timeout=0.2)
    finally:
        release.set()
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, info.value
    assert time.monotonic() - deadline_started < 2.0
    elapsed = time.monotonic() - started
    assert elapsed < CALL_TIMEOUT

    # The service is fine afterwards.
    got = users.GetUser(user_pb2.GetUserRequest(id=user.id), metadata=auth, timeout=CALL_TIMEOUT)
    assert got.user == user


def _import_until_deadline(
    users: user_pb2_grpc.UserServiceStub,
    metadata: Metadata,
    row: user_pb2.CreateUserRequest,
    deadline: float,
) -> grpc.RpcError:
    """Sends `row` to ImportUsers and never half-closes, so only the deadline can end the call."""
    release = threading.Event()

    def stalled_rows() -> Iterator[user_pb2.CreateUserRequest]:
        yield row
        release.wait()  # released once the call has ended, so the sending thread finishes

    try:
        with pytest.raises(grpc.RpcError) as info:
            users.ImportUsers(stalled_rows(), metadata=metadata, timeout=deadline)
    finally:
        release.set()
    return info.value


def test_an_import_whose_client_never_finishes_ends_at_its_deadline(
    users: user_pb2_grpc.UserServiceStub, auth: Metadata, new_email: Callable[[], str]
) -> None:
    # An invalid row, so that nothing could be stored whatever happens to the call.
    row = user_pb2.CreateUserRequest(name=" ", email=new_email(), age=1)
    started = time.monotonic()

    error = _import_until_deadline(users, auth, row, deadline=0.5)

    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < CALL_TIMEOUT


def _email_is_free(
    users: user_pb2_grpc.UserServiceStub, auth: Metadata, email: str, created_ids: list[int]
) -> str | None:
    """None when a new user may take `email` (it does, and is deleted after the test);
    otherwise the status that refused it."""
    try:
        created = users.CreateUser(
            user_pb2.CreateUserRequest(name="After Import", email=email, age=1),
            metadata=auth,
            timeout=CALL_TIMEOUT,
        )
    except grpc.RpcError as rpc_error:
        return f"{rpc_error.code().name}: {rpc_error.details()}"
    created_ids.append(created.user.id)
    return None


def test_an_import_cut_off_by_its_deadline_stores_nothing(
    users: user_pb2_grpc.UserServiceStub,
    auth: Metadata,
    new_email: Callable[[], str],
    created_ids: list[int],
) -> None:
    """A client that declares `x-import-commit: explicit` sends a row and neither commits nor
    half-closes; the deadline ends the call. Before the commit signal, about 1 such call in 10
    with a 1 s deadline was stored all the same; repeated here with deadlines of 0.2 to 0.5 s."""
    declared = (*auth, IMPORT_COMMIT)
    stored: list[str] = []
    for run in range(DEADLINE_RUNS):
        email = new_email()
        row = user_pb2.CreateUserRequest(name="Stalled Import", email=email, age=1)

        error = _import_until_deadline(users, declared, row, deadline=0.2 + (run % 7) * 0.05)

        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error
        # An import cut off before its commit stores nothing, so the email is still free.
        refused = _email_is_free(users, auth, email, created_ids)
        if refused is not None:
            stored.append(f"run {run}: {refused}")
    assert not stored, (
        f"imports cut off by their deadline stored rows in {len(stored)} runs: {stored}"
    )


# ImportUsers' commit signal (see ImportUsers in proto/user.proto).


def _ids_with_email(
    users: user_pb2_grpc.UserServiceStub, auth: Metadata, emails: set[str]
) -> dict[str, int]:
    found = {}
    for page in _list_all_pages(users, auth, page_size=1000):
        found.update({user.email: user.id for user in page if user.email in emails})
    return found


def test_an_import_is_stored_once_its_commit_arrives(
    users: user_pb2_grpc.UserServiceStub,
    auth: Metadata,
    new_email: Callable[[], str],
    created_ids: list[int],
) -> None:
    declared = (*auth, IMPORT_COMMIT)
    emails = [new_email() for _ in range(3)]
    # The commit on the last row ...
    on_last_row = users.ImportUsers(
        iter(
            [
                user_pb2.CreateUserRequest(name="First", email=emails[0], age=1),
                user_pb2.CreateUserRequest(name="", email=new_email(), age=1),
                user_pb2.CreateUserRequest(name="Second", email=emails[1], age=2, commit=True),
            ]
        ),
        metadata=declared,
        timeout=CALL_TIMEOUT,
    )
    # ... or in a message of its own, which is no row.
    on_its_own = users.ImportUsers(
        iter([user_pb2.CreateUserRequest(name="Third", email=emails[2], age=3), COMMIT]),
        metadata=declared,
        timeout=CALL_TIMEOUT,
    )

    stored = _ids_with_email(users, auth, set(emails))
    created_ids.extend(stored.values())
    assert (on_last_row.created_count, on_last_row.failed_count) == (2, 1)
    assert [(e.index, e.field) for e in on_last_row.errors] == [(1, "name")]
    assert (on_its_own.created_count, on_its_own.failed_count) == (1, 0)
    assert set(stored) == set(emails)


def test_a_declared_import_that_ends_without_commit_stores_nothing(
    users: user_pb2_grpc.UserServiceStub,
    auth: Metadata,
    new_email: Callable[[], str],
    created_ids: list[int],
) -> None:
    email = new_email()
    with pytest.raises(grpc.RpcError) as info:
        users.ImportUsers(
            iter([user_pb2.CreateUserRequest(name="Uncommitted", email=email, age=1)]),
            metadata=(*auth, IMPORT_COMMIT),
            timeout=CALL_TIMEOUT,
        )

    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _error_reason(info.value) == "IMPORT_NOT_COMMITTED"
    violations, _ = _status_details(info.value)
    assert [field for field, _ in violations] == ["commit"]
    assert _email_is_free(users, auth, email, created_ids) is None


def test_a_seed_style_import_commits_when_it_half_closes(
    users: user_pb2_grpc.UserServiceStub,
    auth: Metadata,
    new_email: Callable[[], str],
    created_ids: list[int],
) -> None:
    """A client generated from a proto without `commit` (grpcurl, the tutorial's style)."""
    email = new_email()
    response = users.ImportUsers(
        iter([user_pb2.CreateUserRequest(name="Seed Style", email=email, age=1)]),
        metadata=auth,
        timeout=CALL_TIMEOUT,
    )

    stored = _ids_with_email(users, auth, {email})
    created_ids.extend(stored.values())
    assert (response.created_count, response.failed_count) == (1, 0)
    assert set(stored) == {email}


def test_create_user_refuses_the_import_commit(
    users: user_pb2_grpc.UserServiceStub,
    auth: Metadata,
    new_email: Callable[[], str],
    created_ids: list[int],
) -> None:
    email = new_email()
    with pytest.raises(grpc.RpcError) as info:
        users.CreateUser(
            user_pb2.CreateUserRequest(name="Ada", email=email, age=1, commit=True),
            metadata=auth,
            timeout=CALL_TIMEOUT,
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations, _ = _status_details(info.value)
    assert [field for field, _ in violations] == ["commit"]
    assert _email_is_free(users, auth, email, created_ids) is None


def test_a_declared_import_with_a_bad_row_stores_nothing(
    user_channel: grpc.Channel,
    auth: Metadata,
    users: user_pb2_grpc.UserServiceStub,
    new_email: Callable[[], str],
    created_ids: list[int],
) -> None:
    """A row whose bytes do not parse, or one over PARLEY_MAX_MESSAGE_BYTES (1 MiB by
    default), ends the whole import before its commit, as it does without the declaration."""
    email = new_email()
    good = user_pb2.CreateUserRequest(name="Good", email=email, age=1).SerializeToString()
    mark = "MARK"
    unparsable = (
        user_pb2.CreateUserRequest(name=mark, email=new_email(), age=1)
        .SerializeToString()
        .replace(mark.encode(), b"\xff\xfe\xfd\xfc")  # not UTF-8, as long as the mark
    )
    oversized = user_pb2.CreateUserRequest(
        name="x" * 1_200_000, email=new_email(), age=1
    ).SerializeToString()
    import_users = user_channel.stream_unary("/user.UserService/ImportUsers")
    for bad, code in (
        (unparsable, grpc.StatusCode.INVALID_ARGUMENT),
        (oversized, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ):
        with pytest.raises(grpc.RpcError) as info:
            import_users(
                iter([good, bad, COMMIT.SerializeToString()]),
                metadata=(*auth, IMPORT_COMMIT),
                timeout=CALL_TIMEOUT,
            )
        assert info.value.code() == code, info.value
    assert _email_is_free(users, auth, email, created_ids) is None


def test_a_declared_import_needs_a_valid_token_that_may_write(
    users: user_pb2_grpc.UserServiceStub,
    auth: Metadata,
    readonly_auth: Metadata,
    new_email: Callable[[], str],
    created_ids: list[int],
) -> None:
    email = new_email()
    forged = mint_token(secrets.token_urlsafe(32), "1", ["users:write"])  # not the stack's secret
    cases = [
        ((), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Bearer not-a-jwt"),), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", f"Bearer {forged}"),), grpc.StatusCode.UNAUTHENTICATED),
        (readonly_auth, grpc.StatusCode.PERMISSION_DENIED),
    ]
    for metadata, code in cases:
        with pytest.raises(grpc.RpcError) as info:
            users.ImportUsers(
                iter([user_pb2.CreateUserRequest(name="Intruder", email=email, commit=True)]),
                metadata=(*metadata, IMPORT_COMMIT),
                timeout=CALL_TIMEOUT,
            )
        assert info.value.code() == code, info.value
    assert _email_is_free(users, auth, email, created_ids) is None
