"""Parley's own services: their console scripts, migrations, start-up and gRPC health."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

from parley.devstack.errors import DevstackError
from parley.devstack.logs import tail
from parley.devstack.ports import LOOPBACK
from parley.devstack.processes import POLL_INTERVAL, Process, ProcessExited, wait_until

__all__ = [
    "Service",
    "ServiceSpec",
    "find_script",
    "grpc_serving",
    "migrate",
    "run_to_exit",
]

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


def run_to_exit(
    script: str, command: str, environ: Mapping[str, str], *, timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run `<script> <command>` until it exits, its stdout and stderr apart; DevstackError if
    it is still running after `timeout` (it is killed then)."""
    try:
        return subprocess.run(
            [str(find_script(script)), command],
            env=dict(environ),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        said = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        raise DevstackError(
            f"{script} {command} did not finish within {timeout:g}s"
            + (f":\n{said}" if said else "")
        ) from None


def migrate(script: str, environ: Mapping[str, str], *, timeout: float = 120.0) -> None:
    """Bring one service's database schema up to date with `<script> migrate`."""
    result = run_to_exit(script, "migrate", environ, timeout=timeout)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise DevstackError(
            f"{script} migrate failed with code {result.returncode}:\n"
            + (output.strip() or "(no output)")
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
    """A service process: `<script> serve`, the one way Parley's tools and tests start one.

    Its output goes to `log_path` (appended to, across restarts) or else straight to the
    terminal. It starts at once unless `start` is false; `start()` starts it again, on the
    same ports, after it has ended.
    """

    def __init__(
        self,
        spec: ServiceSpec,
        environ: Mapping[str, str],
        *,
        log_path: Path | None = None,
        start: bool = True,
    ) -> None:
        if spec.port == 0 or spec.metrics_port == 0:
            raise DevstackError(f"{spec.title}: give it ports of its own (see free_ports), not 0")
        self.spec = spec
        self.environ = dict(environ)
        self.log_path = log_path
        self.starts = 0
        self._process: Process | None = None
        if start:
            self.start()

    @property
    def process(self) -> Process:
        if self._process is None:
            raise DevstackError(f"{self.spec.title} has not been started")
        return self._process

    @property
    def port(self) -> int:
        return self.spec.port

    @property
    def metrics_port(self) -> int:
        return self.spec.metrics_port

    @property
    def address(self) -> str:
        return self.spec.address

    def running(self) -> bool:
        return self._process is not None and self._process.running()

    def log_text(self) -> str:
        """Everything the service has written to its log, across restarts."""
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> Process:
        """Start `<script> serve` (again); it must not be running."""
        if self.running():
            raise DevstackError(f"{self.spec.title} is already running")
        env = dict(self.environ)
        env["PARLEY_GRPC_PORT"] = str(self.spec.port)
        env["PARLEY_METRICS_PORT"] = str(self.spec.metrics_port)
        command = [str(find_script(self.spec.script)), "serve"]
        name = f"{self.spec.title} ({self.spec.script} serve)"
        self.starts += 1
        if self.log_path is None:
            self._process = Process(name, command, env=env)
        else:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "ab") as output:
                self._process = Process(name, command, env=env, output=output)
        return self._process

    def wait_serving(
        self, timeout: float, name: str | None = None, *, interval: float = POLL_INTERVAL
    ) -> None:
        """Wait until health reports `name` (its own service by default; "" is the server as a
        whole) SERVING; fail if the process exits first."""
        name = self.spec.health_name if name is None else name
        try:
            with grpc.insecure_channel(self.spec.address, options=_CHANNEL_OPTIONS) as channel:
                wait_until(
                    lambda: grpc_serving(channel, name),
                    timeout=timeout,
                    what=f"{name} to report SERVING on {self.spec.address}",
                    watch=[self.process],
                    interval=interval,
                )
        except DevstackError as exc:
            where = f":\n{tail(self.log_path)}" if self.log_path else " (its output is above)"
            during = " during start-up" if isinstance(exc, ProcessExited) else ""
            raise DevstackError(f"{exc}{during}{where}") from None

    def stop(
        self,
        signum: signal.Signals = signal.SIGTERM,
        timeout: float = 15.0,
    ) -> None:
        """Send `signum` (SIGTERM: the service drains) and wait; SIGKILL after `timeout`."""
        if self._process is not None:
            self._process.stop(signum, timeout)
