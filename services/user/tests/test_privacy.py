"""Emails are private: another user's email only for a token with users:read or users:write.

A caller sees its own email (token subject == user id) and, with either scope, everyone's;
anyone else gets the User with `email` empty and every other field as stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import pytest

from parley.chassis import Identity
from parley.proto import user_pb2, user_pb2_grpc
from parley.proto.contract import NEXT_PAGE_TOKEN_KEY as TOKEN_KEY
from parley.user_service.privacy import redactor


@dataclass(frozen=True)
class Caller:
    """A token in the table: whose subject it has, its scopes, and whose emails it sees."""

    subject: str  # "target", "other", or a literal subject
    scope: str = ""
    scp: tuple[str, ...] | None = None
    sees_all: bool = False


CALLERS = {
    "self, no scopes": Caller("target"),
    "other user, no scopes": Caller("other"),
    "other user, users:read": Caller("other", "users:read", sees_all=True),
    "other user, users:write": Caller("other", "users:write", sees_all=True),
    "subject not a user id": Caller("service-bot"),
    # Beyond the required rows: the scp claim counts, other scopes do not, nor a missing user.
    "other user, users:read in scp": Caller("other", scp=("users:read",), sees_all=True),
    "other user, unrelated scope": Caller("other", "chat:read users:delete"),
    "subject an id no user has": Caller("2147483647"),
}


def without_email(user: user_pb2.User) -> user_pb2.User:
    copy = user_pb2.User()
    copy.CopyFrom(user)
    copy.ClearField("email")
    return copy


def as_seen(users: list[user_pb2.User], sees_all: bool, own_id: int | None):
    """`users` as a caller should see them: emails only where allowed."""
    return [u if sees_all or u.id == own_id else without_email(u) for u in users]


@pytest.fixture
async def people(stub, auth):
    """Three stored users: the one read, the other caller, and a bystander."""
    created = {}
    for key, name, age in (
        ("target", "Ada", 36),
        ("other", "Grace", 45),
        ("bystander", "Linus", 7),
    ):
        request = user_pb2.CreateUserRequest(name=name, email=f"{name}@example.com", age=age)
        created[key] = (await stub.CreateUser(request, metadata=auth)).user
    return created


def metadata_for(caller: Caller, people, token) -> tuple[list[tuple[str, str]], int | None]:
    """Call metadata for `caller`, and the user id its subject names (None: no user)."""
    if caller.subject in people:
        own_id = people[caller.subject].id
        subject = str(own_id)
    else:
        subject = caller.subject
        own_id = next((u.id for u in people.values() if str(u.id) == subject), None)
    claims = {} if caller.scp is None else {"scp": list(caller.scp)}
    return [("authorization", f"Bearer {token(sub=subject, scope=caller.scope, **claims)}")], own_id


@pytest.mark.parametrize("caller", CALLERS.values(), ids=CALLERS.keys())
async def test_get_user_shows_the_email_only_to_its_owner_or_a_scope(stub, people, token, caller):
    md, own_id = metadata_for(caller, people, token)
    target = people["target"]

    got = (await stub.GetUser(user_pb2.GetUserRequest(id=target.id), metadata=md)).user

    [expected] = as_seen([target], caller.sees_all, own_id)
    assert got == expected
    assert got.email == (target.email if caller.sees_all or caller.subject == "target" else "")


@pytest.mark.parametrize("caller", CALLERS.values(), ids=CALLERS.keys())
async def test_list_users_shows_emails_only_to_their_owner_or_a_scope(stub, people, token, caller):
    md, own_id = metadata_for(caller, people, token)
    stored = sorted(people.values(), key=lambda u: u.id)

    call = stub.ListUsers(user_pb2.ListUsersRequest(), metadata=md)
    listed = [u async for u in call]

    assert listed == as_seen(stored, caller.sees_all, own_id)
    assert [u.id for u in listed if u.email] == (
        [u.id for u in stored] if caller.sees_all else [u.id for u in stored if u.id == own_id]
    )
    assert dict(await call.trailing_metadata())[TOKEN_KEY] == ""


async def test_create_and_update_return_the_email_to_the_writer(stub, token):
    # The write scope needs no user behind the subject, and includes reading every email.
    md = [("authorization", f"Bearer {token(sub='importer', scope='users:write')}")]
    created = await stub.CreateUser(
        user_pb2.CreateUserRequest(name="Ada", email="ada@example.com", age=36), metadata=md
    )
    assert created.user.email == "ada@example.com"

    changed = created.user
    changed.email = "lovelace@example.com"
    updated = await stub.UpdateUser(user_pb2.UpdateUserRequest(user=changed), metadata=md)
    assert updated.user.email == "lovelace@example.com"


async def test_chunked_pages_are_redacted_with_no_extra_database_call(
    start_server, database, pg, bulk_insert, token, pool
):
    """A page longer than a chunk (100) keeps its chunks, trailer and query count."""
    # No health probe while the pool's request count is compared.
    server = await start_server(database, PARLEY_HEALTH_CHECK_INTERVAL="300")
    await bulk_insert(pg, 260)
    cur = await pg.execute("SELECT id FROM users ORDER BY id")
    ids = [row[0] for row in await cur.fetchall()]
    own_id = ids[149]  # in the second chunk
    reader = [("authorization", f"Bearer {token(sub=str(own_id), scope='')}")]
    writer = [("authorization", f"Bearer {token(sub='admin', scope='users:write')}")]

    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = user_pb2_grpc.UserServiceStub(channel)

        async def page(md, **request):
            before = pool(server)["requests"]
            call = stub.ListUsers(user_pb2.ListUsersRequest(**request), metadata=md)
            users = [u async for u in call]
            trailer = dict(await call.trailing_metadata())[TOKEN_KEY]
            return users, trailer, pool(server)["requests"] - before

        full, full_token, full_calls = await page(writer, page_size=250)
        seen, seen_token, seen_calls = await page(reader, page_size=250)
        rest, rest_token, _ = await page(reader, page_size=250, page_token=seen_token)

    assert [u.id for u in full] == ids[:250] and all(u.email for u in full)
    assert seen == as_seen(full, False, own_id)
    assert [u.id for u in seen if u.email] == [own_id]
    assert seen_token == full_token != ""
    # Chunks of 100, 100 and 50: one connection each, whoever asks.
    assert seen_calls == full_calls == 3
    assert [u.id for u in rest] == ids[250:] and not any(u.email for u in rest)
    assert rest_token == ""


async def test_a_subject_of_too_many_digits_for_an_id_sees_no_email(stub, people, token):
    # Past Python's 4,300-digit limit for int(); still just a subject that names no user.
    md = [("authorization", f"Bearer {token(sub='9' * 4400, scope='')}")]
    target = people["target"]

    got = (await stub.GetUser(user_pb2.GetUserRequest(id=target.id), metadata=md)).user
    listed = [u async for u in stub.ListUsers(user_pb2.ListUsersRequest(), metadata=md)]

    assert got == without_email(target)
    assert listed and not any(u.email for u in listed)


def test_the_redactor_clears_only_the_email_in_place():
    user = user_pb2.User(id=5, name="Ada", email="ada@example.com", age=36)
    user.create_time.seconds = 1

    assert redactor(Identity("5", frozenset()))(user).email == "ada@example.com"
    assert redactor(Identity("6", frozenset({"users:read"})))(user).email == "ada@example.com"
    redacted = redactor(Identity("6", frozenset({"chat:write"})))(user)

    assert redacted is user
    assert user == user_pb2.User(id=5, name="Ada", age=36, create_time={"seconds": 1})
