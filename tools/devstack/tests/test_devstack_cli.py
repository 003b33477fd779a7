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

# Runs inside the stack: checks the variables it gets and that every service answers.
PROBE = """
import os, re, sys
import grpc, jwt, psycopg, redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from parley.devstack.processes import wait_until
from parley.devstack.services import grpc_serving
from parley.chat_service.bus import room_channel

SERVING = health_pb2.HealthCheckResponse.SERVING
env = os.environ
grpc_addrs = ("PARLEY_USER_ADDR", "PARLEY_CHAT_ADDR", "PARLEY_CHAT2_ADDR")
metrics_addrs = ("PARLEY_USER_METRICS_ADDR", "PARLEY_CHAT_METRICS_ADDR",
                 "PARLEY_CHAT2_METRICS_ADDR")
for name in grpc_addrs + metrics_addrs:
    host, port = env[name].split(":")
    assert host == "127.0.0.1", env[name]
    assert port not in ("50051", "50052", "50053", "9101", "9102", "9103"), env[name]
assert len({env[name] for name in grpc_addrs + metrics_addrs}) == 6
assert env["PARLEY_DATABASE_URL"].startswith("postgresql://postgres@127.0.0.1:")
assert env["PARLEY_DATABASE_URL"].endswith("/parley")
prefix = env["PARLEY_REDIS_PREFIX"]
assert re.fullmatch("parley-e2e-[0-9a-f]{12}", prefix), prefix
options = {"audience": "parley", "issuer": "parley", "algorithms": ["HS256"]}
write = jwt.decode(env["PARLEY_TOKEN"], env["PARLEY_JWT_SECRET"], **options)
assert (write["sub"], write["scope"]) == ("1", "users:write"), write
readonly = jwt.decode(env["PARLEY_TOKEN_READONLY"], env["PARLEY_JWT_SECRET"], **options)
assert readonly["sub"] == "2" and not readonly.get("scope"), readonly

with psycopg.connect(env["PARLEY_DATABASE_URL"], connect_timeout=5) as conn:
    rows = conn.execute("SELECT DISTINCT component FROM parley_schema_migrations").fetchall()
assert sorted(rows) == [("chat",), ("user",)], rows

for name, service in (("PARLEY_USER_ADDR", "user.UserService"),
                      ("PARLEY_CHAT_ADDR", "chat.ChatService"),
                      ("PARLEY_CHAT2_ADDR", "chat.ChatService")):
    with grpc.insecure_channel(env[name]) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == SERVING, (name, service, reply)
        if service == "chat.ChatService":
            # The replica reaches the stack's UserService (a non-critical dependency).
            wait_until(lambda: grpc_serving(channel, "dependency/user-service"), timeout=20,
                       what=f"{name} to reach the UserService")

# The embedded Redis wants the password that the URL carries, and refuses anyone without it.
from urllib.parse import urlsplit
redis_parts = urlsplit(env["PARLEY_REDIS_URL"])
assert redis_parts.password and len(redis_parts.password) >= 32, "no Redis password"
with redis.Redis(host=redis_parts.hostname, port=redis_parts.port, socket_timeout=5) as anonymous:
    try:
        anonymous.ping()
        raise AssertionError("Redis answered a client without its password")
    except redis.AuthenticationError:
        pass

# Both replicas listen on the stack's Redis under the run's prefix: each subscribes to the
# probe channel (the empty room name) on every connection.
with redis.Redis.from_url(env["PARLEY_REDIS_URL"], socket_timeout=5) as client:
    probe = room_channel(prefix, "")
    wait_until(lambda: client.pubsub_numsub(probe) == [(probe.encode(), 2)],
               timeout=20, what="the chat replicas to subscribe under the prefix")
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
    # The service is gone: nothing listens on its port. (Binding the port instead would also
    # fail while its closed connections sit in TIME_WAIT, though nothing listens.)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    assert "stopping Postgres" in result.stderr


@pytest.mark.parametrize(
    ("busy_field", "what", "by_variable"),
    [
        ("user", "UserService", False),
        ("chat2", "ChatService 2", False),
        ("chat2_metrics", "ChatService 2 metrics", True),
    ],
)
def test_a_busy_port_fails_the_start_with_one_line(
    data_dir: Path, clean_env: dict[str, str], busy_field: str, what: str, by_variable: bool
) -> None:
    fields = ["postgres", "redis", "user", "chat", "chat2",
              "user_metrics", "chat_metrics", "chat2_metrics"]  # fmt: skip
    env = dict(clean_env)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        ports = dict(zip(fields, free_ports(len(fields)), strict=True))
        ports[busy_field] = busy.getsockname()[1]
        flags = []
        for field, port in ports.items():
            if field == busy_field and by_variable:
                env[f"PARLEY_DEVSTACK_{field.upper()}_PORT"] = str(port)
            else:
                flags += [f"--{field.replace('_', '-')}-port", str(port)]
        result = subprocess.run(
            [str(DEVSTACK), "run", *flags],
            cwd=data_dir,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
    flag = f"--{busy_field.replace('_', '-')}-port"
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"parley-devstack: error: port {ports[busy_field]} for {what} is not available on "
        f"127.0.0.1 (Address already in use); stop what uses it or choose another with {flag}"
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
