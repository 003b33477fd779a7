"""Time from spawning `parley-user serve` / `parley-chat serve` to its readiness reporting
SERVING (grpc.health.v1, the service's own name: dependencies reached, schema current).

Each run starts one more process of the service on free ports, beside the running stack and
against its database and Redis, polls its port every few milliseconds and then its health, and
stops it with SIGTERM."""

from __future__ import annotations

import socket
import statistics
import tempfile
import time
from pathlib import Path

from parley.bench.plan import Plan
from parley.bench.report import Report, Row
from parley.bench.target import Target
from parley.devstack.errors import DevstackError
from parley.devstack.ports import free_ports
from parley.devstack.processes import wait_until
from parley.devstack.services import Service, ServiceSpec
from parley.proto.contract import CHAT_SERVICE, USER_SERVICE

__all__ = ["measure_startup", "time_to_serving"]

TIMEOUT = 30.0
POLL = 0.005


def _accepting(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def time_to_serving(script: str, health_name: str, environ: dict[str, str]) -> float:
    """Seconds from spawning `<script> serve` (devstack's Service, as `make run` starts it) to
    `health_name` SERVING. The port is polled first, so the health check need not wait out a
    gRPC reconnect back-off."""
    port, metrics_port = free_ports(2)
    spec = ServiceSpec(f"{script} (start-up run)", script, health_name, port, metrics_port)
    with tempfile.TemporaryDirectory(prefix="parley-bench-startup-") as directory:
        started = time.perf_counter()
        service = Service(spec, environ, log_path=Path(directory) / "serve.log")
        try:
            wait_until(
                lambda: _accepting(port),
                timeout=TIMEOUT,
                what=f"{script} serve to open its port",
                watch=[service.process],
                interval=POLL,
            )
            service.wait_serving(TIMEOUT, interval=POLL)
            return time.perf_counter() - started
        except DevstackError as exc:
            raise RuntimeError(f"{exc}\n{service.log_text()[-2000:]}") from None
        finally:
            service.stop()


def measure_startup(target: Target, plan: Plan, report: Report) -> None:
    services = [
        ("parley-user serve", "parley-user", USER_SERVICE),
        ("parley-chat serve", "parley-chat", CHAT_SERVICE),
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
