"""What tracing costs: GetUser and the chat fan-out against services with tracing off and on,
started side by side for this section and measured in the same run.

Three UserServices, and three pairs of chat replicas, start beside the run's stack (its
database and Redis; the chat replicas call its UserService), alike but for their OTEL_*
variables:

- off A and off B: none set, as a deployment that sets nothing runs;
- on: every span sampled (`parentbased_always_on`; the client sends no `traceparent`, so
  every call is a sampled root) and exported over OTLP/gRPC every 100 ms to devstack's
  OtlpReceiver.

They are loaded in turn, off A, on, off B, with the same client and load (half the other
rows' warm-up and duration, so the six runs fit in about a minute). B against A is an A/A
pair: two identical off servers, measured before and after on, whose ratio is the noise band
of this run. On is compared with the geometric mean of A and B, so a steady drift of the
machine over the three runs cancels. Beside the client's throughput and latency, each run
reads the servers' CPU time (/proc) per call they handled (their own metrics): on 2 shared
cores it moves less with scheduling than throughput and p99 do.

Why an A/A pair and not off against the code before tracing: one run cannot run two versions
of the code. Off (OTEL_* unset, or OTEL_SDK_DISABLED=true, which takes the same path) makes
no tracer provider and installs no interceptor; what it adds is a flag read
(`tracing.active()`) per call (the metrics interceptor), per chat message sent, published and
received, and per log line. That is far below what the harness resolves, and the A/A pair
says how much that is.

The receiver runs in a process of its own, not in the harness: the chat senders run in the
harness process, and a receiver decoding thousands of spans a second there would slow them
through the GIL, which would show as tracing's cost. It still shares the 2 cores; its CPU is
reported. The harness fails (an error, not a missed target) when the on run produced no span,
or an off run produced one or started a span exporter.
"""

from __future__ import annotations

import math
import multiprocessing
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from parley.bench.chat import STREAM_CHAT, ChatSetup, FanOutResult, chat_tokens, run_fan_out
from parley.bench.loadgen import FixedRequest, LoadResult, Workload
from parley.bench.plan import Plan, load_row
from parley.bench.procfs import cpu_seconds
from parley.bench.report import Report, Row, format_seconds
from parley.bench.scrape import metric_samples, metric_total
from parley.bench.target import Target
from parley.bench.unary import GET_USER, WRITE, make_reader
from parley.devstack.otlp import OtlpReceiver
from parley.devstack.ports import free_ports
from parley.devstack.processes import stop_all
from parley.devstack.services import Service, ServiceSpec
from parley.proto.contract import CHAT_SERVICE, ROOM_KEY, USER_SERVICE

__all__ = ["ChatRun", "UnaryRun", "chat_rows", "measure_tracing", "unary_rows"]

OFF_A, ON, OFF_B = "off A", "on", "off B"
ORDER = (OFF_A, ON, OFF_B)
# The counter a service registers once it has started its span exporter.
EXPORTER_METRIC = "parley_trace_spans_total"
_START_TIMEOUT = 60.0
_SETTLE = 0.3  # seconds with no new span before a run's spans are counted (exports: 100 ms)
_SETTLE_TIMEOUT = 15.0

_T = TypeVar("_T")
_R = TypeVar("_R")


def _serve_receiver(conn: Any) -> None:
    """The receiver's process: answers each 'count' with the spans so far by (service, kind)."""
    receiver = OtlpReceiver()
    try:
        conn.send(receiver.env())
        while True:
            try:
                command = conn.recv()
            except EOFError:
                return
            if command != "count":
                return
            conn.send(Counter((span.service, span.kind) for span in receiver.spans))
    finally:
        receiver.stop()


