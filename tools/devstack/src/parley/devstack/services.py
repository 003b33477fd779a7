"""Parley's own services: their console scripts, migrations, start-up and gRPC health."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

from parley.devstack.errors import DevstackError
from parley.devstack.ports import LOOPBACK
from parley.devstack.processes import Process, ProcessExited, wait_until

__all__ = ["Service", "ServiceSpec", "find_script", "grpc_serving", "migrate"]

_HEALTH_CHECK = "/grpc.health.v1.Health/Check"

# A restarting server must be noticed quickly, not after gRPC's default reconnect back-off.
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]


def find_script(name: str) -> Path:
    """A console script installed in the same environment as the running interpreter."""
    path = Path(sys.executable).parent / name
    if not path.is_file():
        raise DevstackError(f"{name} is not installed next to {sys.executable}; run `uv sync`")
    return path


def migrate(script: str, environ: Mapping[str, str], *, timeout: float = 120.0) -> None:
    """Bring one service's database schema up to date with `<script> migrate`."""
    what = f"{script} migrate"
    command = [str(find_script(script)), "migrate"]
    try:
        result = subprocess.run(
            command,
            env=dict(environ),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise DevstackError(f"{what} did not finish within {timeout:g}s") from None
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise DevstackError(
            f"{what} failed with code {result.returncode}:\n" + (output.strip() or "(no output)")
        )
    sys.stderr.write(output)


def grpc_serving(channel: grpc.Channel, service: str, timeout: float = 1.0) -> bool:
    """True when the grpc.health.v1 status of `service` is SERVING."""
    check = channel.unary_unary(
        _HEALTH_CHECK,
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    try:
        response = check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout, wait_for_ready=True
        )
    except grpc.RpcError:
        return False
    return response.status == health_pb2.HealthCheckResponse.SERVING


@dataclass(frozen=True)
class ServiceSpec:
    """How to run one service: its script, its gRPC service name and where it listens."""

    title: str
    script: str
    health_name: str
    port: int
    metrics_port: int

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def metrics_address(self) -> str:
        return f"{LOOPBACK}:{self.metrics_port}"


class Service:
    """A running service process; its output goes straight to the terminal."""

    def __init__(self, spec: ServiceSpec, environ: Mapping[str, str]) -> None:
        self.spec = spec
        env = dict(environ)
        env["PARLEY_GRPC_PORT"] = str(spec.port)
        env["PARLEY_METRICS_PORT"] = str(spec.metrics_port)
        self.process = Process(
            f"{spec.title} ({spec.script} serve)", [str(find_script(spec.script)), "serve"], env=env
        )

    def wait_serving(self, timeout: float) -> None:
        """Wait until health reports SERVING; fail if the process exits first."""
        spec = self.spec
        with grpc.insecure_channel(spec.address, options=_CHANNEL_OPTIONS) as channel:
            try:
                wait_until(
                    lambda: grpc_serving(channel, spec.health_name),
                    timeout=timeout,
                    what=f"{spec.health_name} to report SERVING on {spec.address}",
                    watch=[self.process],
                )
            except ProcessExited as exc:
                raise DevstackError(f"{exc} during start-up (its output is above)") from None
