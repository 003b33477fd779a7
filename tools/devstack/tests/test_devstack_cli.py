"""`parley-devstack run`: the whole stack, started on free ports and torn down again."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from parley.devstack.ports import free_ports
from parley.devstack.stack import redact

DEVSTACK = Path(sys.executable).parent / "parley-devstack"

# Runs inside the stack: checks the variables it gets and that both services answer.
PROBE = """
import os, sys
import grpc, jwt
from grpc_health.v1 import health_pb2, health_pb2_grpc

env = os.environ
for name in ("PARLEY_USER_ADDR", "PARLEY_CHAT_ADDR"):
    host, port = env[name].split(":")
    assert host == "127.0.0.1" and port not in ("50051", "50052"), env[name]
for name in ("PARLEY_USER_METRICS_ADDR", "PARLEY_CHAT_METRICS_ADDR"):
    assert env[name].startswith("127.0.0.1:"), env[name]
assert env["PARLEY_DATABASE_URL"].startswith("postgresql://postgres@127.0.0.1:")
assert env["PARLEY_DATABASE_URL"].endswith("/parley")
options = {"audience": "parley", "issuer": "parley", "algorithms": ["HS256"]}
write = jwt.decode(env["PARLEY_TOKEN"], env["PARLEY_JWT_SECRET"], **options)
assert (write["sub"], write["scope"]) == ("1", "users:write"), write
readonly = jwt.decode(env["PARLEY_TOKEN_READONLY"], env["PARLEY_JWT_SECRET"], **options)
assert readonly["sub"] == "2" and not readonly.get("scope"), readonly
for name, service in (("PARLEY_USER_ADDR", "user.UserService"),
                      ("PARLEY_CHAT_ADDR", "chat.ChatService")):
    with grpc.insecure_channel(env[name]) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, (service, reply)
print(env["PARLEY_USER_ADDR"])
sys.exit(7)
"""


def test_ephemeral_runs_a_command_against_the_stack_and_cleans_up(
    clean_env: dict[str, str],
) -> None:
    result = subprocess.run(
        [str(DEVSTACK), "run", "--ephemeral", "--", sys.executable, "-c", PROBE],
        env=clean_env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 7, result.stderr
    port = int(result.stdout.strip().splitlines()[-1].rpartition(":")[2])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # the service is gone
    assert "stopping Postgres" in result.stderr


def test_a_busy_port_fails_the_start_with_one_line(
    data_dir: Path, clean_env: dict[str, str]
) -> None:
    postgres, redis, chat, user_metrics, chat_metrics = free_ports(5)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        user = busy.getsockname()[1]
        result = subprocess.run(
            [str(DEVSTACK), "run",
             "--postgres-port", str(postgres), "--redis-port", str(redis),
             "--user-port", str(user), "--chat-port", str(chat),
             "--user-metrics-port", str(user_metrics), "--chat-metrics-port", str(chat_metrics)],
            cwd=data_dir,
            env=clean_env,
            capture_output=True,
            text=True,
            timeout=30,
        )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"parley-devstack: error: port {user} for UserService is not available on 127.0.0.1 "
        "(Address already in use); stop what uses it or choose another with --user-port"
    ]
    assert list(data_dir.iterdir()) == []


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "postgresql://postgres@127.0.0.1:54329/parley",
            "postgresql://postgres@127.0.0.1:54329/parley",
        ),
        ("postgresql://app:s3cret@db:5432/parley", "postgresql://app:***@db:5432/parley"),
        ("redis://:pw@[::1]:6379/0", "redis://:***@[::1]:6379/0"),
        (
            "host=db user=app password=s3cret dbname=parley",
            "host=db user=app password=*** dbname=parley",
        ),
        ("host=db password='a b' dbname=parley", "host=db password=*** dbname=parley"),
    ],
)
def test_printed_urls_hide_passwords(url: str, shown: str) -> None:
    assert redact(url) == shown