class _Receiver:
    """devstack's OtlpReceiver in a process of its own."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_serve_receiver, args=(child,), name="parley-bench-otlp", daemon=True
        )
        self._process.start()
        child.close()
        if not self._conn.poll(_START_TIMEOUT):
            self.stop()
            raise RuntimeError("the OTLP receiver's process did not start")
        self.env: dict[str, str] = self._conn.recv()

    def cpu(self) -> float:
        assert self._process.pid is not None
        return cpu_seconds(self._process.pid)

    def counts(self) -> Counter[tuple[str, str]]:
        self._conn.send("count")
        if not self._conn.poll(30):
            raise RuntimeError("the OTLP receiver did not answer")
        counts: Counter[tuple[str, str]] = self._conn.recv()
        return counts

    def settled(self) -> Counter[tuple[str, str]]:
        """The spans so far, once none has arrived for a moment."""
        last = self.counts()
        deadline = time.monotonic() + _SETTLE_TIMEOUT
        while time.monotonic() < deadline:
            time.sleep(_SETTLE)
            now = self.counts()
            if now == last:
                break
            last = now
        return last

    def stop(self) -> None:
        try:
            self._conn.send("stop")
        except OSError:
            pass  # it has ended already
        self._process.join(5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()


@dataclass(frozen=True)
class Observed:
    """What a run cost its servers, and the spans it produced."""

    seconds: float  # wall time of the run
    cpu: float  # the servers' CPU seconds over it
    counted: tuple[float, ...]  # how much each watched counter of theirs grew
    spans: dict[str, int] = field(default_factory=dict)  # spans that arrived, by kind
    span_services: tuple[str, ...] = ()  # the service.name of those spans
    receiver_cpu: float = 0.0  # the receiver's CPU seconds over the run
    exporting: bool = False  # whether a server has started a span exporter

    @property
    def span_count(self) -> int:
        return sum(self.spans.values())


def _read(
    services: Sequence[Service], counters: Sequence[tuple[str, dict[str, str]]]
) -> tuple[float, list[float], bool]:
    samples = [metric_samples(service.spec.metrics_address) for service in services]
    cpu = sum(cpu_seconds(service.process.pid) for service in services)
    totals = [sum(metric_total(s, name, **labels) for s in samples) for name, labels in counters]
    exporting = any(key.startswith(EXPORTER_METRIC) for s in samples for key in s)
    return cpu, totals, exporting


def _observe(
    receiver: _Receiver,
    services: Sequence[Service],
    counters: Sequence[tuple[str, dict[str, str]]],
    work: Callable[[], _T],
) -> tuple[_T, Observed]:
    """Runs `work` and reads what it cost `services` and which spans it produced."""
    spans_before = receiver.settled()
    receiver_before = receiver.cpu()
    cpu_before, totals_before, _ = _read(services, counters)
    started = time.monotonic()
    result = work()
    seconds = time.monotonic() - started
    cpu_after, totals_after, exporting = _read(services, counters)
    spans = receiver.settled() - spans_before
    by_kind: Counter[str] = Counter()
    for (_, kind), count in spans.items():
        by_kind[kind] += count
    observed = Observed(
        seconds=seconds,
        cpu=cpu_after - cpu_before,
        counted=tuple(
            after - before for after, before in zip(totals_after, totals_before, strict=True)
        ),
        spans=dict(by_kind),
        span_services=tuple(sorted({service for service, _ in spans})),
        receiver_cpu=receiver.cpu() - receiver_before,
        exporting=exporting,
    )
    return result, observed


def _check(label: str, observed: Observed, what: str) -> None:
    """Fails the harness unless `on` produced server spans and started its exporter, and
    `off` did neither."""
    if label == ON:
        if not observed.spans.get("server"):
            raise RuntimeError(
                f"{what} with tracing on: no server span reached the receiver "
                f"({observed.span_count} spans of other kinds)"
            )
        if not observed.exporting:
            raise RuntimeError(f"{what} with tracing on: no {EXPORTER_METRIC} in its metrics")
        return
    if observed.span_count:
        raise RuntimeError(
            f"{what} with tracing {label}: {observed.span_count} spans reached the receiver "
            f"during its run (from {', '.join(observed.span_services)})"
        )
    if observed.exporting:
        raise RuntimeError(
            f"{what} with tracing {label}: it started a span exporter ({EXPORTER_METRIC})"
        )


@dataclass(frozen=True)
class UnaryRun:
    """GetUser against one of the three UserServices."""

    label: str
    load: LoadResult
    observed: Observed  # counted: GetUser calls the server handled, warm-up included

    @property
    def handled(self) -> float:
        return self.observed.counted[0]

    @property
    def cpu_per_call(self) -> float:
        return self.observed.cpu / self.handled if self.handled else 0.0


@dataclass(frozen=True)
class ChatRun:
    """The chat fan-out against one of the three pairs of replicas."""

    label: str
    fan_out: FanOutResult
    observed: Observed  # counted: messages the replicas stored, and those they delivered

    @property
    def stored(self) -> float:
        return self.observed.counted[0]

    @property
    def delivered(self) -> float:
        return self.observed.counted[1]

    @property
    def cpu_per_delivery(self) -> float:
        return self.observed.cpu / self.delivered if self.delivered else 0.0

    @property
    def cpu_per_message(self) -> float:
        return self.observed.cpu / self.stored if self.stored else 0.0


@dataclass(frozen=True)
class _Comparison:
    """One measure of the three runs: off B against off A, and on against both."""

    name: str
    aa: float | None  # off B / off A
    on: float | None  # on / the geometric mean of off A and off B

    @property
    def band(self) -> float | None:
        return None if self.aa is None else abs(self.aa - 1)

    def aa_text(self) -> str:
        return f"{self.name} {_times(self.aa)}"

    def on_text(self) -> str:
        if self.on is None or self.band is None:
            return f"{self.name} {_times(self.on)}"
        where = "beyond" if abs(self.on - 1) > self.band else "within"
        return f"{self.name} {_times(self.on)} ({where} the noise band, ±{self.band:.1%})"


def _times(ratio: float | None) -> str:
    return "–" if ratio is None else f"{ratio:.2f}×"


def _compare(
    measures: Sequence[tuple[str, Callable[[_R], float]]], runs: dict[str, _R]
) -> list[_Comparison]:
    comparisons = []
    for name, value in measures:
        a, on, b = value(runs[OFF_A]), value(runs[ON]), value(runs[OFF_B])
        off = math.sqrt(a * b) if a > 0 and b > 0 else 0.0
        comparisons.append(_Comparison(name, b / a if a > 0 else None, on / off if off else None))
    return comparisons


def _micros(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} µs"


def _per(spans: dict[str, int], count: float) -> str:
    """Spans per call (or message), and by kind."""
    if not count:
        return "–"
    kinds = ", ".join(f"{n / count:.2f} {kind}" for kind, n in sorted(spans.items()))
    return f"{sum(spans.values()) / count:.2f}" + (f" ({kinds})" if kinds else "")


def _note(row: Row, text: str) -> None:
    """Puts `text` before what the row's notes already say (errors, missing deliveries)."""
    row.notes = text + ("; " + row.notes if row.notes else "")


