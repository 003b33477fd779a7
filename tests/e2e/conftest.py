"""End-to-end tests: they talk to running Parley processes over gRPC and nothing else.

Where the processes are comes from the environment (set by `parley-devstack run --ephemeral`
locally and in CI, or by hand against a cluster):

- PARLEY_USER_ADDR          host:port of the UserService (without it the suite is skipped)
- PARLEY_CHAT_ADDR          host:port of the ChatService (its tests skip without it)
- PARLEY_USER_METRICS_ADDR  host:port of the UserService's /metrics (its test skips without it)
- PARLEY_TOKEN              a bearer token with the `users:write` scope
- PARLEY_TOKEN_READONLY     a bearer token with no scopes
- PARLEY_CHAT2_ADDR         host:port of a second ChatService replica (its tests skip without it)
- PARLEY_JWT_SECRET         the HS256 secret the chat tests sign a token with for each user they
                            create (PARLEY_JWT_ISSUER and PARLEY_JWT_AUDIENCE default to `parley`)

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
from grpc_health.v1 import health_pb2, health_pb2_grpc

from parley.client.tokens import DEFAULT_AUDIENCE, DEFAULT_ISSUER, mint_token
from parley.proto import user_pb2, user_pb2_grpc

E2E_DIR = Path(__file__).resolve().parent
NODE_DIR = E2E_DIR / "node"
NPM_TIMEOUT = 300.0
READY_TIMEOUT = 30.0
# Every call in the suite has a deadline, so a stuck server fails a test instead of hanging it.
CALL_TIMEOUT = 10.0
# Lifetime of the tokens the suite signs for the users it creates.
TOKEN_TTL = 600

Metadata = tuple[tuple[str, str], ...]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(
        reason="PARLEY_USER_ADDR is not set; the e2e suite needs running services "
        "(for example `parley-devstack run --ephemeral -- pytest tests/e2e`)"
    )
    for item in items:
        if E2E_DIR in item.path.resolve().parents:
            item.add_marker(pytest.mark.e2e)
            if not os.environ.get("PARLEY_USER_ADDR"):
                item.add_marker(skip)


def _required(name: str, what: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        pytest.fail(f"{name} must be set to {what} when PARLEY_USER_ADDR is set", pytrace=False)
    return value


@pytest.fixture(scope="session")
def user_addr() -> str:
    return _required("PARLEY_USER_ADDR", "the UserService's host:port")


@pytest.fixture(scope="session")
def token() -> str:
    return _required("PARLEY_TOKEN", "a bearer token with the users:write scope")


@pytest.fixture(scope="session")
def readonly_token() -> str:
    return _required("PARLEY_TOKEN_READONLY", "a bearer token without scopes")


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture(scope="session")
def auth(token: str) -> Metadata:
    """Call metadata that may read and write users."""
    return bearer(token)


@pytest.fixture(scope="session")
def readonly_auth(readonly_token: str) -> Metadata:
    """Call metadata that may only read users."""
    return bearer(readonly_token)


def _wait_until_serving(addr: str, service: str) -> None:
    """Waits, by watching grpc.health.v1, until `service` at `addr` reports SERVING."""
    with grpc.insecure_channel(addr) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=READY_TIMEOUT)
        except grpc.FutureTimeoutError:
            pytest.fail(f"cannot connect to {service} at {addr}", pytrace=False)
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=service), timeout=READY_TIMEOUT
        )
        last = None
        try:
            for response in watch:
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError as error:
            pytest.fail(
                f"{service} at {addr} did not become SERVING within {READY_TIMEOUT:g}s "
                f"(last status {last}): {error.code().name} {error.details()}",
                pytrace=False,
            )
        finally:
            watch.cancel()


@pytest.fixture(scope="session")
def user_service_ready(user_addr: str) -> None:
    _wait_until_serving(user_addr, "user.UserService")


@pytest.fixture
def user_channel(user_addr: str, user_service_ready: None) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(user_addr) as channel:
        yield channel


@pytest.fixture
def users(user_channel: grpc.Channel) -> user_pb2_grpc.UserServiceStub:
    return user_pb2_grpc.UserServiceStub(user_channel)


@pytest.fixture
def new_email() -> Callable[[], str]:
    """A factory of emails that no other test, run or client has used."""
    return lambda: f"e2e-{uuid.uuid4().hex}@example.com"


@pytest.fixture
def created_ids(users: user_pb2_grpc.UserServiceStub, auth: Metadata) -> Iterator[list[int]]:
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
    users: user_pb2_grpc.UserServiceStub,
    auth: Metadata,
    new_email: Callable[[], str],
    created_ids: list[int],
) -> Callable[..., user_pb2.User]:
    """A factory: creates a user with a unique email over gRPC, deleted after the test."""

    def create(name: str = "E2E User", age: int = 30, email: str | None = None) -> user_pb2.User:
        response = users.CreateUser(
            user_pb2.CreateUserRequest(name=name, email=email or new_email(), age=age),
            metadata=auth,
            timeout=CALL_TIMEOUT,
        )
        created_ids.append(response.user.id)
        return response.user

    return create


@pytest.fixture(scope="session")
def chat_addr() -> str:
    addr = os.environ.get("PARLEY_CHAT_ADDR", "").strip()
    if not addr:
        pytest.skip("PARLEY_CHAT_ADDR is not set; the ChatService is not checked")
    _wait_until_serving(addr, "chat.ChatService")
    return addr


@pytest.fixture(scope="session")
def chat2_addr() -> str:
    """A second ChatService replica sharing the first one's Postgres and Redis."""
    addr = os.environ.get("PARLEY_CHAT2_ADDR", "").strip()
    if not addr:
        pytest.skip("PARLEY_CHAT2_ADDR is not set; chat across two replicas is not checked")
    _wait_until_serving(addr, "chat.ChatService")
    return addr


