"""Channels with the defaults a Parley client needs: retries, round_robin, keepalive, auth,
tracing.

- Retries: idempotent methods are retried on UNAVAILABLE (and on a CANCELLED sent by a server
  that is stopping), with exponential back-off, by gRPC
  itself through the `grpc.service_config` channel option. Writes are never retried: a retried
  CreateUser could create the user twice, and a retried DeleteUser would report NOT_FOUND for a
  delete that worked.
- Load balancing: `round_robin`, so a `dns:///host:port` target that resolves to several
  replicas (a Kubernetes headless service) spreads calls over all of them.
- Keepalive: pings every 30 s while calls are open, so a dead peer is noticed on long streams.
- Reconnects: gRPC's connection back-off is capped at 10 s (default 120 s), so a restarted
  server is found again quickly.
- Tracing: a CLIENT span per call, its W3C trace context in the metadata, when the client
  was given a tracer provider or the application installed a global one; else no tracing
  interceptor at all (see parley.client._tracing).

Timeouts are passed on every call rather than put into the service config: grpcio starts a
service-config timeout before the call is made (grpc/grpc#34547).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
import grpc.aio
from opentelemetry import trace

from parley.client._auth import AuthInterceptor, async_auth_interceptors
from parley.client._tracing import TracingInterceptor, async_tracing_interceptors, tracer_for
from parley.client.tokens import TokenProvider
from parley.proto import contract

__all__ = [
    "CHAT_SERVICE",
    "DEFAULT_TIMEOUT",
    "HEALTH_SERVICE",
    "USER_SERVICE",
    "ChannelSpec",
    "ServiceSpec",
    "channel_options",
    "open_async_channel",
    "open_sync_channel",
    "parse_targets",
    "resolve_target",
    "service_config",
]

DEFAULT_TIMEOUT = 10.0
"""Seconds a call may take unless the client or the call says otherwise."""

HEALTH_SERVICE = contract.HEALTH_SERVICE

_VERSION = "0.1.0"


@dataclass(frozen=True)
class ServiceSpec:
    """One Parley gRPC service as a client sees it."""

    name: str
    """The full gRPC service name, e.g. `user.UserService`."""
    address_env: str
    """The environment variable with the service's address."""
    default_target: str
    """The address used when neither an argument nor the variable gives one."""
    idempotent: tuple[str, ...]
    """Methods safe to retry on UNAVAILABLE."""


USER_SERVICE = ServiceSpec(
    name=contract.USER_SERVICE,
    address_env="PARLEY_USER_ADDR",
    default_target="localhost:50051",
    idempotent=contract.IDEMPOTENT_METHODS[contract.USER_SERVICE],
)
CHAT_SERVICE = ServiceSpec(
    name=contract.CHAT_SERVICE,
    address_env="PARLEY_CHAT_ADDR",
    default_target="localhost:50052",
    idempotent=contract.IDEMPOTENT_METHODS[contract.CHAT_SERVICE],
)


def resolve_target(
    target: str | Sequence[str] | None,
    spec: ServiceSpec,
    environ: Mapping[str, str] | None = None,
) -> str:
    """The address text to use: `target`, else the service's variable, else its default."""
    if target is not None and not isinstance(target, str):
        target = ",".join(target)
    if target is None or not target.strip():
        env = os.environ if environ is None else environ
        target = env.get(spec.address_env, "").strip() or spec.default_target
    return target.strip()


def parse_targets(text: str) -> list[str]:
    """The gRPC targets in an address text: one, or several separated by commas.

    `ipv4:a:1,b:2` and `ipv6:...` are one gRPC target already (a static list that round_robin
    spreads calls over) and are kept whole. Anything else with commas is a list of targets that
    the client tries in turn.
    """
    text = text.strip()
    if text.startswith(("ipv4:", "ipv6:")):
        return [text]
    targets = [part.strip() for part in text.split(",") if part.strip()]
    if not targets:
        raise ValueError("no address given")
    for target in targets:
        _check_target(target)
    return targets


def _check_target(target: str) -> None:
    if "://" in target or target.startswith(("dns:", "unix:", "unix-abstract:", "vsock:")):
        return
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"expected host:port, got {target!r}")
    if host.startswith("["):
        ipaddress.IPv6Address(host.strip("[]"))


def service_config(spec: ServiceSpec) -> str:
    """The JSON service config: round_robin with health checking, retries of the idempotent
    methods (see parley.proto.contract.service_config)."""
    return contract.service_config(spec.name, methods=spec.idempotent)


def channel_options(
    spec: ServiceSpec, extra: Sequence[tuple[str, str | int]] = ()
) -> list[tuple[str, str | int]]:
    """Channel arguments for `spec`; `extra` ones override the defaults of the same name."""
    options: dict[str, str | int] = {
        "grpc.service_config": service_config(spec),
        "grpc.enable_retries": 1,
        "grpc.keepalive_time_ms": 30_000,
        "grpc.keepalive_timeout_ms": 10_000,
        # Pings only while calls are open: servers with stock settings GOAWAY idle pingers.
        "grpc.keepalive_permit_without_calls": 0,
        "grpc.initial_reconnect_backoff_ms": 500,
        "grpc.max_reconnect_backoff_ms": 10_000,
        "grpc.primary_user_agent": f"parley-client/{_VERSION}",
    }
    options.update(dict(extra))
    return list(options.items())


@dataclass(frozen=True)
class ChannelSpec:
    """Everything needed to open a channel to one target."""

    target: str
    options: Sequence[tuple[str, str | int]]
    credentials: grpc.ChannelCredentials | None
    token: TokenProvider | None
    tracer_provider: trace.TracerProvider | None = None
    """The provider of the calls' spans; None: the global one, when the application set one."""


def credentials_for(tls: bool | grpc.ChannelCredentials) -> grpc.ChannelCredentials | None:
    """None for plain text; the system's root certificates for `True`; else `tls` itself."""
    if tls is True:
        return grpc.ssl_channel_credentials()
    if tls is False:
        return None
    return tls


def open_sync_channel(spec: ChannelSpec) -> grpc.Channel:
    """A sync channel to `spec.target`, with the tracing interceptor (outermost) when its calls
    are traced and the auth interceptor when there is a token."""
    if spec.credentials is None:
        channel = grpc.insecure_channel(spec.target, options=spec.options)
    else:
        channel = grpc.secure_channel(spec.target, spec.credentials, options=spec.options)
    interceptors: list[TracingInterceptor | AuthInterceptor] = []
    tracer = tracer_for(spec.tracer_provider, _VERSION)
    if tracer is not None:
        interceptors.append(TracingInterceptor(tracer, spec.target))
    if spec.token is not None:
        interceptors.append(AuthInterceptor(spec.token))
    if not interceptors:
        return channel
    return grpc.intercept_channel(channel, *interceptors)


def open_async_channel(spec: ChannelSpec) -> grpc.aio.Channel:
    """A `grpc.aio` channel to `spec.target`, with the tracing interceptors (outermost) when its
    calls are traced and the auth interceptors when there is a token."""
    interceptors: list[grpc.aio.ClientInterceptor] = []
    tracer = tracer_for(spec.tracer_provider, _VERSION)
    if tracer is not None:
        interceptors += async_tracing_interceptors(tracer, spec.target)
    if spec.token is not None:
        interceptors += async_auth_interceptors(spec.token)
    if spec.credentials is None:
        return grpc.aio.insecure_channel(
            spec.target, options=spec.options, interceptors=interceptors or None
        )
    return grpc.aio.secure_channel(
        spec.target, spec.credentials, options=spec.options, interceptors=interceptors or None
    )