_AA = (
    "A/A: two identical servers with tracing off (OTEL_* unset), measured before and after "
    "on: {ratios}; their distance from 1.00× is this run's noise band (one pair: a rough one). "
    "Off differs from the code before tracing only by a flag read per call, chat message and "
    "log line (no tracer provider, no interceptor, no span), far below that band: off is "
    "within noise"
)


def unary_rows(runs: dict[str, UnaryRun], plan: Plan) -> list[Row]:
    """The three GetUser rows: off A, off B with the noise band, on with its cost."""
    a, on, b = runs[OFF_A], runs[ON], runs[OFF_B]
    comparisons = _compare(
        [
            ("calls/s", lambda r: r.load.throughput),
            ("p50", lambda r: r.load.p50),
            ("p99", lambda r: r.load.p99),
            ("server CPU per call", lambda r: r.cpu_per_call),
        ],
        runs,
    )

    def row(name: str, run: UnaryRun) -> Row:
        made = load_row(name, run.load)
        made.details.update(
            handled=run.handled, cpu_per_call=run.cpu_per_call, observed=asdict(run.observed)
        )
        return made

    first = row("GetUser, tracing off (A)", a)
    first.ratio, first.ratio_basis = 1.0, "itself"
    _note(
        first,
        f"server CPU {_micros(a.cpu_per_call)} per call; {plan.warm_up:g} s warm-up + "
        f"{plan.duration:g} s measured per run, in the order off A, on, off B",
    )
    second = row("GetUser, tracing off again (B): the noise band", b)
    second.ratio, second.ratio_basis = comparisons[0].aa, "calls/s vs off A"
    second.target = "off within noise"
    _note(second, _AA.format(ratios=", ".join(c.aa_text() for c in comparisons)))
    third = row("GetUser, tracing on (every call sampled, exported over OTLP)", on)
    third.ratio, third.ratio_basis = comparisons[0].on, "calls/s vs off A and B"
    spans = on.observed.spans
    per_call = sum(spans.values()) / on.handled if on.handled else 0.0
    off_cpu = math.sqrt(a.cpu_per_call * b.cpu_per_call)
    _note(
        third,
        "against off A and B (their geometric mean): "
        + ", ".join(c.on_text() for c in comparisons)
        + f"; server CPU {_micros(off_cpu)} → {_micros(on.cpu_per_call)} a call "
        f"({(on.cpu_per_call - off_cpu) * 1e6:+,.0f} µs); "
        f"{per_call * on.load.throughput:,.0f} spans/s reached the receiver, "
        f"{_per(spans, on.handled)} a call, a server span for "
        f"{spans.get('server', 0) / on.handled if on.handled else 0:.0%} of the calls; "
        f"the receiver, a process of its own, used "
        f"{on.observed.receiver_cpu / on.observed.seconds:.2f} of a core",
    )
    third.details["spans_per_second"] = per_call * on.load.throughput
    return [first, second, third]


