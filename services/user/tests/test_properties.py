"""Property-based: hostile input to every RPC never breaks the service or its data.

A hypothesis state machine drives a real `parley-user serve` process over gRPC with random
and hostile values. After every call it checks the status code against a model of the
users that the test keeps; after every step it checks the database (read with psycopg)
against that model and against the validation rules.
"""

from __future__ import annotations

import base64
import json
import unicodedata
from collections.abc import Callable
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf import field_mask_pb2
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from parley.proto import user_pb2, user_pb2_grpc
from parley.testing.launcher import service_env
from parley.user_service.paging import NEXT_PAGE_TOKEN_KEY
from parley.user_service.validation import age_problem, email_problem, name_problem

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS
DOCUMENTED = {OK, INVALID, NOT_FOUND, ALREADY_EXISTS}
FIELDS = ("name", "email", "age")
RULES = {"name": name_problem, "email": email_problem, "age": age_problem}

# --- Strategies ------------------------------------------------------------------------------


def mostly(good: st.SearchStrategy[Any], other: st.SearchStrategy[Any], odds: int = 3):
    """`good` about `odds` times as often as `other`."""
    return st.sampled_from(range(odds + 1)).flatmap(lambda k: other if k == 0 else good)


def padded(strategy: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Values that are valid once trimmed, often with white space around them."""
    padding = st.sampled_from(["", "", "", " ", "  ", "\t", "\u3000", "\n"])
    return st.builds(lambda before, text, after: before + text + after, padding, strategy, padding)


INT32 = st.integers(-(2**31), 2**31 - 1)
ids = st.one_of(INT32, st.integers(-1, 40))

any_char = st.characters(codec="utf-8")  # every code point protobuf can carry: no surrogates
# C0 and C1 controls and DEL (category Cc), besides a few troublemakers picked by hand.
control_char = st.characters(categories=["Cc"])
hostile_char = st.one_of(
    control_char,
    st.sampled_from(
        ["\x00", "\x07", "\x1b", "\x7f", "\x85", "\u2028", "\u200b", "\ufeff", "\t", "\n", " ", "@"]
    ),
)
small_text = st.text(st.one_of(any_char, hostile_char), max_size=30)
huge_text = st.builds(lambda part, times: part * times, small_text, st.integers(50, 200))
any_text = st.one_of(small_text, huge_text)

name_char = st.characters(codec="utf-8", categories=["L", "M", "N", "P", "Zs"])
good_name = padded(st.text(name_char, min_size=1, max_size=100).filter(lambda s: s.strip() == s))
names = mostly(good_name, st.one_of(any_text, st.sampled_from([" Ada ", "", " ", "x" * 101])))

label = st.text(st.characters(codec="utf-8", categories=["L", "N"]), min_size=1, max_size=12)
good_email = padded(st.builds("{}@{}.{}".format, label, label, label))
# A few fixed addresses in several cases, so that clashes are frequent.
clashing_email = st.sampled_from(
    [
        "ada@example.com",
        "ADA@Example.com",
        " ada@example.com ",
        "Äda@example.com",
        "äda@example.com",
        "bob@example.org",
        "BOB@EXAMPLE.ORG",
    ]
)
emails = mostly(st.one_of(good_email, clashing_email), any_text)

good_age = st.integers(0, 150)
ages = mostly(good_age, st.one_of(INT32, st.sampled_from([-1, 151, -(2**31), 2**31 - 1])))

mask_paths = mostly(
    st.lists(st.sampled_from(FIELDS), max_size=3),
    st.lists(
        st.one_of(
            st.sampled_from([*FIELDS, "id", "create_time", "update_time", "", "user.name", "NAME"]),
            small_text,
        ),
        max_size=4,
    ),
)
pages = mostly(st.integers(0, 4), st.one_of(st.integers(-2, 5), INT32))
page_sizes = mostly(st.integers(0, 6), st.one_of(st.integers(-2, 6), INT32))
token_text = st.text(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=", max_size=40
)


def _forged(version: int, after: Any, compact: bool) -> tuple[str, Any]:
    """A token made by the client, not by the server: base64 JSON with any content, paired with
    the id it continues after when it is exactly what the server issues (else None)."""
    separators = (",", ":") if compact else None
    payload = json.dumps({"v": version, "after": after}, separators=separators).encode()
    genuine = (
        compact
        and version == 1
        and isinstance(after, int)
        and not isinstance(after, bool)
        and 0 <= after < 2**31
    )
    return _b64url(payload), after if genuine else None


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


forged_tokens = st.builds(
    _forged,
    st.sampled_from([1, 1, 2]),
    st.one_of(INT32, st.integers(-1, 40), any_text),
    st.booleans(),
)
# Tokens that no server issued: any text, any bytes in base64, JSON nested 10,000 deep.
garbage_tokens = st.one_of(
    st.text(),
    token_text,
    st.binary(max_size=64).map(_b64url),
    st.integers(1, 10_000).map(lambda depth: _b64url(_nested(depth))),
    st.integers(1, 2_000).map(lambda depth: _b64url(b'{"v":1,"after":' + _nested(depth) + b"}")),
)

# --- Expected behaviour, from the documented rules -------------------------------------------


def create_problems(name: str, email: str, age: int) -> list[str]:
    return [
        field
        for field, value in zip(FIELDS, (name, email, age), strict=True)
        if RULES[field](value)
    ]


def stored_row_problems(name: str, email: str, age: int) -> list[str]:
    """What is wrong with a stored row, checked without the service's code."""
    problems = []
    if name != name.strip() or not 1 <= len(name) <= 100:
        problems.append(f"name {name!r} is untrimmed or has a bad length")
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in name + email):
        problems.append(f"control characters in {name!r} or {email!r}")
    local, _, domain = email.partition("@")
    labels = domain.split(".")
    if (
        email != email.strip()
        or len(email) > 254
        or not local
        or "@" in domain
        or len(labels) < 2
        or not all(labels)
        or any(c.isspace() for c in email)
    ):
        problems.append(f"email {email!r} is not a trimmed address")
    if not 0 <= age <= 150:
        problems.append(f"age {age} is out of range")
    return problems


