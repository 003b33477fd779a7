"""ChatService settings, all from PARLEY_* environment variables."""

from __future__ import annotations

from dataclasses import dataclass

from parley.chassis import AuthSettings, ConfigError, DatabaseSettings, Env, ServerSettings

__all__ = ["DEFAULT_GRPC_PORT", "DEFAULT_METRICS_PORT", "ChatSettings"]

DEFAULT_GRPC_PORT = 50052
DEFAULT_METRICS_PORT = 9102


@dataclass(frozen=True)
class ChatSettings:
    server: ServerSettings
    database: DatabaseSettings
    auth: AuthSettings
    redis_url: str

    @classmethod
    def from_env(cls, env: Env | None = None) -> ChatSettings:
        env = env or Env()
        redis_url = env.string("PARLEY_REDIS_URL")
        if not redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError("PARLEY_REDIS_URL", "must be a redis://, rediss:// or unix:// URL")
        return cls(
            server=ServerSettings.from_env(
                env, default_port=DEFAULT_GRPC_PORT, default_metrics_port=DEFAULT_METRICS_PORT
            ),
            database=DatabaseSettings.from_env(env),
            auth=AuthSettings.from_env(env),
            redis_url=redis_url,
        )
