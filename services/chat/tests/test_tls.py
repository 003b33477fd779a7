"""ChatService calls a UserService that requires mutual TLS, with certificates made here:
a chat message still carries its sender's name. The SDK reaches a TLS server too."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest

from parley.chassis import ConfigError, Env
from parley.chat_service import ChatSettings
from parley.client import AsyncUserClient
from parley.client.errors import Unavailable
from parley.proto import user_pb2, user_pb2_grpc
from parley.proto.contract import USER_SERVICE
from parley.testing import bearer
from parley.testing.certificates import CertificateAuthority
from parley.testing.launcher import SERVING, chat_env, service_env
from parley.testing.stack import USER_DEPENDENCY, Person


async def health_port_serving(health: Any, wait_for: Any, port: int) -> None:
    """Waits until the plain-text health port reports UserService SERVING."""

    async def serving() -> bool:
        return await health(port, USER_SERVICE) == SERVING

    await wait_for(serving, 20, f"{USER_SERVICE} SERVING on the health port {port}")


async def test_chat_names_senders_through_a_mutual_tls_user_service(
    launcher: Any,
    database: str,
    redis_url: str,
    redis_prefix: str,
    chat: Any,
    wait_for: Any,
    health: Any,
    token: Any,
    tmp_path: Path,
) -> None:
    ca = CertificateAuthority(tmp_path, "parley")
    server, client = ca.server("user"), ca.client("chat")
    users = await launcher.app(
        "user",
        service_env(
            database,
            PARLEY_TLS_CERT_FILE=str(server.cert_file),
            PARLEY_TLS_KEY_FILE=str(server.key_file),
            PARLEY_TLS_CLIENT_CA_FILE=str(ca.cert_file),
            PARLEY_HEALTH_PORT="0",
        ),
        ready=False,
    )
    # The plain-text health port is what a kubelet probes.
    await health_port_serving(health, wait_for, users.app.health_port)

    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.cert, private_key=client.key, certificate_chain=client.cert
    )
    async with grpc.aio.secure_channel(users.target, credentials) as channel:
        reply = await user_pb2_grpc.UserServiceStub(channel).CreateUser(
            user_pb2.CreateUserRequest(
                name="Ada Lovelace", email=f"ada.{uuid.uuid4().hex[:6]}@example.com", age=36
            ),
            metadata=bearer(token("admin", scope="users:write")),
            timeout=10,
        )
    ada = Person(reply.user.id, reply.user.name, token(str(reply.user.id)))

    replica = await launcher.app(
        "chat",
        chat_env(
            database,
            redis_url,
            redis_prefix,
            f"localhost:{users.port}",
            PARLEY_USER_SERVICE_TLS_CA_FILE=str(ca.cert_file),
            PARLEY_USER_SERVICE_TLS_CERT_FILE=str(client.cert_file),
            PARLEY_USER_SERVICE_TLS_KEY_FILE=str(client.key_file),
        ),
    )
    await launcher.wait_ready(replica, name=USER_DEPENDENCY)

    sender = await chat(ada, replica, room="lobby", resume_after=0)
    await sender.send("over mutual TLS")
    await wait_for(lambda: sender.received, 10, "the message")
    (message,) = sender.received
    assert (message.user, message.user_id, message.text) == (
        "Ada Lovelace",
        ada.id,
        "over mutual TLS",
    )


async def test_the_sdk_talks_to_a_tls_user_service(
    launcher: Any, database: str, health: Any, wait_for: Any, token: Any, tmp_path: Path
) -> None:
    ca = CertificateAuthority(tmp_path, "parley")
    server = ca.server("user")
    users = await launcher.app(
        "user",
        service_env(
            database,
            PARLEY_TLS_CERT_FILE=str(server.cert_file),
            PARLEY_TLS_KEY_FILE=str(server.key_file),
            PARLEY_HEALTH_PORT="0",
        ),
        ready=False,
    )
    await health_port_serving(health, wait_for, users.app.health_port)
    trusted = grpc.ssl_channel_credentials(root_certificates=ca.cert)
    async with AsyncUserClient(
        f"localhost:{users.port}", tls=trusted, token=token("admin", scope="users:write")
    ) as client:
        created = await client.create_user(
            name="Grace Hopper", email=f"grace.{uuid.uuid4().hex[:6]}@example.com", age=40
        )
        assert (await client.get_user(created.id)).name == "Grace Hopper"
    # Plain text against the TLS port fails.
    async with AsyncUserClient(
        f"localhost:{users.port}", token=token("admin", scope="users:write")
    ) as plain:
        with pytest.raises(Unavailable):
            await plain.get_user(created.id)


@pytest.mark.parametrize(
    ("overrides", "variable"),
    [
        ({"PARLEY_USER_SERVICE_TLS_CERT_FILE": "/nowhere.crt"}, "PARLEY_USER_SERVICE_TLS_KEY_FILE"),
        ({"PARLEY_USER_SERVICE_TLS_KEY_FILE": "/nowhere.key"}, "PARLEY_USER_SERVICE_TLS_CERT_FILE"),
        ({"PARLEY_USER_SERVICE_TLS_CA_FILE": "/nowhere/ca.crt"}, "PARLEY_USER_SERVICE_TLS_CA_FILE"),
    ],
)
def test_bad_user_service_tls_settings_are_one_line_errors(
    overrides: dict[str, str], variable: str, redis_url: str
) -> None:
    env = chat_env("postgresql://p@127.0.0.1:1/p", redis_url, "p", "127.0.0.1:1")
    with pytest.raises(ConfigError) as error:
        ChatSettings.from_env(Env({**env, **overrides}))
    assert error.value.variable == variable
    assert "\n" not in str(error.value)
