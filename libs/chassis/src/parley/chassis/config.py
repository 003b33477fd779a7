"""Settings from PARLEY_* environment variables, validated once at start-up."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import psycopg
from psycopg.conninfo import conninfo_to_dict

from parley.chassis.sample_secrets import SAMPLE_PASSWORD_PROBLEM, has_sample_password

__all__ = [
    "ConfigError",
    "DatabaseSettings",
    "Env",
    "ServerSettings",
    "TlsSettings",
    "log_settings",
    "read_pem",
]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


class ConfigError(ValueError):
    """A configuration value is missing or wrong; the message names the variable."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


class Env:
    """Typed reads of environment variables; every failure is a one-line ConfigError."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ is None else environ

    def raw(self, name: str) -> str | None:
        value = self._environ.get(name)
        return None if value is None or value.strip() == "" else value.strip()

    def string(self, name: str, default: str | None = None) -> str:
        value = self.raw(name)
        if value is not None:
            return value
        if default is None:
            raise ConfigError(name, "is required but not set")
        return default

    def optional(self, name: str) -> str | None:
        return self.raw(name)

    def choice(
        self, name: str, default: str, choices: tuple[str, ...], *, ignore_case: bool = False
    ) -> str:
        value = self.string(name, default)
        if ignore_case:
            value = {c.lower(): c for c in choices}.get(value.lower(), value)
        if value not in choices:
            raise ConfigError(name, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def integer(self, name: str, default: int, *, minimum: int, maximum: int) -> int:
        value = self.raw(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(name, f"must be an integer, got {value!r}") from None
        if not minimum <= number <= maximum:
            raise ConfigError(name, f"must be between {minimum} and {maximum}, got {number}")
        return number

    def ratio(self, name: str, default: float) -> float:
        """A fraction from 0 to 1, such as `0.25`."""
        value = self.raw(name)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(name, f"must be a number from 0 to 1, got {value!r}") from None
        if not 0.0 <= number <= 1.0:
            raise ConfigError(name, f"must be a number from 0 to 1, got {value!r}")
        return number

    def port(self, name: str, default: int) -> int:
        return self.integer(name, default, minimum=0, maximum=65535)

    def seconds(
        self, name: str, default: float, *, minimum: float = 0.0, maximum: float = 86400.0
    ) -> float:
        """A duration such as `10`, `10s`, `500ms`, `5m`, `1h` or `30d`, returned in seconds."""
        value = self.raw(name)
        if value is None:
            return default
        match = _DURATION.match(value)
        if match is None:
            raise ConfigError(name, f"must be a duration such as 10s, 500ms or 5m, got {value!r}")
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        if not minimum <= seconds <= maximum:
            raise ConfigError(name, f"must be between {minimum:g}s and {maximum:g}s, got {value!r}")
        return seconds


def read_pem(variable: str, path: str) -> bytes:
    """The PEM file at `path`, named by `variable`; a one-line ConfigError if unreadable."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as error:
        raise ConfigError(variable, f"cannot read {path!r}: {error.strerror}") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(variable, f"{path!r} is not a PEM file")
    return data


@dataclass(frozen=True)
class TlsSettings:
    """PEM contents for TLS on the gRPC port; `client_ca` set means mutual TLS."""

    cert: bytes
    key: bytes
    client_ca: bytes | None

    @classmethod
    def from_env(cls, env: Env) -> TlsSettings | None:
        cert_file = env.optional("PARLEY_TLS_CERT_FILE")
        key_file = env.optional("PARLEY_TLS_KEY_FILE")
        ca_file = env.optional("PARLEY_TLS_CLIENT_CA_FILE")
        if cert_file is None and key_file is None:
            if ca_file is not None:
                raise ConfigError(
                    "PARLEY_TLS_CLIENT_CA_FILE",
                    "needs PARLEY_TLS_CERT_FILE and PARLEY_TLS_KEY_FILE as well",
                )
            return None
        if cert_file is None:
            raise ConfigError("PARLEY_TLS_CERT_FILE", "must be set when PARLEY_TLS_KEY_FILE is")
        if key_file is None:
            raise ConfigError("PARLEY_TLS_KEY_FILE", "must be set when PARLEY_TLS_CERT_FILE is")
        return cls(
            cert=read_pem("PARLEY_TLS_CERT_FILE", cert_file),
            key=read_pem("PARLEY_TLS_KEY_FILE", key_file),
            client_ca=None if ca_file is None else read_pem("PARLEY_TLS_CLIENT_CA_FILE", ca_file),
        )


def log_settings(env: Env) -> tuple[str, str]:
    """PARLEY_LOG_FORMAT and PARLEY_LOG_LEVEL: read here only, by the server's settings and
    by the commands that log before a server is built."""
    return (
        env.choice("PARLEY_LOG_FORMAT", "plain", ("plain", "json")),
        env.choice(
            "PARLEY_LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR"), ignore_case=True
        ),
    )


