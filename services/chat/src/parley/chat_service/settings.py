"""ChatService settings, all from PARLEY_* environment variables."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from parley.chassis import AuthSettings, ConfigError, DatabaseSettings, Env, ServerSettings
from parley.chassis.config import read_pem
from parley.chassis.sample_secrets import SAMPLE_PASSWORD_PROBLEM, has_sample_password

__all__ = [
    "DEFAULT_GRPC_PORT",
    "DEFAULT_METRICS_PORT",
    "ChatSettings",
    "RetentionSettings",
    "UserServiceTls",
]

DEFAULT_GRPC_PORT = 50052
DEFAULT_METRICS_PORT = 9102


@dataclass(frozen=True)
class UserServiceTls:
    """TLS for the channel to UserService: a CA to trust, and a certificate for mutual TLS."""

    root_ca: bytes | None
    """None: the system's root certificates."""
    cert: bytes | None
    key: bytes | None

    @classmethod
    def from_env(cls, env: Env) -> UserServiceTls | None:
        ca_file = env.optional("PARLEY_USER_SERVICE_TLS_CA_FILE")
        cert_file = env.optional("PARLEY_USER_SERVICE_TLS_CERT_FILE")
        key_file = env.optional("PARLEY_USER_SERVICE_TLS_KEY_FILE")
        if (cert_file is None) != (key_file is None):
            missing, given = (
                ("PARLEY_USER_SERVICE_TLS_CERT_FILE", "PARLEY_USER_SERVICE_TLS_KEY_FILE")
                if cert_file is None
                else ("PARLEY_USER_SERVICE_TLS_KEY_FILE", "PARLEY_USER_SERVICE_TLS_CERT_FILE")
            )
            raise ConfigError(missing, f"must be set when {given} is")
        if ca_file is None and cert_file is None:
            return None
        return cls(
            root_ca=None
            if ca_file is None
            else read_pem("PARLEY_USER_SERVICE_TLS_CA_FILE", ca_file),
            cert=None
            if cert_file is None
            else read_pem("PARLEY_USER_SERVICE_TLS_CERT_FILE", cert_file),
            key=None
            if key_file is None
            else read_pem("PARLEY_USER_SERVICE_TLS_KEY_FILE", key_file),
        )


_DAY = 86400.0


@dataclass(frozen=True)
class RetentionSettings:
    """Bounded chat history: what the sweeper deletes (see retention.py), and how."""

    max_age: float = 30 * _DAY
    """Seconds a message is kept; 0: no age limit."""
    max_messages: int = 100_000
    """Messages kept per room (the newest); 0: no count limit."""
    min_age: float = 3600.0
    """Seconds no message is deleted for, by age or by count: a client_message_id resend is
    deduplicated for at least this long (so a room busier than max_messages per min_age keeps
    more than max_messages)."""
    interval: float = 60.0
    """Seconds between the starts of two sweeps."""
    batch: int = 1000
    """Rows one DELETE (one short transaction) removes at most."""

    @property
    def enabled(self) -> bool:
        return self.max_age > 0 or self.max_messages > 0

    @classmethod
    def from_env(cls, env: Env) -> RetentionSettings:
        max_age = env.seconds(
            "PARLEY_CHAT_RETENTION_MAX_AGE", 30 * _DAY, minimum=0, maximum=3650 * _DAY
        )
        min_age = env.seconds(
            "PARLEY_CHAT_RETENTION_MIN_AGE", 3600.0, minimum=60.0, maximum=30 * _DAY
        )
        if 0 < max_age < min_age:
            raise ConfigError(
                "PARLEY_CHAT_RETENTION_MIN_AGE",
                f"must not exceed PARLEY_CHAT_RETENTION_MAX_AGE ({max_age:g}s), got {min_age:g}s",
            )
        return cls(
            max_age=max_age,
            min_age=min_age,
            max_messages=env.integer(
                "PARLEY_CHAT_RETENTION_MAX_MESSAGES", 100_000, minimum=0, maximum=1_000_000_000
            ),
            interval=env.seconds(
                "PARLEY_CHAT_RETENTION_INTERVAL", 60.0, minimum=0.05, maximum=_DAY
            ),
            batch=env.integer("PARLEY_CHAT_RETENTION_BATCH", 1000, minimum=1, maximum=10_000),
        )


