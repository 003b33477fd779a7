"""Bearer-token authentication through a real server: HS256, RS256 with a PEM key or a JWKS."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from parley.chassis import AuthSettings, Env, Identity, current_identity, require_scope
from parley.chassis.errors import Unauthenticated
from parley.proto import user_pb2
from parley.testing.tokens import bearer

Token = Callable[..., str]


async def call_get_user(
    running: Any, metadata: list[tuple[str, str]] | None
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await running.stub.GetUser(user_pb2.GetUserRequest(id=1), metadata=metadata, timeout=5)
    return info.value


async def test_valid_token_reaches_the_handler_with_the_identity(server: Any, make_token: Token):
    token = make_token(sub="alice", scope="users:read users:write")
    response = await server.stub.GetUser(
        user_pb2.GetUserRequest(id=7), metadata=bearer(token), timeout=5
    )
    assert response.user.id == 7
    assert response.user.name == "alice"
    assert set(response.user.email.split()) == {"users:read", "users:write"}

    for scheme in ["bearer", "BEARER"]:
        response = await server.stub.GetUser(
            user_pb2.GetUserRequest(id=1),
            metadata=[("authorization", f"{scheme} {make_token(sub=scheme)}")],
            timeout=5,
        )
        assert response.user.name == scheme


def _with_signature_of(token: str, other: str) -> str:
    head, payload, _ = token.split(".")
    return ".".join([head, payload, other.split(".")[2]])


REJECTED_TOKENS: list[tuple[str, dict[str, Any], str]] = [
    ("forged signature", {"key": secrets.token_urlsafe(32)}, "signature"),
    ("expired beyond leeway", {"ttl": -120}, "expired"),
    ("nbf in the future", {"nbf": int(time.time()) + 3600}, "not valid yet"),
    ("wrong iss", {"iss": "someone-else"}, "iss"),
    ("wrong aud", {"aud": "chat"}, "aud"),
    ("missing exp", {"omit": ["exp"]}, "exp"),
    ("missing sub", {"omit": ["sub"]}, "sub"),
    ("missing iss", {"omit": ["iss"]}, "iss"),
    ("missing aud", {"omit": ["aud"]}, "aud"),
    ("empty sub", {"sub": ""}, "sub"),
    ("numeric sub", {"sub": 42}, "sub"),
]


async def test_rejected_calls_are_unauthenticated(
    server: Any, make_token: Token, subtests: pytest.Subtests
):
    metadata_cases: list[tuple[str, list[tuple[str, str]] | None, str]] = [
        ("no metadata", None, "missing authorization metadata"),
        ("other metadata only", [("x-request-id", "abc")], "missing authorization metadata"),
        ("Token scheme", [("authorization", "Token abc")], "malformed authorization"),
        ("Bearer alone", [("authorization", "Bearer")], "malformed authorization"),
        ("Bearer and spaces", [("authorization", "Bearer   ")], "malformed authorization"),
        ("Basic", [("authorization", "Basic dXNlcjpwYXNz")], "malformed authorization"),
        ("no scheme", [("authorization", "abc")], "malformed authorization"),
        (
            "two tokens",
            [*bearer(make_token(sub="1")), *bearer(make_token(sub="2"))],
            "2 authorization metadata entries",
        ),
        (
            "a good token and junk",
            [*bearer(make_token(sub="1")), ("authorization", "x")],
            "2 authorization metadata entries",
        ),
        ("not a JWT", bearer("not-a-jwt"), "invalid token"),
        ("three junk parts", bearer("a.b.c"), "invalid token"),
        (
            "swapped signature",
            bearer(_with_signature_of(make_token(sub="1"), make_token(sub="2"))),
            "signature",
        ),
        (
            "alg none",
            bearer(make_token(key=None, sub="1", algorithm="none", omit=["iat", "nbf", "exp"])),
            "invalid token",
        ),
    ]
    for name, claims, fragment in REJECTED_TOKENS:
        metadata_cases.append((name, bearer(make_token(**claims)), fragment))

    for name, metadata, fragment in metadata_cases:
        with subtests.test(name):
            error = await call_get_user(server, metadata)
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            assert fragment.lower() in error.details().lower()
    assert not server.servicer.entered.is_set()


async def test_leeway_issuer_and_audience_come_from_settings(serve: Any, make_token: Token):
    running = await serve(
        PARLEY_JWT_LEEWAY="60s",
        PARLEY_JWT_ISSUER="https://id.example",
        PARLEY_JWT_AUDIENCE="users",
    )

    def token(**claims: Any) -> str:
        return make_token(**{"iss": "https://id.example", "aud": "users", **claims})

    now = int(time.time())
    for accepted in [token(sub="x"), token(ttl=-20), token(nbf=now + 20)]:
        response = await running.stub.GetUser(
            user_pb2.GetUserRequest(id=1), metadata=bearer(accepted), timeout=5
        )
        assert response.user.id == 1
    for rejected, fragment in [
        (token(ttl=-90), "expired"),
        (token(nbf=now + 90), "not valid yet"),
        (make_token(aud="users"), "issuer"),
        (make_token(iss="https://id.example"), "audience"),
    ]:
        error = await call_get_user(running, bearer(rejected))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert fragment in error.details().lower()


async def test_require_scope(server: Any, make_token: Token):
    async def delete(request: Any, context: Any) -> Any:
        require_scope("users:write")
        return user_pb2.DeleteUserResponse()

    server.servicer.delete_user = delete
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await server.stub.DeleteUser(
            user_pb2.DeleteUserRequest(id=1),
            metadata=bearer(make_token(scope="users:read")),
            timeout=5,
        )
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "users:write" in info.value.details()

    await server.stub.DeleteUser(
        user_pb2.DeleteUserRequest(id=1),
        metadata=bearer(make_token(scope="users:read users:write")),
        timeout=5,
    )


async def test_identity_is_per_call(server: Any, make_token: Token):
    seen: list[Identity] = []

    async def record(request: Any, context: Any) -> Any:
        seen.append(current_identity())
        return user_pb2.GetUserResponse()

    server.servicer.get_user = record
    for subject in ["1", "2", "3"]:
        await server.stub.GetUser(
            user_pb2.GetUserRequest(id=1), metadata=bearer(make_token(sub=subject)), timeout=5
        )
    assert [i.subject for i in seen] == ["1", "2", "3"]
    assert seen[0].user_id == 1

    scp = make_token(omit=["scope"], scp=["users:write", "users:read", 3])
    await server.stub.GetUser(user_pb2.GetUserRequest(id=1), metadata=bearer(scp), timeout=5)
    assert seen[-1].scopes == frozenset({"users:write", "users:read"})


def test_current_identity_outside_a_call_is_unauthenticated():
    with pytest.raises(Unauthenticated):
        current_identity()


@pytest.mark.parametrize(
    ("subject", "user_id"),
    [("17", 17), ("alice", None), ("", None), ("\u00b2", None), ("-1", None)],
)
def test_identity_user_id(subject: str, user_id: int | None):
    assert Identity(subject=subject, scopes=frozenset()).user_id == user_id


async def test_health_and_reflection_need_no_token(server: Any):
    assert await server.health_status("") == health_pb2.HealthCheckResponse.SERVING
    assert await server.health_status("user.UserService") == health_pb2.HealthCheckResponse.SERVING

    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)

    async def requests() -> Any:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    services: set[str] = set()
    async for response in stub.ServerReflectionInfo(requests(), timeout=5):
        services.update(s.name for s in response.list_services_response.service)
    assert {"user.UserService", "grpc.health.v1.Health"} <= services


# --- RS256 -------------------------------------------------------------------------------


def _rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return _rsa_key()


@pytest.fixture(scope="module")
def other_key() -> rsa.RSAPrivateKey:
    return _rsa_key()


def _rs256_settings(tmp_path: Path, **files: str) -> AuthSettings:
    return AuthSettings.from_env(Env({"PARLEY_JWT_ALGORITHM": "RS256", **files}))


async def test_rs256_with_a_pem_public_key(
    serve: Any,
    tmp_path: Path,
    make_token: Token,
    signing_key: rsa.RSAPrivateKey,
    other_key: rsa.RSAPrivateKey,
):
    pem = tmp_path / "public.pem"
    pem.write_bytes(
        signing_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    running = await serve(auth=_rs256_settings(tmp_path, PARLEY_JWT_PUBLIC_KEY_FILE=str(pem)))

    good = make_token(key=signing_key, algorithm="RS256", sub="rsa-user")
    response = await running.stub.GetUser(
        user_pb2.GetUserRequest(id=1), metadata=bearer(good), timeout=5
    )
    assert response.user.name == "rsa-user"

    forged = make_token(key=other_key, algorithm="RS256")
    error = await call_get_user(running, bearer(forged))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "signature" in error.details().lower()

    hs256 = make_token()
    error = await call_get_user(running, bearer(hs256))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_rs256_with_a_jwks(
    serve: Any,
    tmp_path: Path,
    make_token: Token,
    signing_key: rsa.RSAPrivateKey,
    other_key: rsa.RSAPrivateKey,
):
    jwks = tmp_path / "jwks.json"
    keys = []
    for kid, key in [("current", signing_key), ("next", other_key)]:
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
        jwk.update(kid=kid, use="sig", alg="RS256")
        keys.append(jwk)
    jwks.write_text(json.dumps({"keys": keys}))
    running = await serve(auth=_rs256_settings(tmp_path, PARLEY_JWT_JWKS_FILE=str(jwks)))

    for kid, key in [("current", signing_key), ("next", other_key)]:
        token = make_token(key=key, algorithm="RS256", headers={"kid": kid}, sub=kid)
        response = await running.stub.GetUser(
            user_pb2.GetUserRequest(id=1), metadata=bearer(token), timeout=5
        )
        assert response.user.name == kid

    stranger = _rsa_key()
    cases = [
        (make_token(key=stranger, algorithm="RS256", headers={"kid": "current"}), "signature"),
        (make_token(key=other_key, algorithm="RS256", headers={"kid": "current"}), "signature"),
        (make_token(key=signing_key, algorithm="RS256", headers={"kid": "old"}), "'old'"),
        (make_token(key=signing_key, algorithm="RS256"), "kid"),
    ]
    for token, fragment in cases:
        error = await call_get_user(running, bearer(token))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert fragment.lower() in error.details().lower()


async def test_rs256_jwks_with_one_key_accepts_tokens_without_kid(
    serve: Any, tmp_path: Path, make_token: Token, signing_key: rsa.RSAPrivateKey
):
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(signing_key.public_key(), as_dict=True)
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk]}))
    running = await serve(auth=_rs256_settings(tmp_path, PARLEY_JWT_JWKS_FILE=str(jwks)))
    token = make_token(key=signing_key, algorithm="RS256", sub="solo")
    response = await running.stub.GetUser(
        user_pb2.GetUserRequest(id=1), metadata=bearer(token), timeout=5
    )
    assert response.user.name == "solo"
    error = await call_get_user(running, bearer(make_token(key=_rsa_key(), algorithm="RS256")))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
