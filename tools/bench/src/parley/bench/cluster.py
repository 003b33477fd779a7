"""Chat delivery over a Redis Cluster against a single Redis, in the same run and with the
same client: the chat fan-out's latency phase (publish-to-deliver, listeners on both
replicas) on the run's two replicas and single Redis, then on two more replicas of the same
stack (same database and UserService) whose Redis is a local cluster of 3 primaries and 3
replicas (PARLEY_REDIS_CLUSTER=true, sharded pub/sub). Listeners on the replica the message
was not sent to get it through Redis, so their p50/p99 is what the cluster changes; both
latency phases offer the same rate (half the single Redis run's saturated rate).
"""

from __future__ import annotations

import tempfile
import uuid
from contextlib import ExitStack
from pathlib import Path

from parley.bench.chat import STREAM_CHAT, ChatSetup, FanOutResult, chat_tokens, run_fan_out
from parley.bench.plan import Plan
from parley.bench.report import Report, Row
from parley.bench.target import Target
from parley.devstack.ports import free_ports
from parley.devstack.redis_cluster import LocalRedisCluster
from parley.devstack.services import Service, ServiceSpec
from parley.proto.contract import CHAT_SERVICE, ROOM_KEY

__all__ = ["measure_cluster"]

_START_TIMEOUT = 60.0


def _replicas(stack: ExitStack, environ: dict[str, str], url: str, logs: Path) -> tuple[str, str]:
    """Two chat replicas of the run's stack on the cluster at `url`; stopped with `stack`."""
    addresses = []
    for index in range(2):
        port, metrics_port = free_ports(2)
        spec = ServiceSpec(
            f"parley-chat (cluster {index})", "parley-chat", CHAT_SERVICE, port, metrics_port
        )
        env = {**environ, "PARLEY_REDIS_URL": url, "PARLEY_REDIS_CLUSTER": "true"}
        service = Service(spec, env, log_path=logs / f"chat-cluster-{index}.log")
        stack.callback(service.stop)
        service.wait_serving(_START_TIMEOUT)
        addresses.append(spec.address)
    return addresses[0], addresses[1]


def _fan_out(
    target: Target, addresses: tuple[str, str], plan: Plan, offered_rate: float | None = None
) -> FanOutResult:
    room = f"bench-cluster-{uuid.uuid4().hex[:8]}"
    listener_token, sender_tokens = chat_tokens(target, plan.chat_senders)

    def metadata(token: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {token}"), (ROOM_KEY, room))

    setup = ChatSetup(
        addresses=addresses,
        method=STREAM_CHAT,
        listener_metadata=metadata(listener_token),
        sender_metadata=tuple(metadata(t) for t in sender_tokens),
    )
    return run_fan_out(setup, plan, offered_rate)


def _row(name: str, result: FanOutResult, baseline: FanOutResult | None) -> Row:
    row = Row(
        name=name,
        throughput=result.load_deliveries,
        unit="deliveries/s",
        p50=result.other_p50,
        p99=result.other_p99,
        notes=(
            f"listeners on the other replica, through Redis; all listeners: p50 "
            f"{result.p50 * 1000:.2f} ms, p99 {result.p99 * 1000:.2f} ms; "
            f"{result.load_rate:,.0f} messages/s offered"
            + (f"; {result.missing} deliveries never arrived" if result.missing else "")
        ),
        broken=result.other_p50 <= 0,
        details={"result": result.__dict__},
    )
    if baseline is None:
        row.ratio, row.ratio_basis = 1.0, "itself"
    elif baseline.other_p99 > 0:
        row.ratio = result.other_p99 / baseline.other_p99
        row.ratio_basis = "p99 vs single Redis"
    return row


def measure_cluster(target: Target, plan: Plan, report: Report) -> None:
    if target.environ is None:
        report.add(Row(name="chat over a Redis Cluster", notes="only on a stack this run starts"))
        return
    single = _fan_out(target, target.chats, plan)
    report.add(_row("chat delivery over a single Redis (baseline)", single, None))
    with tempfile.TemporaryDirectory(prefix="parley-bench-") as scratch, ExitStack() as stack:
        cluster = LocalRedisCluster(Path(scratch) / "cluster")
        cluster.start()
        stack.callback(cluster.stop)
        addresses = _replicas(stack, target.environ, cluster.url, Path(scratch))
        # The same offered rate as over the single Redis: latencies at one load.
        clustered = _fan_out(target, addresses, plan, single.load_rate)
    report.add(
        _row("chat delivery over a Redis Cluster (3 primaries, 3 replicas)", clustered, single)
    )
