"""UserService settings, all from PARLEY_* environment variables."""

from __future__ import annotations

from dataclasses import dataclass

from parley.chassis import AuthSettings, DatabaseSettings, Env, ServerSettings

__all__ = ["DEFAULT_GRPC_PORT", "DEFAULT_METRICS_PORT", "UserSettings"]

DEFAULT_GRPC_PORT = 50051
DEFAULT_METRICS_PORT = 9101


@dataclass(frozen=True)
class UserSettings:
    server: ServerSettings
    database: DatabaseSettings
    auth: AuthSettings

    @classmethod
    def from_env(cls, env: Env | None = None) -> UserSettings:
        env = env or Env()
        return cls(
            server=ServerSettings.from_env(
                env, default_port=DEFAULT_GRPC_PORT, default_metrics_port=DEFAULT_METRICS_PORT
            ),
            database=DatabaseSettings.from_env(env),
            auth=AuthSettings.from_env(env),
        )
