"""Time from spawning `parley-user serve` / `parley-chat serve` to its readiness reporting
SERVING (grpc.health.v1, the service's own name: dependencies reached, schema current).

Each run starts one more process of the service on free ports, beside the running stack and
against its database and Redis, polls its port every few milliseconds and then its health, and
stops it with SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import time

import grpc
from grpc_health.v1 import health_pb2

from parley.bench.plan import Plan
from parley.bench.report import Report, Row
from parley.bench.target import Target
from parley.devstack.ports import free_ports
from parley.devstack.services import find_script

__all__ = ["measure_startup", "time_to_serving"]

TIMEOUT = 30.0
POLL = 0.005


def _accepting(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def time_to_serving(script: str, health_name: str, environ: dict[str, str]) -> float:
    """Seconds from spawning `<script> serve` to `health_name` SERVING."""
    port, metrics_port = free_ports(2)
    env = dict(environ, PARLEY_GRPC_PORT=str(port), PARLEY_METRICS_PORT=str(metrics_port))
    command = [str(find_script(script)), "serve"]
    started = time.perf_counter()
    process = subprocess.Popen(
        command,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = started + TIMEOUT
        while not _accepting(port):
            if process.poll() is not None:
                raise RuntimeError(f"{script} serve exited with {process.returncode}")
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{script} serve did not open its port in {TIMEOUT:g} s")
            time.sleep(POLL)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = channel.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
            request = health_pb2.HealthCheckRequest(service=health_name)
            while True:
                try:
                    reply = health(request, timeout=1.0, wait_for_ready=True)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return time.perf_counter() - started
                except grpc.RpcError:
                    pass
                if process.poll() is not None:
                    raise RuntimeError(f"{script} serve exited with {process.returncode}")
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"{script} serve not SERVING after {TIMEOUT:g} s")
                time.sleep(POLL)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def measure_startup(target: Target, plan: Plan, report: Report) -> None:
    services = [
        ("parley-user serve", "parley-user", "user.UserService"),
        ("parley-chat serve", "parley-chat", "chat.ChatService"),
    ]
    for title, script, health_name in services:
        name = f"start to SERVING: `{title}`"
        if target.environ is None:
            report.add(Row(name=name, notes="skipped: needs a stack started by the harness"))
            continue
        times = [
            time_to_serving(script, health_name, target.environ) for _ in range(plan.startup_runs)
        ]
        slowest = max(times)
        report.add(
            Row(
                name=name,
                p50=statistics.median(times),
                p99=slowest,
                target="< 2 s",
                passed=slowest < 2.0,
                notes=(
                    f"{len(times)} run(s): "
                    + ", ".join(f"{t:.2f} s" for t in times)
                    + "; the p99 column is the slowest run"
                ),
                details={"seconds": times},
            )
        )
