"""What the services read: the PARLEY_* and OTEL_* variables of each command, found by
running the settings code itself (and, for the OpenTelemetry SDK's own reads, by seeing what
changes the resource a service makes)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, Mapping
from typing import NoReturn
from unittest import mock

# Imported before start_tracing runs below, so that its import there reads nothing.
import opentelemetry.instrumentation.psycopg  # noqa: F401
from opentelemetry.sdk import environment_variables
from opentelemetry.sdk.resources import Resource

from parley.chassis import AuthSettings, ConfigError, DatabaseSettings, Env, _otel_sdk
from parley.chassis.config import log_settings
from parley.chassis.tracing import TracingSettings
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


def _serve_reads(settings: Callable[[Env], object], program: str) -> frozenset[str]:
    names: set[str] = set()
    for values in (_REQUIRED, _RS256):
        names |= _reads(settings, values)
    # `serve` reads the log settings and then the tracing settings (OTEL_TRACES_SAMPLER_ARG
    # only for a ratio sampler) before it builds the settings object.
    names |= _reads(log_settings, _REQUIRED)
    for sampler in ("parentbased_always_on", "parentbased_traceidratio"):
        names |= _reads(TracingSettings.from_env, {"OTEL_TRACES_SAMPLER": sampler})
    return frozenset(names | _resource_reads(program))


class _Made(Exception):
    """Raised in place of making the TracerProvider: tracing is never started here."""

    def __init__(self, resource: Resource) -> None:
        self.resource = resource


def service_resource(program: str) -> Resource:
    """The resource `start_tracing` makes for `program` in the current environment (through
    `_otel_sdk.build_provider`, which it calls)."""

    def provider(*, resource: Resource, **_: object) -> NoReturn:
        raise _Made(resource)

    with mock.patch.object(_otel_sdk, "TracerProvider", provider):
        try:
            _otel_sdk.build_provider(
                TracingSettings(enabled=True), program, "0.1.0", lambda result, spans: None
            )
        except _Made as made:
            return made.resource
    raise AssertionError("build_provider made no TracerProvider")


_MARK = "parley.probe=" + os.urandom(8).hex()


def _resource_reads(program: str) -> frozenset[str]:
    """The SDK's variables that change the resource the service makes: each is set to a mark
    in turn and kept when the mark shows up. A variable the service overrides (it names
    itself, so OTEL_SERVICE_NAME has no effect) is not one it reads."""
    # Experimental ones (OTEL_EXPERIMENTAL_RESOURCE_DETECTORS) are no settings of Parley's.
    names = {getattr(environment_variables, n) for n in dir(environment_variables)
             if n.startswith("OTEL_") and "_EXPERIMENTAL_" not in n}  # fmt: skip
    mark = _MARK.partition("=")[2]
    found = set()
    for name in sorted(names):
        with mock.patch.dict(os.environ, {name: _MARK}):
            try:
                attributes = service_resource(program).attributes
            except ValueError:  # a number the SDK reads (a span limit): not the resource's
                continue
        if any(mark in str(value) for value in attributes.values()):
            found.add(name)
    return frozenset(found)


@functools.cache
def env_reads() -> dict[str, frozenset[str]]:
    """Variables each command reads, found by running the settings code itself.

    Keys: "user" and "chat" (`serve`), "migrate" (`parley-user migrate`, `parley-chat migrate`,
    which are not traced).
    """
    reads = {
        "user": _serve_reads(UserSettings.from_env, "parley-user"),
        "chat": _serve_reads(ChatSettings.from_env, "parley-chat"),
        "migrate": frozenset(
            _reads(DatabaseSettings.from_env, _REQUIRED) | _reads(log_settings, _REQUIRED)
        ),
    }
    # The recorder must have seen the basics, or it recorded nothing useful.
    assert {"PARLEY_GRPC_PORT", "PARLEY_JWT_SECRET"} <= reads["user"]
    assert {"PARLEY_REDIS_URL", "PARLEY_USER_SERVICE_ADDR"} <= reads["chat"]
    assert _reads(AuthSettings.from_env, _RS256) <= reads["user"] & reads["chat"]
    traced = {"OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_TRACES_SAMPLER_ARG"}
    assert traced | {"OTEL_RESOURCE_ATTRIBUTES"} <= reads["user"] & reads["chat"]
    assert not traced & reads["migrate"]
    return reads
