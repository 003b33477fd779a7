"""The whole local stack: what it starts, in which order, and how it stops."""

from __future__ import annotations

import logging
import re
import secrets
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from parley.devstack.credentials import (
    REDIS_PASSWORD_FILE_NAME,
    SECRET_FILE_NAME,
    load_or_create_secret,
    mint_token,
)
from parley.devstack.errors import DevstackError
from parley.devstack.ports import LOOPBACK, check_free, free_ports
from parley.devstack.postgres import EmbeddedPostgres
from parley.devstack.processes import Process, stop_all, unprivileged_user
from parley.devstack.redis import EmbeddedRedis
from parley.devstack.services import Service, ServiceSpec, migrate
from parley.proto.contract import CHAT_SERVICE, USER_SERVICE

__all__ = [
    "DATABASE",
    "DEFAULT_PORTS",
    "MIGRATING_SCRIPTS",
    "Endpoints",
    "Ports",
    "Stack",
    "StackConfig",
    "redact",
    "unique_redis_prefix",
]

_log = logging.getLogger("parley.devstack")

DATABASE = "parley"

# The services that own a part of the schema, migrated in this order before any of them starts.
MIGRATING_SCRIPTS = ("parley-user", "parley-chat")

CHAT_HEALTH_NAME = CHAT_SERVICE

_KEYWORD_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)")


@dataclass(frozen=True)
class Ports:
    """Every TCP port the stack listens on."""

    postgres: int
    redis: int
    user: int
    chat: int
    chat2: int
    user_metrics: int
    chat_metrics: int
    chat2_metrics: int


DEFAULT_PORTS = Ports(
    postgres=54329,
    redis=63790,
    user=50051,
    chat=50052,
    chat2=50053,
    user_metrics=9101,
    chat_metrics=9102,
    chat2_metrics=9103,
)


def unique_redis_prefix() -> str:
    """A Redis key prefix no other run uses, so runs sharing a Redis never see each other."""
    return f"parley-e2e-{secrets.token_hex(6)}"


@dataclass(frozen=True)
class StackConfig:
    """What to start. Postgres and Redis are embedded unless `environ` has their URLs."""

    data_dir: Path
    ports: Ports
    environ: Mapping[str, str]
    durable: bool = True
    start_timeout: float = 60.0
    stop_timeout: float = 20.0
    # The services' PARLEY_REDIS_PREFIX; None leaves it to `environ` (the services default it).
    redis_prefix: str | None = None

    @classmethod
    def throwaway(cls, data_dir: Path, environ: Mapping[str, str]) -> StackConfig:
        """A stack for one test session or benchmark run: free loopback ports, a Redis key
        prefix of its own, nothing kept on disk. Point `environ` at a database of its own."""
        return cls(
            data_dir=data_dir,
            ports=Ports(*free_ports(8)),
            environ=environ,
            durable=False,
            redis_prefix=unique_redis_prefix(),
        )


@dataclass(frozen=True)
class Endpoints:
    """Where the running stack can be reached, and the secret its tokens are signed with."""

    user: str
    chat: str
    chat2: str
    user_metrics: str
    chat_metrics: str
    chat2_metrics: str
    database_url: str
    redis_url: str
    jwt_secret: str
    jwt_issuer: str
    jwt_audience: str
    redis_prefix: str | None = None

    def token(self, subject: str, scopes: tuple[str, ...] = ()) -> str:
        return mint_token(
            self.jwt_secret,
            subject,
            scopes,
            issuer=self.jwt_issuer,
            audience=self.jwt_audience,
        )

    def command_env(self) -> dict[str, str]:
        """The variables a command run against the stack gets, e.g. an e2e test suite."""
        env = {
            "PARLEY_USER_ADDR": self.user,
            "PARLEY_CHAT_ADDR": self.chat,
            "PARLEY_CHAT2_ADDR": self.chat2,
            "PARLEY_USER_METRICS_ADDR": self.user_metrics,
            "PARLEY_CHAT_METRICS_ADDR": self.chat_metrics,
            "PARLEY_CHAT2_METRICS_ADDR": self.chat2_metrics,
            "PARLEY_DATABASE_URL": self.database_url,
            "PARLEY_REDIS_URL": self.redis_url,
            "PARLEY_JWT_SECRET": self.jwt_secret,
            "PARLEY_TOKEN": self.token("1", ("users:write",)),
            "PARLEY_TOKEN_READONLY": self.token("2"),
        }
        if self.redis_prefix is not None:
            env["PARLEY_REDIS_PREFIX"] = self.redis_prefix
        return env


def redact(url: str) -> str:
    """`url` (or a libpq key=value string) without its password, for printing."""
    if "://" not in url:
        return _KEYWORD_PASSWORD.sub(r"\1***", url)
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _configured(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name, "").strip()
    return value or None