def chat_rows(runs: dict[str, ChatRun], plan: Plan) -> list[Row]:
    """The three chat fan-out rows: off A, off B with the noise band, on with its cost."""
    a, on, b = runs[OFF_A], runs[ON], runs[OFF_B]
    comparisons = _compare(
        [
            ("sender messages/s", lambda r: r.fan_out.saturated_messages),
            ("delivery p50", lambda r: r.fan_out.p50),
            ("delivery p99", lambda r: r.fan_out.p99),
            ("replica CPU per delivery", lambda r: r.cpu_per_delivery),
        ],
        runs,
    )
    label = f"chat fan-out, {a.fan_out.streams} streams on 2 replicas"

    def row(name: str, run: ChatRun) -> Row:
        result = run.fan_out
        troubles = []
        if result.stream_errors:
            ended = ", ".join(f"{n} {code}" for code, n in sorted(result.stream_errors.items()))
            troubles.append(f"streams ended with {ended}")
        if result.missing:
            troubles.append(f"{result.missing} latency-phase deliveries never arrived")
        return Row(
            name=name,
            throughput=result.saturated_messages,
            unit="messages/s",
            p50=result.p50,
            p99=result.p99,
            notes="; ".join(troubles),
            broken=result.saturated_messages <= 0 or result.p50 <= 0,
            details={
                "result": asdict(result),
                "stored": run.stored,
                "delivered": run.delivered,
                "cpu_per_delivery": run.cpu_per_delivery,
                "observed": asdict(run.observed),
            },
        )

    first = row(f"{label}, tracing off (A)", a)
    first.ratio, first.ratio_basis = 1.0, "itself"
    _note(
        first,
        f"throughput: messages a second {a.fan_out.senders} sender(s) got acknowledged at "
        f"saturation ({plan.chat_window} in flight each); p50 and p99: publish-to-deliver at "
        f"{a.fan_out.load_rate:,.0f} messages/s (half of off A's saturated rate, offered in "
        f"all three runs); replicas' CPU {_micros(a.cpu_per_delivery)} per delivery; "
        f"{plan.warm_up:g} s warm-up + {plan.duration:g} s measured per phase, in the order "
        "off A, on, off B",
    )
    second = row(f"{label}, tracing off again (B): the noise band", b)
    second.ratio, second.ratio_basis = comparisons[2].aa, "delivery p99 vs off A"
    second.target = "off within noise"
    _note(second, _AA.format(ratios=", ".join(c.aa_text() for c in comparisons)))
    third = row(f"{label}, tracing on (every span sampled, exported over OTLP)", on)
    third.ratio, third.ratio_basis = comparisons[2].on, "delivery p99 vs off A and B"
    spans = on.observed.spans
    off_cpu = math.sqrt(a.cpu_per_delivery * b.cpu_per_delivery)
    off_message = math.sqrt(a.cpu_per_message * b.cpu_per_message)
    rate = on.observed.span_count / on.observed.seconds if on.observed.seconds else 0.0
    _note(
        third,
        "against off A and B (their geometric mean): "
        + ", ".join(c.on_text() for c in comparisons)
        + f"; replicas' CPU {_micros(off_cpu)} → {_micros(on.cpu_per_delivery)} a delivery, "
        f"{format_seconds(off_message)} → {format_seconds(on.cpu_per_message)} a message stored; "
        f"{rate:,.0f} spans/s reached the receiver over the run, "
        f"{_per(spans, on.stored)} per message stored; the receiver, a process of its own, "
        f"used {on.observed.receiver_cpu / on.observed.seconds:.2f} of a core",
    )
    third.details["spans_per_second"] = rate
    return [first, second, third]


