"""Generated hostile input to UserService: page tokens of any text or bytes (deeply nested JSON
too), names and emails of any characters, control characters included.

Every call ends with a documented code (OK, INVALID_ARGUMENT, or ALREADY_EXISTS for a taken
email), never INTERNAL or UNKNOWN; what is accepted is stored byte for byte (after the
documented trimming), and nothing with a control character is stored.
"""

from __future__ import annotations

import base64
import json
import unicodedata
import uuid
from typing import Any

import grpc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from parley.proto import user_pb2
from parley.testing import bearer, rich_error

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS
LIMIT = 65536  # PARLEY_MAX_MESSAGE_BYTES of the test servers (conftest)
PROPERTY_SETTINGS = settings(
    max_examples=120,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def _claims(payload: Any, *, compact: bool) -> str:
    separators = (",", ":") if compact else (", ", ": ")
    return _b64url(json.dumps(payload, separators=separators).encode())


# The C0 and C1 controls and DEL (category Cc), and white space that is also a control.
controls = st.characters(categories=["Cc"])
any_char = st.characters(codec="utf-8")  # every code point protobuf can carry: no surrogates
hostile_text = st.lists(
    st.one_of(any_char, controls, st.sampled_from([" ", "\t", "\n", "\x85", "\u3000", "@"])),
    max_size=40,
).map("".join)

page_tokens = st.one_of(
    st.text(),
    st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=", max_size=80),
    st.binary(max_size=100).map(_b64url),
    st.binary(max_size=100).map(lambda data: base64.b64encode(data).decode()),
    st.integers(1, 10_000).map(lambda depth: _b64url(_nested(depth))),
    st.integers(1, 5_000).map(lambda depth: _b64url(b'{"v":1,"after":' + _nested(depth) + b"}")),
    st.builds(
        lambda version, after, compact: _claims({"v": version, "after": after}, compact=compact),
        st.one_of(st.integers(), st.text(max_size=5), st.none()),
        st.one_of(st.integers(), st.floats(), st.text(max_size=5), st.booleans()),
        st.booleans(),
    ),
)


def _has_control(text: str) -> bool:
    return any(unicodedata.category(c) == "Cc" for c in text)


def _call(function: Any, *args: Any, **kwargs: Any) -> tuple[grpc.StatusCode, Any]:
    try:
        return OK, function(*args, **kwargs)
    except grpc.RpcError as error:
        return error.code(), error


@PROPERTY_SETTINGS
@given(token=page_tokens)
@example(token=_b64url(_nested(10_000)))
@example(token=_b64url(b'{"v":1,"after":' + _nested(10_000) + b"}"))
@example(token=_b64url(b'{"v":' * 5_000 + b"1" + b"}" * 5_000))
def test_any_page_token_is_accepted_or_invalid(stack: Any, token: str) -> None:
    assert len(token.encode()) < LIMIT
    reader = bearer(stack.chatter_token)
    request = user_pb2.ListUsersRequest(page_size=2, page_token=token)
    code, result = _call(
        lambda: list(stack.users().ListUsers(request, metadata=reader, timeout=10))
    )
    assert code in (OK, INVALID), f"{code.name} for page_token {token[:80]!r}"
    if code == INVALID:
        error = rich_error(result)
        assert error.fields == ["page_token"], error
        assert error.reason == "INVALID_PAGE_TOKEN", error
        assert "is not a token returned by ListUsers" in error.message
        return
    if not token:
        return  # no token: the first page
    # Accepted: only a token in the form the server issues, naming an id to continue after.
    payload = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    assert payload["v"] == 1 and isinstance(payload["after"], int), payload
    assert all(user.id > payload["after"] for user in result)


def _check_stored(stack: Any, user: user_pb2.User, name: str, email: str) -> None:
    """The user as the server returned it, read back, and in the table: trimmed, byte for byte.
    Read back with the writer's token: another user's email needs users:read or users:write."""
    assert (user.name.encode(), user.email.encode()) == (name.encode(), email.encode())
    got = stack.users().GetUser(
        user_pb2.GetUserRequest(id=user.id), metadata=bearer(stack.writer_token), timeout=10
    )
    assert (got.user.name.encode(), got.user.email.encode()) == (name.encode(), email.encode())
    assert stack.sql("SELECT name, email FROM users WHERE id = %s", user.id) == [(name, email)]


def _unique_email() -> str:
    return f"{uuid.uuid4().hex[:16]}@example.com"


emails = st.one_of(
    hostile_text,
    st.builds(
        lambda before, local, after: f"{before}{local}{uuid.uuid4().hex[:8]}@example.org{after}",
        hostile_text,
        hostile_text,
        st.sampled_from(["", " ", "\t", "\x85", "\x00", "\x7f", "\x9f"]),
    ),
)


@PROPERTY_SETTINGS
@given(name=hostile_text, email=emails)
@example(name="Ada\x7f", email="ada@example.com")
@example(name="Ada\x80Lovelace", email="ada@example.com")
@example(name="Ada", email="ada\x9f@example.com")
@example(name="Ada", email="ad\x7fa@example.com")
def test_any_name_or_email_is_stored_exactly_or_invalid(stack: Any, name: str, email: str) -> None:
    writer = bearer(stack.writer_token)
    # Each property is judged apart: the other field is one that is surely valid and free.
    for field, request in (
        ("name", user_pb2.CreateUserRequest(name=name, email=_unique_email(), age=30)),
        ("email", user_pb2.CreateUserRequest(name="Fuzzed Email", email=email, age=30)),
    ):
        value = getattr(request, field)
        code, result = _call(stack.users().CreateUser, request, metadata=writer, timeout=10)
        assert code in (OK, INVALID, ALREADY_EXISTS), f"{code.name} for {field} {value!r}"
        if code == INVALID:
            assert rich_error(result).fields == [field]
        elif code == OK:
            assert not _has_control(value.strip()), f"{field} {value!r} was accepted"
            _check_stored(stack, result.user, request.name.strip(), request.email.strip())
        else:
            assert field == "email"
        if _has_control(value.strip()):
            assert code == INVALID, f"{field} {value!r} with a control character: {code.name}"


@PROPERTY_SETTINGS
@given(rows=st.lists(st.tuples(hostile_text, emails), min_size=1, max_size=6))
@example(rows=[("Ada\x9f", "c1.name@example.com"), ("Ada", "c1\x80email@example.com")])
@example(rows=[("\x7fDel", "del.name@example.com"), ("Ada", "del\x7f@example.com")])
def test_imported_rows_of_any_characters_are_stored_exactly_or_reported(
    stack: Any, rows: list[tuple[str, str]]
) -> None:
    requests = [user_pb2.CreateUserRequest(name=n, email=e, age=1) for n, e in rows]
    response = stack.users().ImportUsers(
        iter(requests), metadata=bearer(stack.writer_token), timeout=30
    )
    failed = {error.index: error for error in response.errors}
    assert (response.created_count + response.failed_count, len(failed)) == (
        len(rows),
        response.failed_count,
    )
    for index, (name, email) in enumerate(rows):
        if _has_control(name.strip()) or _has_control(email.strip()):
            assert failed[index].code == "INVALID_ARGUMENT", (name, email)
        if index in failed:
            assert failed[index].code in ("INVALID_ARGUMENT", "ALREADY_EXISTS"), failed[index]
            assert failed[index].message and failed[index].field
            continue
        stored = stack.sql("SELECT name FROM users WHERE lower(email) = lower(%s)", email.strip())
        assert stored == [(name.strip(),)], (name, email, stored)