class Stack:
    """Starts Postgres, Redis, the migrations and the services; stops them in reverse."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.data_dir = config.data_dir.absolute()
        self.postgres: EmbeddedPostgres | None = None
        self.redis: EmbeddedRedis | None = None
        self.services: list[Service] = []

    def start(self) -> Endpoints:
        config, ports, environ = self.config, self.config.ports, self.config.environ
        database_url = _configured(environ, "PARLEY_DATABASE_URL")
        redis_url = _configured(environ, "PARLEY_REDIS_URL")
        self._check_ports(embed_postgres=database_url is None, embed_redis=redis_url is None)
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if database_url is None and unprivileged_user() is not None:
            # Our own directory: Postgres, running as another user, then names its data
            # directory by its path wherever the directories above let that user through.
            self.data_dir.chmod(0o711)
        logs = self.data_dir / "logs"

        if database_url is None:
            self.postgres = EmbeddedPostgres(
                self.data_dir / "postgres",
                ports.postgres,
                log_path=logs / "postgres.log",
                durable=config.durable,
            )
            _log.info("starting Postgres on %s:%d", LOOPBACK, ports.postgres)
            self.postgres.start(timeout=config.start_timeout, databases=(DATABASE,))
            database_url = self.postgres.dsn(DATABASE)
        if redis_url is None:
            self.redis = EmbeddedRedis(
                self.data_dir / "redis",
                ports.redis,
                log_path=logs / "redis.log",
                password=load_or_create_secret(self.data_dir / REDIS_PASSWORD_FILE_NAME),
            )
            _log.info("starting Redis on %s:%d", LOOPBACK, ports.redis)
            self.redis.start(timeout=config.start_timeout)
            redis_url = self.redis.url

        secret = _configured(environ, "PARLEY_JWT_SECRET")
        if secret is None:
            secret = load_or_create_secret(self.data_dir / SECRET_FILE_NAME)

        env = dict(environ)
        for host_variable in ("PARLEY_GRPC_HOST", "PARLEY_METRICS_HOST"):
            if _configured(environ, host_variable) is None:
                env[host_variable] = LOOPBACK
        env.update(
            PARLEY_DATABASE_URL=database_url,
            PARLEY_REDIS_URL=redis_url,
            PARLEY_JWT_SECRET=secret,
        )
        if config.redis_prefix is not None:
            env["PARLEY_REDIS_PREFIX"] = config.redis_prefix
        redis_prefix = config.redis_prefix or _configured(environ, "PARLEY_REDIS_PREFIX")
        for script in MIGRATING_SCRIPTS:
            _log.info("migrating the database (%s migrate)", script)
            migrate(script, env, timeout=config.start_timeout)

        user = ServiceSpec(
            "UserService", "parley-user", USER_SERVICE, ports.user, ports.user_metrics
        )
        chats = [
            ServiceSpec("ChatService", "parley-chat", CHAT_HEALTH_NAME, ports.chat,
                        ports.chat_metrics),
            ServiceSpec("ChatService 2", "parley-chat", CHAT_HEALTH_NAME, ports.chat2,
                        ports.chat2_metrics),
        ]  # fmt: skip
        # Every chat replica finds the stack's own UserService, whatever the environment says.
        chat_env = {**env, "PARLEY_USER_SERVICE_ADDR": f"dns:///{user.address}"}
        launches = [(user, env)] + [(chat, chat_env) for chat in chats]
        for spec, spec_env in launches:
            _log.info("starting %s on %s", spec.title, spec.address)
            self.services.append(Service(spec, spec_env))
        for service in self.services:
            service.wait_serving(config.start_timeout)

        chat, chat2 = chats
        return Endpoints(
            user=user.address,
            chat=chat.address,
            chat2=chat2.address,
            user_metrics=user.metrics_address,
            chat_metrics=chat.metrics_address,
            chat2_metrics=chat2.metrics_address,
            database_url=database_url,
            redis_url=redis_url,
            jwt_secret=secret,
            jwt_issuer=_configured(environ, "PARLEY_JWT_ISSUER") or "parley",
            jwt_audience=_configured(environ, "PARLEY_JWT_AUDIENCE") or "parley",
            redis_prefix=redis_prefix,
        )

    def processes(self) -> list[Process]:
        found = [service.process for service in self.services]
        for server in (self.redis, self.postgres):
            if server is not None and server.process is not None:
                found.append(server.process)
        return found

    def first_exited(self) -> Process | None:
        """A process of the stack that is no longer running, if any."""
        return next((p for p in self.processes() if not p.running()), None)

    def stop(self) -> None:
        """Services first (SIGTERM, they drain), then Redis, then Postgres (fast shutdown)."""
        if self.services:
            _log.info("stopping the services")
            stop_all(
                [service.process for service in self.services],
                signal.SIGTERM,
                self.config.stop_timeout,
            )
            self.services = []
        if self.redis is not None:
            _log.info("stopping Redis")
            self.redis.stop()
            self.redis = None
        if self.postgres is not None:
            _log.info("stopping Postgres")
            self.postgres.stop()
            self.postgres = None

    def _check_ports(self, *, embed_postgres: bool, embed_redis: bool) -> None:
        ports, environ = self.config.ports, self.config.environ
        grpc_host = _configured(environ, "PARLEY_GRPC_HOST") or LOOPBACK
        metrics_host = _configured(environ, "PARLEY_METRICS_HOST") or LOOPBACK
        wanted = []
        if embed_postgres:
            wanted.append((ports.postgres, "Postgres", LOOPBACK, "--postgres-port"))
        if embed_redis:
            wanted.append((ports.redis, "Redis", LOOPBACK, "--redis-port"))
        wanted += [
            (ports.user, "UserService", grpc_host, "--user-port"),
            (ports.chat, "ChatService", grpc_host, "--chat-port"),
            (ports.chat2, "ChatService 2", grpc_host, "--chat2-port"),
            (ports.user_metrics, "UserService metrics", metrics_host, "--user-metrics-port"),
            (ports.chat_metrics, "ChatService metrics", metrics_host, "--chat-metrics-port"),
            (ports.chat2_metrics, "ChatService 2 metrics", metrics_host, "--chat2-metrics-port"),
        ]
        seen: dict[int, str] = {}
        for port, what, host, flag in wanted:
            if port in seen:
                raise DevstackError(f"port {port} is given to both {seen[port]} and {what}")
            seen[port] = what
            check_free(
                port, what, host=host, hint=f"stop what uses it or choose another with {flag}"
            )
