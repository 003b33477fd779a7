"""Emails are private, as a client of the running stack sees it over gRPC.

Another user's email comes back only to a token with the users:read or users:write scope;
a token whose subject is the user's id sees that user's own email; anyone else gets the
User with `email` empty and every other field as stored. GetUser and ListUsers both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from parley.proto import user_pb2, user_pb2_grpc
from parley.proto.contract import NEXT_PAGE_TOKEN_KEY

CALL_TIMEOUT = 10.0
TOKEN_TTL = 600

Metadata = tuple[tuple[str, str], ...]
CreateUser = Callable[..., user_pb2.User]


@dataclass(frozen=True)
class Caller:
    """A token in the table: whose subject it has (a person of the test or a literal
    subject), its scopes, and whether it sees every email."""

    subject: str
    scope: str = ""
    sees_all: bool = False


CALLERS = {
    "self, no scopes": Caller("target"),
    "other user, no scopes": Caller("other"),
    "other user, users:read": Caller("other", "users:read", sees_all=True),
    "other user, users:write": Caller("other", "users:write", sees_all=True),
    "subject not a user id": Caller("e2e-privacy-service"),
}


@pytest.fixture(scope="module")
def sign(sign_token: Callable[..., str]) -> Callable[[str, str], str]:
    """`sign(subject, scope)`: a token signed with PARLEY_JWT_SECRET, like the suite's own."""
    return sign_token


@pytest.fixture
def people(create_user: CreateUser) -> dict[str, user_pb2.User]:
    """The user that is read, and another user who reads it; deleted after the test."""
    return {"target": create_user(name="Private Ada", age=36), "other": create_user(name="Grace")}


def _metadata(
    caller: Caller, people: dict[str, user_pb2.User], sign: Callable[[str, str], str]
) -> tuple[Metadata, int | None]:
    """Call metadata for `caller`, and the id of the user its subject names (None: none)."""
    person = people.get(caller.subject)
    subject = caller.subject if person is None else str(person.id)
    metadata = (("authorization", f"Bearer {sign(subject, caller.scope)}"),)
    return metadata, None if person is None else person.id


def _without_email(user: user_pb2.User) -> user_pb2.User:
    copy = user_pb2.User()
    copy.CopyFrom(user)
    copy.ClearField("email")
    return copy


def _list_everyone(users: user_pb2_grpc.UserServiceStub, metadata: Metadata) -> list[user_pb2.User]:
    """Every user, page after page until the next-page token is empty."""
    listed: list[user_pb2.User] = []
    page_token = ""
    while True:
        call = users.ListUsers(
            user_pb2.ListUsersRequest(page_size=1000, page_token=page_token),
            metadata=metadata,
            timeout=CALL_TIMEOUT,
        )
        listed.extend(call)
        trailers = dict(call.trailing_metadata() or ())
        assert NEXT_PAGE_TOKEN_KEY in trailers, f"ListUsers sent no {NEXT_PAGE_TOKEN_KEY}"
        next_token = trailers[NEXT_PAGE_TOKEN_KEY]
        if not next_token:
            return listed
        assert next_token != page_token, "the next-page token did not advance"
        page_token = str(next_token)


@pytest.mark.parametrize("caller", CALLERS.values(), ids=CALLERS.keys())
def test_get_user_shows_the_email_only_to_its_owner_or_a_scope(
    users: user_pb2_grpc.UserServiceStub,
    people: dict[str, user_pb2.User],
    sign: Callable[[str, str], str],
    caller: Caller,
) -> None:
    metadata, own_id = _metadata(caller, people, sign)
    target = people["target"]

    got = users.GetUser(
        user_pb2.GetUserRequest(id=target.id), metadata=metadata, timeout=CALL_TIMEOUT
    ).user

    if caller.sees_all or own_id == target.id:
        assert got == target
        assert got.email
    else:
        assert got.email == ""
        assert got == _without_email(target)


@pytest.mark.parametrize("caller", CALLERS.values(), ids=CALLERS.keys())
def test_list_users_shows_emails_only_to_their_owner_or_a_scope(
    users: user_pb2_grpc.UserServiceStub,
    people: dict[str, user_pb2.User],
    sign: Callable[[str, str], str],
    caller: Caller,
) -> None:
    metadata, own_id = _metadata(caller, people, sign)

    listed = _list_everyone(users, metadata)

    by_id = {u.id: u for u in listed}
    for person in people.values():
        assert person.id in by_id, f"user {person.id} of this test is not listed"
        seen = by_id[person.id]
        if caller.sees_all or own_id == person.id:
            assert seen == person
        else:
            assert seen == _without_email(person)
    if not caller.sees_all:
        # Whoever else the stack holds, no email but the caller's own comes back.
        assert [u.id for u in listed if u.email] == ([] if own_id is None else [own_id])


def test_a_token_with_no_scopes_reads_everything_but_other_users_emails(
    users: user_pb2_grpc.UserServiceStub,
    readonly_auth: Metadata,
    create_user: CreateUser,
) -> None:
    # PARLEY_TOKEN_READONLY, as the stack hands it out: no scopes, subject "2".
    target = create_user(name="Readonly Target")
    got = users.GetUser(
        user_pb2.GetUserRequest(id=target.id), metadata=readonly_auth, timeout=CALL_TIMEOUT
    ).user
    if target.id == 2:
        pytest.skip("the new user happens to be the read-only token's subject")
    assert got == _without_email(target)
