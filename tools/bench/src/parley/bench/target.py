"""What the benchmarks run against: a stack started for the run, or a running one by address.

A started stack is the `make run` stack (parley.devstack): UserService and two ChatService
replicas as processes, on free loopback ports, against the machine's Postgres in a database of
its own (dropped afterwards) and the machine's Redis under a key prefix of its own.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg

from parley.devstack.stack import Endpoints, Stack, StackConfig

__all__ = ["ADMIN_URL", "REDIS_URL", "Target", "private_database", "started_stack"]

ADMIN_URL = os.environ.get(
    "PARLEY_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("PARLEY_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")

# Variables of the caller's shell that would change what the started stack does.
_DROPPED = ("PARLEY_TOKEN", "PARLEY_USER_ADDR", "PARLEY_CHAT_ADDR", "PARLEY_REDIS_PREFIX")


@dataclass
class Target:
    """Where the services are and how to call them."""

    user: str
    chats: tuple[str, str]
    endpoints: Endpoints | None = None  # only for a stack this run started
    stack: Stack | None = None
    fixed_token: str | None = None
    environ: dict[str, str] | None = None  # the started stack's service environment

    def token(self, subject: str, scopes: tuple[str, ...] = ()) -> str:
        if self.endpoints is not None:
            return self.endpoints.token(subject, scopes)
        assert self.fixed_token is not None
        return self.fixed_token

    @property
    def started(self) -> bool:
        return self.stack is not None

    def chat_pid(self, index: int) -> int | None:
        """The process id of a started stack's chat replica (0 or 1)."""
        if self.stack is None:
            return None
        chats = [s for s in self.stack.services if s.spec.script == "parley-chat"]
        return chats[index].process.pid

    def chat_metrics(self, index: int) -> str | None:
        if self.endpoints is None:
            return None
        return (self.endpoints.chat_metrics, self.endpoints.chat2_metrics)[index]


def _database_url(name: str) -> str:
    params = psycopg.conninfo.conninfo_to_dict(ADMIN_URL)
    params["dbname"] = name
    return psycopg.conninfo.make_conninfo("", **params)


@contextmanager
def private_database() -> Iterator[str]:
    """A new, empty database on the machine's Postgres, dropped on exit."""
    name = f"parley_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _database_url(name)
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def started_stack() -> Iterator[Target]:
    """UserService and two chat replicas, started for this run and stopped afterwards."""
    data_dir = Path(tempfile.mkdtemp(prefix="parley-bench-"))
    try:
        with private_database() as database_url:
            # Tracing stays off in every row but the tracing section's, which sets OTEL_* itself.
            environ = {
                k: v
                for k, v in os.environ.items()
                if k not in _DROPPED and not k.startswith("OTEL_")
            }
            environ.update(
                PARLEY_DATABASE_URL=database_url,
                PARLEY_REDIS_URL=REDIS_URL,
                PARLEY_LOG_LEVEL="WARNING",
                # Senders here are machines, and the listeners share one user (and, through
                # grpc's shared subchannels, one connection): lift chat's per-user rate and
                # stream limits, the rooms one user may make, and the per-connection call limit.
                # The idle row holds 10,000 streams (the default PARLEY_MAX_STREAMS) and a
                # sender on one replica.
                PARLEY_CHAT_RATE_LIMIT="100000",
                PARLEY_CHAT_RATE_BURST="100000",
                PARLEY_CHAT_MAX_STREAMS_PER_USER="100000",
                PARLEY_CHAT_MAX_ROOMS_PER_USER="100000",
                PARLEY_MAX_STREAMS_PER_CONNECTION="100000",
                PARLEY_MAX_STREAMS="100000",
                # No history retention on these replicas: the retention row starts a sweeping
                # replica of its own, and no other sweep may run during its baseline.
                PARLEY_CHAT_RETENTION_MAX_AGE="0",
                PARLEY_CHAT_RETENTION_MAX_MESSAGES="0",
            )
            stack = Stack(StackConfig.throwaway(data_dir, environ))
            try:
                endpoints = stack.start()
                service_env = dict(environ)
                service_env.update(
                    PARLEY_JWT_SECRET=endpoints.jwt_secret,
                    PARLEY_REDIS_PREFIX=endpoints.redis_prefix or "",
                    PARLEY_USER_SERVICE_ADDR=f"dns:///{endpoints.user}",
                    PARLEY_GRPC_HOST="127.0.0.1",
                    PARLEY_METRICS_HOST="127.0.0.1",
                )
                yield Target(
                    user=endpoints.user,
                    chats=(endpoints.chat, endpoints.chat2),
                    endpoints=endpoints,
                    stack=stack,
                    environ=service_env,
                )
            finally:
                stack.stop()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
