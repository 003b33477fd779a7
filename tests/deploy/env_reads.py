"""What the services read: the PARLEY_* variables of each command, found by running the
settings code itself."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, Mapping

from parley.chassis import AuthSettings, ConfigError, DatabaseSettings, Env
from parley.chassis.config import log_settings
from parley.chat_service.settings import ChatSettings
from parley.user_service.settings import UserSettings


class _RecordingEnviron(Mapping[str, str]):
    """An environment that remembers the name of every variable looked up in it."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = dict(values)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def _reads(load: Callable[[Env], object], values: Mapping[str, str]) -> set[str]:
    recorder = _RecordingEnviron(values)
    try:
        load(Env(recorder))
    except ConfigError:
        pass  # a branch that needs files (RS256 keys): the names were read before it failed
    return recorder.read


_REQUIRED = {
    "PARLEY_DATABASE_URL": "postgresql://parley@127.0.0.1:1/parley",
    "PARLEY_JWT_SECRET": os.urandom(32).hex(),
    "PARLEY_REDIS_URL": "redis://127.0.0.1:1/0",
}
_RS256 = {**_REQUIRED, "PARLEY_JWT_ALGORITHM": "RS256"}


def _serve_reads(settings: Callable[[Env], object]) -> frozenset[str]:
    names: set[str] = set()
    for values in (_REQUIRED, _RS256):
        names |= _reads(settings, values)
    # `serve` reads the log settings before it builds the settings object.
    return frozenset(names | _reads(log_settings, _REQUIRED))


@functools.cache
def env_reads() -> dict[str, frozenset[str]]:
    """PARLEY_* variables each command reads, found by running the settings code itself.

    Keys: "user" and "chat" (`serve`), "migrate" (`parley-user migrate`, `parley-chat migrate`).
    """
    reads = {
        "user": _serve_reads(UserSettings.from_env),
        "chat": _serve_reads(ChatSettings.from_env),
        "migrate": frozenset(
            _reads(DatabaseSettings.from_env, _REQUIRED) | _reads(log_settings, _REQUIRED)
        ),
    }
    # The recorder must have seen the basics, or it recorded nothing useful.
    assert {"PARLEY_GRPC_PORT", "PARLEY_JWT_SECRET"} <= reads["user"]
    assert {"PARLEY_REDIS_URL", "PARLEY_USER_SERVICE_ADDR"} <= reads["chat"]
    assert _reads(AuthSettings.from_env, _RS256) <= reads["user"] & reads["chat"]
    return reads