def call(rpc: str, fn: Callable[[], Any]) -> tuple[grpc.StatusCode, Any]:
    """The status code and the response (or error) of a sync gRPC call."""
    try:
        code, result = OK, fn()
    except grpc.RpcError as error:
        code, result = error.code(), error  # type: ignore[attr-defined]
    if code not in DOCUMENTED:
        pytest.fail(f"{rpc}: undocumented status {code.name}: {result.details()!r}")
    return code, result


class UserServiceMachine(RuleBasedStateMachine):
    """Set `port`, `database`, `token` and `details` on a subclass before running it."""

    port: int
    database: str
    token: str
    details: Callable[[grpc.RpcError], Any]

    users = Bundle("users")
    page_tokens = Bundle("page_tokens")

    def __init__(self) -> None:
        super().__init__()
        self.model: dict[int, tuple[str, str, int]] = {}
        self.max_id = 0
        self._lower: dict[str, str] = {}

    @initialize()
    def connect(self) -> None:
        self.db = psycopg.connect(self.database, autocommit=True)
        self.db.execute("TRUNCATE users RESTART IDENTITY")
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = user_pb2_grpc.UserServiceStub(self.channel)
        self.auth = (("authorization", f"Bearer {self.token}"),)

    def teardown(self) -> None:
        if hasattr(self, "db"):
            self.channel.close()
            self.db.close()

    # -- model helpers

    def lower(self, email: str) -> str:
        """Postgres' lower(), which the unique index on emails uses."""
        if email not in self._lower:
            row = self.db.execute("SELECT lower(%s)", (email,)).fetchone()
            assert row is not None
            self._lower[email] = row[0]
        return self._lower[email]

    def email_owner(self, email: str) -> int | None:
        key = self.lower(email.strip())
        owners = [i for i, (_, stored, _) in self.model.items() if self.lower(stored) == key]
        return owners[0] if owners else None

    def expect(self, code: grpc.StatusCode, result: Any, expected: grpc.StatusCode) -> None:
        detail = "" if code == OK else result.details()
        assert code == expected, f"expected {expected.name}, got {code.name}: {detail!r}"

    def expect_invalid(self, code: grpc.StatusCode, result: Any, fields: list[str]) -> None:
        self.expect(code, result, INVALID)
        assert sorted(self.details(result).fields) == sorted(fields)

    # -- rules

    @rule(target=users, name=good_name, email=st.one_of(good_email, clashing_email), age=good_age)
    def create_valid_user(self, name: str, email: str, age: int):
        return self.create_user(name, email, age)

    @rule(target=users, name=names, email=emails, age=ages)
    def create_user(self, name: str, email: str, age: int):
        request = user_pb2.CreateUserRequest(name=name, email=email, age=age)
        code, result = call(
            "CreateUser", lambda: self.stub.CreateUser(request, metadata=self.auth, timeout=10)
        )
        problems = create_problems(name, email, age)
        if problems:
            self.expect_invalid(code, result, problems)
            return multiple()
        if self.email_owner(email) is not None:
            self.expect(code, result, ALREADY_EXISTS)
            return multiple()
        self.expect(code, result, OK)
        user = result.user
        assert result.success
        assert (user.name, user.email, user.age) == (name.strip(), email.strip(), age)
        assert user.id > self.max_id
        self.max_id = user.id
        self.model[user.id] = (user.name, user.email, user.age)
        return user.id

    @rule(user_id=st.one_of(users, users, users, ids))
    def get_user(self, user_id: int) -> None:
        request = user_pb2.GetUserRequest(id=user_id)
        code, result = call(
            "GetUser", lambda: self.stub.GetUser(request, metadata=self.auth, timeout=10)
        )
        if user_id <= 0:
            self.expect_invalid(code, result, ["id"])
        elif user_id not in self.model:
            self.expect(code, result, NOT_FOUND)
        else:
            self.expect(code, result, OK)
            user = result.user
            assert (user.id, user.name, user.email, user.age) == (user_id, *self.model[user_id])

    @rule(user_id=st.one_of(consumes(users), consumes(users), ids))
    def delete_user(self, user_id: int) -> None:
        request = user_pb2.DeleteUserRequest(id=user_id)
        code, result = call(
            "DeleteUser", lambda: self.stub.DeleteUser(request, metadata=self.auth, timeout=10)
        )
        if user_id <= 0:
            self.expect_invalid(code, result, ["id"])
        elif user_id not in self.model:
            self.expect(code, result, NOT_FOUND)
        else:
            self.expect(code, result, OK)
            del self.model[user_id]

    @rule(
        user_id=users,
        name=good_name,
        email=st.one_of(good_email, clashing_email),
        age=good_age,
        paths=st.lists(st.sampled_from(FIELDS), max_size=3),
        set_fields=st.sets(st.sampled_from(FIELDS)),
    )
    def update_valid_user(self, user_id, name, email, age, paths, set_fields) -> None:
        self.update_user(user_id, name, email, age, paths, set_fields)

    @rule(
        user_id=st.one_of(users, users, users, ids),
        name=names,
        email=emails,
        age=ages,
        paths=mask_paths,
        set_fields=mostly(st.just(set(FIELDS)), st.sets(st.sampled_from(FIELDS)), odds=1),
    )
    def update_user(self, user_id, name, email, age, paths, set_fields) -> None:
        values = {"name": name, "email": email, "age": age}
        user = user_pb2.User(id=user_id, **{f: values[f] for f in set_fields})
        request = user_pb2.UpdateUserRequest(
            user=user, update_mask=field_mask_pb2.FieldMask(paths=paths)
        )
        code, result = call(
            "UpdateUser", lambda: self.stub.UpdateUser(request, metadata=self.auth, timeout=10)
        )

        problems = ["user.id"] if user_id <= 0 else []
        if any(p not in FIELDS for p in paths):
            problems.append("update_mask")
        # AIP-134: an empty mask means the fields set to a non-default value.
        chosen = [f for f in FIELDS if (f in paths if paths else getattr(user, f))]
        if not paths and not chosen:
            problems.append("update_mask")
        problems += [f"user.{f}" for f in chosen if RULES[f](getattr(user, f))]
        if problems:
            self.expect_invalid(code, result, problems)
            return
        if user_id not in self.model:
            self.expect(code, result, NOT_FOUND)
            return
        if "email" in chosen and self.email_owner(user.email) not in (None, user_id):
            self.expect(code, result, ALREADY_EXISTS)
            return
        self.expect(code, result, OK)
        before = dict(zip(FIELDS, self.model[user_id], strict=True))
        new = {f: getattr(user, f) for f in chosen}
        after = tuple(
            (new[f].strip() if f != "age" else new[f]) if f in new else before[f] for f in FIELDS
        )
        got = result.user
        assert (got.id, got.name, got.email, got.age) == (user_id, *after)
        self.model[user_id] = after  # type: ignore[assignment]

    @rule(
        target=page_tokens,
        page=pages,
        page_size=page_sizes,
        token=st.one_of(
            page_tokens, page_tokens, forged_tokens, mostly(st.just(""), garbage_tokens)
        ),
    )
    def list_users(self, page: int, page_size: int, token: str | tuple[str, Any]):
        # Tokens from the server, and forged ones in its exact form, come with the id they
        # continue after; other forged ones and random text with None.
        token, after = token if isinstance(token, tuple) else (token, None)
        request = user_pb2.ListUsersRequest(page=page, page_size=page_size, page_token=token)

        def read_page():
            stream = self.stub.ListUsers(request, metadata=self.auth, timeout=10)
            users = list(stream)
            return users, dict(stream.trailing_metadata())[NEXT_PAGE_TOKEN_KEY]

        code, result = call("ListUsers", read_page)
        negative = [f for f, v in (("page", page), ("page_size", page_size)) if v < 0]
        if negative:
            self.expect_invalid(code, result, negative)
            return multiple()
        if token and after is None:
            # Random text, or a forged token not in the server's form: never INTERNAL.
            self.expect_invalid(code, result, ["page_token"])
            return multiple()
        self.expect(code, result, OK)

        users, next_token = result
        size = 50 if page_size == 0 else min(page_size, 1000)
        known = sorted(self.model)
        rest = [i for i in known if i > after] if token else known[(max(page, 1) - 1) * size :]
        assert [u.id for u in users] == rest[:size]
        for user in users:
            assert (user.name, user.email, user.age) == self.model[user.id]
        assert (next_token != "") == (len(rest) > size)
        return (next_token, users[-1].id) if next_token else multiple()

    @rule(rows=st.lists(st.tuples(names, st.one_of(clashing_email, emails), ages), max_size=12))
    def import_users(self, rows: list[tuple[str, str, int]]) -> None:
        requests = [user_pb2.CreateUserRequest(name=n, email=e, age=a) for n, e, a in rows]
        code, result = call(
            "ImportUsers",
            lambda: self.stub.ImportUsers(iter(requests), metadata=self.auth, timeout=10),
        )
        self.expect(code, result, OK)

        taken = {self.lower(email) for _, email, _ in self.model.values()}
        created, errors = [], []
        for index, (name, email, age) in enumerate(rows):
            problems = create_problems(name, email, age)
            if problems:
                errors.append((index, "INVALID_ARGUMENT", ",".join(problems)))
            elif self.lower(email.strip()) in taken:
                errors.append((index, "ALREADY_EXISTS", "email"))
            else:
                taken.add(self.lower(email.strip()))
                created.append((name.strip(), email.strip(), age))
        assert (result.created_count, result.failed_count) == (len(created), len(errors))
        assert [(e.index, e.code, e.field) for e in result.errors] == errors

        new_rows = self.db.execute(
            "SELECT id, name, email, age FROM users WHERE id > %s ORDER BY id", (self.max_id,)
        ).fetchall()
        assert [tuple(r[1:]) for r in new_rows] == created
        for user_id, *values in new_rows:
            self.model[user_id] = tuple(values)  # type: ignore[assignment]
            self.max_id = user_id

    # -- what must hold after every step

    @invariant()
    def database_matches_the_model(self) -> None:
        if not hasattr(self, "db"):
            return
        rows = self.db.execute("SELECT id, name, email, age FROM users ORDER BY id").fetchall()
        assert {r[0]: tuple(r[1:]) for r in rows} == self.model
        for _, name, email, age in rows:
            assert stored_row_problems(name, email, age) == []
        emails = [self.lower(email) for _, _, email, _ in rows]
        assert len(emails) == len(set(emails)), "two users share an email, ignoring case"


# Shrinking a failure replays many calls; give it time (a passing run takes ~20 s).
@pytest.mark.timeout(600)
def test_hostile_input_never_breaks_the_service(database, launcher, token, details):
    server = launcher.process_sync("user", service_env(database))

    class Machine(UserServiceMachine):
        pass

    Machine.port = server.port
    Machine.database = database
    Machine.token = token("1", "users:write")
    Machine.details = staticmethod(details)  # type: ignore[assignment]

    run_state_machine_as_test(
        Machine,
        settings=settings(
            max_examples=100,
            stateful_step_count=25,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate, Phase.shrink],
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
    log = server.log_text()
    assert "unhandled error" not in log, log
    assert "Traceback" not in log, log
