"""TLS and mutual TLS on the gRPC port, with certificates made here: real handshakes on
real ports. Also the plain-text health-only port that Kubernetes probes use, and the
one-line errors of bad TLS settings."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from parley.chassis import ConfigError, Env, ServerSettings
from parley.proto import user_pb2, user_pb2_grpc
from parley.testing.certificates import CertificateAuthority, KeyPair
from parley.testing.launcher import run_to_exit


class Pki:
    def __init__(self, directory: Path) -> None:
        self.ca = CertificateAuthority(directory, "parley")
        self.server: KeyPair = self.ca.server()
        self.client: KeyPair = self.ca.client("chat")
        self.other_ca = CertificateAuthority(directory, "other")
        self.stranger: KeyPair = self.other_ca.client("stranger")

    def tls_env(self, *, mutual: bool = False) -> dict[str, str]:
        env = {
            "PARLEY_TLS_CERT_FILE": str(self.server.cert_file),
            "PARLEY_TLS_KEY_FILE": str(self.server.key_file),
        }
        if mutual:
            env["PARLEY_TLS_CLIENT_CA_FILE"] = str(self.ca.cert_file)
        return env


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pki]:
    yield Pki(tmp_path_factory.mktemp("pki"))


async def get_user(
    port: int,
    auth: list[tuple[str, str]],
    credentials: grpc.ChannelCredentials | None,
) -> user_pb2.GetUserResponse:
    target = f"127.0.0.1:{port}"
    channel = (
        grpc.aio.insecure_channel(target)
        if credentials is None
        else grpc.aio.secure_channel(target, credentials)
    )
    async with channel:
        reply: user_pb2.GetUserResponse = await user_pb2_grpc.UserServiceStub(channel).GetUser(
            user_pb2.GetUserRequest(id=7), metadata=auth, timeout=5
        )
        return reply


async def test_tls_server_answers_a_tls_client_and_refuses_plain_text(
    serve: Any, pki: Pki, auth: list[tuple[str, str]]
) -> None:
    running = await serve(**pki.tls_env())
    trusted = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert)
    reply = await get_user(running.app.port, auth, trusted)
    assert reply.user.id == 7

    with pytest.raises(grpc.aio.AioRpcError) as plain:
        await get_user(running.app.port, auth, None)
    assert plain.value.code() == grpc.StatusCode.UNAVAILABLE

    # A client that does not trust the server's CA refuses the server.
    with pytest.raises(grpc.aio.AioRpcError) as untrusted:
        await get_user(
            running.app.port,
            auth,
            grpc.ssl_channel_credentials(root_certificates=pki.other_ca.cert),
        )
    assert untrusted.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_needs_a_client_certificate_from_the_configured_ca(
    serve: Any, pki: Pki, auth: list[tuple[str, str]]
) -> None:
    running = await serve(**pki.tls_env(mutual=True))
    port = running.app.port

    good = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert,
        private_key=pki.client.key,
        certificate_chain=pki.client.cert,
    )
    assert (await get_user(port, auth, good)).user.id == 7

    no_certificate = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert)
    wrong_ca = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert,
        private_key=pki.stranger.key,
        certificate_chain=pki.stranger.cert,
    )
    for refused in (no_certificate, wrong_ca, None):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await get_user(port, auth, refused)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_health_port_is_plain_text_and_serves_only_health(
    serve: Any, pki: Pki, auth: list[tuple[str, str]]
) -> None:
    running = await serve(PARLEY_HEALTH_PORT="0", **pki.tls_env(mutual=True))
    assert running.app.health_port not in (0, running.app.port)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.app.health_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reply = await health.Check(
            health_pb2.HealthCheckRequest(service="user.UserService"), timeout=5
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # Nothing but health: the service itself is only on the TLS port.
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await user_pb2_grpc.UserServiceStub(channel).GetUser(
                user_pb2.GetUserRequest(id=7), metadata=auth, timeout=5
            )
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED

    # Draining shows on the health port too, so the kubelet sees NOT_SERVING.
    await running.app.health.enter_graceful_shutdown()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.app.health_port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="user.UserService"), timeout=5
        )
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


def settings(**values: str) -> ServerSettings:
    return ServerSettings.from_env(Env(values), default_port=0, default_metrics_port=0)


def test_no_tls_settings_mean_plain_text() -> None:
    plain = settings()
    assert plain.tls is None
    assert plain.health_port is None


def test_tls_settings_read_the_files(pki: Pki) -> None:
    tls = settings(**pki.tls_env(mutual=True)).tls
    assert tls is not None
    assert tls.cert == pki.server.cert
    assert tls.key == pki.server.key
    assert tls.client_ca == pki.ca.cert


@pytest.mark.parametrize(
    ("drop", "variable"),
    [
        ("PARLEY_TLS_KEY_FILE", "PARLEY_TLS_KEY_FILE"),
        ("PARLEY_TLS_CERT_FILE", "PARLEY_TLS_CERT_FILE"),
    ],
)
def test_cert_and_key_go_together(pki: Pki, drop: str, variable: str) -> None:
    env = pki.tls_env()
    del env[drop]
    with pytest.raises(ConfigError) as error:
        settings(**env)
    assert error.value.variable == variable


def test_a_client_ca_without_a_server_certificate_is_an_error(pki: Pki) -> None:
    with pytest.raises(ConfigError) as error:
        settings(PARLEY_TLS_CLIENT_CA_FILE=str(pki.ca.cert_file))
    assert error.value.variable == "PARLEY_TLS_CLIENT_CA_FILE"


def test_unreadable_or_non_pem_files_are_errors(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "missing.key"
    with pytest.raises(ConfigError) as error:
        settings(**{**pki.tls_env(), "PARLEY_TLS_KEY_FILE": str(missing)})
    assert error.value.variable == "PARLEY_TLS_KEY_FILE"
    assert str(missing) in str(error.value)
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError) as error:
        settings(**{**pki.tls_env(), "PARLEY_TLS_CERT_FILE": str(garbage)})
    assert error.value.variable == "PARLEY_TLS_CERT_FILE"


def test_serve_with_an_unreadable_key_exits_with_one_line(pki: Pki, tmp_path: Path) -> None:
    result = run_to_exit(
        "user",
        {
            "PARLEY_DATABASE_URL": "postgresql://parley@127.0.0.1:1/parley",
            "PARLEY_JWT_SECRET": os.urandom(32).hex(),
            "PARLEY_GRPC_HOST": "127.0.0.1",
            "PARLEY_GRPC_PORT": "0",
            "PARLEY_METRICS_HOST": "127.0.0.1",
            "PARLEY_METRICS_PORT": "0",
            "PARLEY_TLS_CERT_FILE": str(pki.server.cert_file),
            "PARLEY_TLS_KEY_FILE": str(tmp_path / "no-such.key"),
        },
    )
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "PARLEY_TLS_KEY_FILE" in lines[0]
    assert "Traceback" not in result.stderr