@pytest.fixture
def chat_channel(chat_addr: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(chat_addr) as channel:
        yield channel


@pytest.fixture(scope="session")
def node_dir() -> Path:
    """The Node.js clients' folder, with their locked dependencies installed by `npm ci` when
    missing."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm must be on PATH to run the Node.js client")
    installed = all(
        (NODE_DIR / "node_modules" / "@grpc" / package / "package.json").is_file()
        for package in ("grpc-js", "proto-loader")
    )
    if not installed:
        # --ignore-scripts: the client needs no install-time build steps of its dependencies.
        result = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts", "--loglevel=error"],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=NPM_TIMEOUT,
        )
        assert result.returncode == 0, (
            f"npm ci failed in {NODE_DIR}:\n{result.stdout}{result.stderr}"
        )
    return NODE_DIR


@pytest.fixture(scope="session")
def jwt_secret() -> str:
    secret = os.environ.get("PARLEY_JWT_SECRET", "").strip()
    if not secret:
        pytest.skip(
            "PARLEY_JWT_SECRET is not set; the chat-message tests need it to sign a token for "
            "each user they create (parley-devstack run exports it)"
        )
    return secret


@pytest.fixture(scope="session")
def sign_token(jwt_secret: str) -> Callable[..., str]:
    """`sign_token(subject, scope="")`: a token for `subject` signed with PARLEY_JWT_SECRET
    (and the stack's PARLEY_JWT_ISSUER and PARLEY_JWT_AUDIENCE), as `parley token` makes."""

    def sign(subject: str, scope: str = "") -> str:
        return mint_token(
            jwt_secret,
            subject,
            scope.split(),
            ttl=TOKEN_TTL,
            issuer=os.environ.get("PARLEY_JWT_ISSUER", "").strip() or DEFAULT_ISSUER,
            audience=os.environ.get("PARLEY_JWT_AUDIENCE", "").strip() or DEFAULT_AUDIENCE,
        )

    return sign
