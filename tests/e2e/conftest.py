"""End-to-end tests: they talk to running Parley processes over gRPC and nothing else.

Where the processes are comes from the environment, set by `parley-devstack run --ephemeral`
(locally and in CI) or by hand against a cluster: PARLEY_USER_ADDR, the UserService's
host:port (without it the suite is skipped), and PARLEY_TOKEN and PARLEY_TOKEN_READONLY, bearer
tokens with the users:write scope and with none. What else a test module uses (the chat
replicas' addresses, PARLEY_JWT_SECRET, ...) its docstring says; without it its tests skip.

The tests assume nothing about existing data: each creates the users it needs, with unique
emails, and deletes them afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from parley.client.tokens import DEFAULT_AUDIENCE, DEFAULT_ISSUER, mint_token
from parley.devstack.errors import DevstackError
from parley.devstack.processes import wait_until
from parley.devstack.services import grpc_serving
from parley.proto import user_pb2, user_pb2_grpc
from parley.proto.contract import CHAT_SERVICE, USER_SERVICE
from parley.testing.tokens import bearer

E2E_DIR = Path(__file__).resolve().parent
NODE_DIR = E2E_DIR / "node"
# Every call in the suite has a deadline, so a stuck server fails a test instead of hanging it.
CALL_TIMEOUT = 10.0

Metadata = tuple[tuple[str, str], ...]
Users = user_pb2_grpc.UserServiceStub


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(
        reason="PARLEY_USER_ADDR is not set; the e2e suite needs running "
        "services (e.g. `parley-devstack run --ephemeral -- pytest tests/e2e`)"
    )
    for item in items:
        if E2E_DIR in item.path.resolve().parents:
            item.add_marker(pytest.mark.e2e)
            if not os.environ.get("PARLEY_USER_ADDR"):
                item.add_marker(skip)


def _setting(name: str, missing: str = "", *, skip: str = "") -> str:
    """Variable `name`; without it the test fails saying what it must be, or skips saying why."""
    value = os.environ.get(name, "").strip()
    if not value and skip:
        pytest.skip(f"{name} is not set; {skip}")
    if not value:  # (PARLEY_USER_ADDR is set, or the suite is skipped)
        pytest.fail(f"{name} must be set to {missing}", pytrace=False)
    return value


def _serving(variable: str, service: str, *, skip: str = "") -> str:
    """The host:port in `variable`, once `service` there reports SERVING on grpc.health.v1."""
    addr = _setting(variable, f"{service}'s host:port", skip=skip)
    what = f"{service} at {addr} to report SERVING (is it running and reachable?)"
    with grpc.insecure_channel(addr) as channel:
        try:
            wait_until(lambda: grpc_serving(channel, service), timeout=30, what=what)
            return addr
        except DevstackError as error:
            failure = str(error)
    pytest.fail(failure, pytrace=False)


@pytest.fixture(scope="session")
def user_addr() -> str:
    return _serving("PARLEY_USER_ADDR", USER_SERVICE)


@pytest.fixture(scope="session")
def token() -> str:
    return _setting("PARLEY_TOKEN", "a bearer token with the users:write scope")


@pytest.fixture(scope="session")
def readonly_token() -> str:
    return _setting("PARLEY_TOKEN_READONLY", "a bearer token without scopes")


@pytest.fixture(scope="session")
def auth(token: str) -> Metadata:  # may read and write users
    return tuple(bearer(token))


@pytest.fixture(scope="session")
def readonly_auth(readonly_token: str) -> Metadata:  # may only read users
    return tuple(bearer(readonly_token))


@pytest.fixture
def user_channel(user_addr: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(user_addr) as channel:
        yield channel


@pytest.fixture
def users(user_channel: grpc.Channel) -> Users:
    return user_pb2_grpc.UserServiceStub(user_channel)


@pytest.fixture
def new_email() -> Callable[[], str]:
    """A factory of emails that no other test, run or client has used."""
    return lambda: f"e2e-{uuid.uuid4().hex}@example.com"


@pytest.fixture
def created_ids(users: Users, auth: Metadata) -> Iterator[list[int]]:
    """Ids of users a test created; each is deleted after the test unless already gone."""
    ids: list[int] = []
    yield ids
    for user_id in ids:
        try:
            users.DeleteUser(
                user_pb2.DeleteUserRequest(id=user_id), metadata=auth, timeout=CALL_TIMEOUT
            )
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise


@pytest.fixture
def create_user(
    users: Users, auth: Metadata, new_email: Callable[[], str], created_ids: list[int]
) -> Callable[..., user_pb2.User]:
    """A factory: creates a user with a unique email over gRPC, deleted after the test."""

    def create(name: str = "E2E User", age: int = 30, email: str | None = None) -> user_pb2.User:
        request = user_pb2.CreateUserRequest(name=name, email=email or new_email(), age=age)
        user = users.CreateUser(request, metadata=auth, timeout=CALL_TIMEOUT).user
        created_ids.append(user.id)
        return user

    return create


@pytest.fixture(scope="session")
def chat_addr() -> str:
    return _serving("PARLEY_CHAT_ADDR", CHAT_SERVICE, skip="the ChatService is not checked")


@pytest.fixture(scope="session")
def chat2_addr() -> str:
    """A second ChatService replica sharing the first one's Postgres and Redis."""
    skip = "chat across two replicas is not checked"
    return _serving("PARLEY_CHAT2_ADDR", CHAT_SERVICE, skip=skip)


@pytest.fixture(scope="session")
def node_dir() -> Path:
    """The Node.js clients' folder, with their locked dependencies (`npm ci` when missing)."""
    npm = shutil.which("npm")
    if shutil.which("node") is None or npm is None:
        pytest.skip("node and npm must be on PATH to run the Node.js client")
    modules = NODE_DIR / "node_modules" / "@grpc"
    if not all((modules / p / "package.json").is_file() for p in ("grpc-js", "proto-loader")):
        # --ignore-scripts: the client needs no install-time build steps of its dependencies.
        command = [npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts", "--loglevel=error"]
        done = subprocess.run(command, cwd=NODE_DIR, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"npm ci failed in {NODE_DIR}:\n{done.stdout}{done.stderr}"
    return NODE_DIR


@pytest.fixture(scope="session")
def sign_token() -> Callable[..., str]:
    """`sign_token(subject, scope="")`: a token for `subject` as `parley token` makes them,
    signed with PARLEY_JWT_SECRET for the stack's PARLEY_JWT_ISSUER and PARLEY_JWT_AUDIENCE."""
    why = "the chat-message tests need it to sign a token for each user they create"
    secret = _setting("PARLEY_JWT_SECRET", skip=f"{why} (parley-devstack run exports it)")
    issuer = os.environ.get("PARLEY_JWT_ISSUER", "").strip() or DEFAULT_ISSUER
    audience = os.environ.get("PARLEY_JWT_AUDIENCE", "").strip() or DEFAULT_AUDIENCE
    return lambda subject, scope="": mint_token(
        secret, subject, scope.split(), ttl=600, issuer=issuer, audience=audience
    )