@dataclass(frozen=True)
class ChatSettings:
    server: ServerSettings
    database: DatabaseSettings
    auth: AuthSettings
    redis_url: str
    redis_prefix: str
    user_service: str
    user_timeout: float
    user_cache_ttl: float
    rate_limit: float
    """Messages a second one user may send, across all of their streams and replicas."""
    rate_burst: int
    max_streams_per_user: int
    """StreamChat streams one user may hold open on one replica."""
    queue_limit: int
    resync_interval: float
    presence_ttl: float
    user_tls: UserServiceTls | None = None
    redis_cluster: bool = False
    """PARLEY_REDIS_URL names one node of a Redis Cluster: rooms use sharded pub/sub."""
    auto_create_rooms: bool = True
    """A room that does not exist is made (public, no owner) when a stream first names it."""
    max_rooms_per_user: int = 1000
    max_members: int = 1000
    user_cache_max_stale: float = 300.0
    """How long past PARLEY_USER_CACHE_TTL a cached user is honoured while UserService
    cannot answer."""
    subscription_linger: float = 2.0
    """How long a room stays subscribed on Redis after its last stream here left."""
    retention: RetentionSettings = RetentionSettings()
    """How much chat history is kept, and how the sweeper deletes the rest."""

    @classmethod
    def from_env(cls, env: Env | None = None) -> ChatSettings:
        env = env or Env()
        redis_url = env.string("PARLEY_REDIS_URL")
        if not redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError("PARLEY_REDIS_URL", "must be a redis://, rediss:// or unix:// URL")
        if has_sample_password(redis_url):
            raise ConfigError("PARLEY_REDIS_URL", SAMPLE_PASSWORD_PROBLEM)
        redis_cluster = (
            env.choice("PARLEY_REDIS_CLUSTER", "false", ("true", "false"), ignore_case=True).lower()
            == "true"
        )
        if redis_cluster and not redis_url.startswith(("redis://", "rediss://")):
            raise ConfigError(
                "PARLEY_REDIS_URL",
                "must be a redis:// or rediss:// URL of a node when PARLEY_REDIS_CLUSTER is true",
            )
        if redis_cluster and urlsplit(redis_url).path.strip("/") not in ("", "0"):
            raise ConfigError(
                "PARLEY_REDIS_URL",
                "must name database 0 (or none) when "
                "PARLEY_REDIS_CLUSTER is true: a cluster has no other",
            )
        prefix = env.string("PARLEY_REDIS_PREFIX", "parley")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", prefix):
            raise ConfigError("PARLEY_REDIS_PREFIX", "must be 1 to 64 of A-Z a-z 0-9 _ . -")
        return cls(
            server=ServerSettings.from_env(
                env, default_port=DEFAULT_GRPC_PORT, default_metrics_port=DEFAULT_METRICS_PORT
            ),
            database=DatabaseSettings.from_env(env),
            auth=AuthSettings.from_env(env),
            redis_url=redis_url,
            redis_prefix=prefix,
            user_service=env.string("PARLEY_USER_SERVICE_ADDR", "127.0.0.1:50051"),
            user_timeout=env.seconds("PARLEY_USER_SERVICE_TIMEOUT", 2.0, minimum=0.01, maximum=60),
            user_cache_ttl=env.seconds("PARLEY_USER_CACHE_TTL", 60.0, maximum=86400),
            rate_limit=float(env.integer("PARLEY_CHAT_RATE_LIMIT", 20, minimum=1, maximum=100000)),
            rate_burst=env.integer("PARLEY_CHAT_RATE_BURST", 40, minimum=1, maximum=100000),
            max_streams_per_user=env.integer(
                "PARLEY_CHAT_MAX_STREAMS_PER_USER", 16, minimum=1, maximum=1_000_000
            ),
            queue_limit=env.integer("PARLEY_CHAT_QUEUE_LIMIT", 256, minimum=1, maximum=100000),
            resync_interval=env.seconds(
                "PARLEY_CHAT_RESYNC_INTERVAL", 5.0, minimum=0.05, maximum=3600
            ),
            presence_ttl=env.seconds("PARLEY_CHAT_PRESENCE_TTL", 30.0, minimum=0.3, maximum=3600),
            user_tls=UserServiceTls.from_env(env),
            redis_cluster=redis_cluster,
            auto_create_rooms=env.choice(
                "PARLEY_CHAT_AUTO_CREATE_ROOMS", "true", ("true", "false"), ignore_case=True
            ).lower()
            == "true",
            max_rooms_per_user=env.integer(
                "PARLEY_CHAT_MAX_ROOMS_PER_USER", 1000, minimum=0, maximum=1_000_000
            ),
            max_members=env.integer("PARLEY_CHAT_MAX_MEMBERS", 1000, minimum=2, maximum=1_000_000),
            user_cache_max_stale=env.seconds("PARLEY_USER_CACHE_MAX_STALE", 300.0, maximum=86400),
            subscription_linger=env.seconds(
                "PARLEY_CHAT_SUBSCRIPTION_LINGER", 2.0, minimum=0, maximum=3600
            ),
            retention=RetentionSettings.from_env(env),
        )