def _start(
    started: list[Service],
    ports: Iterator[int],
    script: str,
    health_name: str,
    replicas: int,
    environs: dict[str, dict[str, str]],
    logs: Path,
) -> dict[str, list[Service]]:
    """Spawns `replicas` processes of `script` for each environment, adding each to
    `started`; waits for none of them."""
    spawned: dict[str, list[Service]] = {}
    for label, environ in environs.items():
        spawned[label] = []
        for index in range(replicas):
            spec = ServiceSpec(
                f"{script} (tracing {label}, {index})",
                script,
                health_name,
                next(ports),
                next(ports),
            )
            log = logs / f"{script}-{label.replace(' ', '-')}-{index}.log"
            service = Service(spec, environ, log_path=log)
            started.append(service)
            spawned[label].append(service)
    return spawned


def _get_user(
    target: Target, users: dict[str, list[Service]], receiver: _Receiver, plan: Plan
) -> dict[str, UnaryRun]:
    reader = make_reader(target)
    metadata = (("authorization", f"Bearer {target.token('1', WRITE)}"),)
    labels = {"grpc_service": USER_SERVICE, "grpc_method": "GetUser"}
    handled = [("grpc_server_handled_total", labels)]
    runs: dict[str, UnaryRun] = {}
    for label in ORDER:
        workload = Workload(
            users[label][0].address, GET_USER, FixedRequest(reader.request), metadata=metadata
        )
        load, observed = _observe(receiver, users[label], handled, partial(plan.load, workload))
        _check(label, observed, "GetUser")
        runs[label] = UnaryRun(label, load, observed)
    return runs


def _chat(
    target: Target, chats: dict[str, list[Service]], receiver: _Receiver, plan: Plan
) -> dict[str, ChatRun]:
    listener_token, sender_tokens = chat_tokens(target, plan.chat_senders)
    counters: list[tuple[str, dict[str, str]]] = [
        ("parley_chat_messages_received_total", {}),
        ("parley_chat_messages_delivered_total", {}),
    ]
    runs: dict[str, ChatRun] = {}
    offered: float | None = None
    for label in ORDER:
        room = f"bench-tracing-{uuid.uuid4().hex[:8]}"
        replicas = chats[label]
        setup = ChatSetup(
            addresses=tuple(replica.address for replica in replicas),
            method=STREAM_CHAT,
            listener_metadata=(("authorization", f"Bearer {listener_token}"), (ROOM_KEY, room)),
            sender_metadata=tuple(
                (("authorization", f"Bearer {token}"), (ROOM_KEY, room)) for token in sender_tokens
            ),
        )
        # The latency phase offers every run off A's rate: latencies at one load.
        fan_out, observed = _observe(
            receiver, replicas, counters, partial(run_fan_out, setup, plan, offered)
        )
        _check(label, observed, "the chat fan-out")
        offered = offered or fan_out.load_rate
        runs[label] = ChatRun(label, fan_out, observed)
    return runs


def measure_tracing(target: Target, plan: Plan, report: Report) -> None:
    """GetUser, then the chat fan-out, each against off A, on and off B."""
    if target.environ is None:
        report.add(
            Row(name="tracing's cost", notes="skipped: needs a stack started by the harness")
        )
        return
    quick = plan.with_overrides(duration=plan.duration / 2, warm_up=plan.warm_up / 2)
    off = {k: v for k, v in target.environ.items() if not k.startswith("OTEL_")}
    started: list[Service] = []
    with (
        tempfile.TemporaryDirectory(prefix="parley-bench-tracing-") as scratch,
        ExitStack() as stack,
    ):
        receiver = _Receiver()
        stack.callback(receiver.stop)
        environs = {OFF_A: off, ON: {**off, **receiver.env}, OFF_B: off}
        # Every server at once, started in parallel and stopped (spans flushed) before the
        # receiver; each idles while the others are measured.
        stack.callback(lambda: stop_all([service.process for service in started]))
        ports = iter(free_ports(2 * 3 * len(environs)))
        logs = Path(scratch)
        users = _start(started, ports, "parley-user", USER_SERVICE, 1, environs, logs)
        chats = _start(started, ports, "parley-chat", CHAT_SERVICE, 2, environs, logs)
        for service in started:
            service.wait_serving(_START_TIMEOUT)
        for row in unary_rows(_get_user(target, users, receiver, quick), quick):
            report.add(row)
        for row in chat_rows(_chat(target, chats, receiver, quick), quick):
            report.add(row)
