"""UserService settings, all from PARLEY_* environment variables."""

from __future__ import annotations

from dataclasses import dataclass

from parley.chassis import AuthSettings, DatabaseSettings, Env, ServerSettings

__all__ = ["DEFAULT_GRPC_PORT", "DEFAULT_METRICS_PORT", "ImportLimits", "UserSettings"]

DEFAULT_GRPC_PORT = 50051
DEFAULT_METRICS_PORT = 9101


@dataclass(frozen=True)
class ImportLimits:
    """How much one ImportUsers call may send: rows, and time from its start to its last row."""

    max_rows: int = 10_000
    max_duration: float = 60.0

    @classmethod
    def from_env(cls, env: Env) -> ImportLimits:
        return cls(
            max_rows=env.integer("PARLEY_IMPORT_MAX_ROWS", 10_000, minimum=1, maximum=100_000),
            max_duration=env.seconds("PARLEY_IMPORT_MAX_DURATION", 60.0, minimum=0.1, maximum=3600),
        )


@dataclass(frozen=True)
class UserSettings:
    server: ServerSettings
    database: DatabaseSettings
    auth: AuthSettings
    imports: ImportLimits = ImportLimits()

    @classmethod
    def from_env(cls, env: Env | None = None) -> UserSettings:
        env = env or Env()
        return cls(
            server=ServerSettings.from_env(
                env, default_port=DEFAULT_GRPC_PORT, default_metrics_port=DEFAULT_METRICS_PORT
            ),
            database=DatabaseSettings.from_env(env),
            auth=AuthSettings.from_env(env),
            imports=ImportLimits.from_env(env),
        )