@dataclass(frozen=True)
class ServerSettings:
    """Where a service listens and how its connections and shutdown behave."""

    host: str
    port: int
    metrics_host: str
    metrics_port: int
    shutdown_grace: float
    shutdown_delay: float
    keepalive_time: float
    keepalive_timeout: float
    max_connection_age: float
    max_connection_age_grace: float
    health_check_interval: float
    log_format: str
    log_level: str
    tls: TlsSettings | None = None
    # A plain-text port that serves only grpc.health.v1 (None: no such port), for the probes
    # of a TLS port: the kubelet's gRPC probe cannot speak TLS.
    health_port: int | None = None
    # The largest request message accepted (grpc.max_receive_message_length); a larger one
    # gets RESOURCE_EXHAUSTED before any handler runs.
    max_message_bytes: int = 1024 * 1024
    # Calls that have reached the server but not yet a handler; beyond this grpc cancels new
    # ones (the client sees CANCELLED). grpc's own default of 1,000 cancelled 540 of 2,000
    # chat streams opened in one burst, as happens when a replica's clients all reconnect.
    max_pending_calls: int = 10_000
    # Calls open at once on one client connection (an HTTP/2 stream each, unary calls too).
    max_streams_per_connection: int = 200
    # Streaming calls of the service's own methods open at once on this replica.
    max_streams: int = 10_000
    # Unary calls of the service's own methods open at once on this replica, each counted
    # until its answer is written: one whose client does not read holds its answer.
    max_unary_calls: int = 1_000
    # The unauthenticated health service: the longest service name (UTF-8 bytes), and the
    # Watch streams one connection, and the whole replica, may hold.
    health_max_service_name: int = 256
    health_max_watches_per_connection: int = 8
    health_max_watches: int = 1_000
    # The share of successful calls whose access log line is written (1: all of them).
    access_log_sample: float = 1.0

    @classmethod
    def from_env(cls, env: Env, *, default_port: int, default_metrics_port: int) -> ServerSettings:
        log_format, log_level = log_settings(env)
        return cls(
            host=env.string("PARLEY_GRPC_HOST", "0.0.0.0"),
            port=env.port("PARLEY_GRPC_PORT", default_port),
            metrics_host=env.string("PARLEY_METRICS_HOST", "0.0.0.0"),
            metrics_port=env.port("PARLEY_METRICS_PORT", default_metrics_port),
            shutdown_grace=env.seconds("PARLEY_SHUTDOWN_GRACE", 10.0, maximum=3600),
            shutdown_delay=env.seconds("PARLEY_SHUTDOWN_DELAY", 0.0, maximum=300),
            keepalive_time=env.seconds("PARLEY_KEEPALIVE_TIME", 30.0, minimum=1.0),
            keepalive_timeout=env.seconds("PARLEY_KEEPALIVE_TIMEOUT", 10.0, minimum=1.0),
            # 0 disables it; in Kubernetes a few minutes makes long-lived clients rebalance.
            max_connection_age=env.seconds("PARLEY_MAX_CONNECTION_AGE", 0.0),
            max_connection_age_grace=env.seconds("PARLEY_MAX_CONNECTION_AGE_GRACE", 30.0),
            health_check_interval=env.seconds(
                "PARLEY_HEALTH_CHECK_INTERVAL", 5.0, minimum=0.05, maximum=300
            ),
            log_format=log_format,
            log_level=log_level,
            tls=TlsSettings.from_env(env),
            health_port=(
                None if env.raw("PARLEY_HEALTH_PORT") is None else env.port("PARLEY_HEALTH_PORT", 0)
            ),
            max_message_bytes=env.integer(
                "PARLEY_MAX_MESSAGE_BYTES", 1024 * 1024, minimum=16 * 1024, maximum=64 * 1024 * 1024
            ),
            max_pending_calls=env.integer(
                "PARLEY_MAX_PENDING_CALLS", 10_000, minimum=100, maximum=1_000_000
            ),
            max_streams_per_connection=env.integer(
                "PARLEY_MAX_STREAMS_PER_CONNECTION", 200, minimum=1, maximum=100_000
            ),
            max_streams=env.integer("PARLEY_MAX_STREAMS", 10_000, minimum=1, maximum=1_000_000),
            max_unary_calls=env.integer(
                "PARLEY_MAX_UNARY_CALLS", 1_000, minimum=1, maximum=1_000_000
            ),
            health_max_service_name=env.integer(
                "PARLEY_HEALTH_MAX_SERVICE_NAME", 256, minimum=16, maximum=65_536
            ),
            health_max_watches_per_connection=env.integer(
                "PARLEY_HEALTH_MAX_WATCHES_PER_CONNECTION", 8, minimum=1, maximum=10_000
            ),
            health_max_watches=env.integer(
                "PARLEY_HEALTH_MAX_WATCHES", 1_000, minimum=1, maximum=1_000_000
            ),
            access_log_sample=env.ratio("PARLEY_ACCESS_LOG_SAMPLE", 1.0),
        )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class DatabaseSettings:
    """The Postgres connection pool of a service."""

    url: str
    pool_min: int
    pool_max: int
    pool_timeout: float

    @classmethod
    def from_env(cls, env: Env) -> DatabaseSettings:
        url = env.string("PARLEY_DATABASE_URL")
        if not url.startswith(("postgresql://", "postgres://")) and "=" not in url:
            raise ConfigError(
                "PARLEY_DATABASE_URL",
                "must be a postgresql:// URL or a libpq key=value string",
            )
        try:
            conninfo_to_dict(url)
        except psycopg.ProgrammingError:
            # libpq's message quotes the string, password and all: not for a log line.
            raise ConfigError(
                "PARLEY_DATABASE_URL", "libpq cannot parse it (a URL or key=value string)"
            ) from None
        if has_sample_password(url):
            raise ConfigError("PARLEY_DATABASE_URL", SAMPLE_PASSWORD_PROBLEM)
        pool_min = env.integer("PARLEY_DB_POOL_MIN", 1, minimum=0, maximum=1000)
        pool_max = env.integer("PARLEY_DB_POOL_MAX", 10, minimum=1, maximum=1000)
        if pool_max < pool_min:
            raise ConfigError(
                "PARLEY_DB_POOL_MAX", f"must be at least PARLEY_DB_POOL_MIN ({pool_min})"
            )
        return cls(
            url=url,
            pool_min=pool_min,
            pool_max=pool_max,
            pool_timeout=env.seconds("PARLEY_DB_POOL_TIMEOUT", 5.0, minimum=0.01, maximum=600),
        )
