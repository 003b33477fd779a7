"""The load generator: worker processes, each with its own grpc.aio channel and a fixed number
of calls in flight, for a fixed time after a warm-up.

A workload is a picklable description (target, method, call pattern, metadata and where its
requests come from), so the same client drives Parley's services and the bare baselines. The
client never parses a reply: requests go out as bytes serialized once (or built per call where
they must differ, as CreateUser's e-mail addresses) and replies come back as bytes, so client
cost is the same whatever answers.

Workers start with multiprocessing's 'spawn' (no state inherited from the parent's event loop
or grpc), connect, then wait at a barrier, so all of them warm up and measure over the same
wall-clock window. A call counts when it both starts and ends inside the measured window;
each worker stops starting calls at the window's end and is bounded by a hard deadline, and
the parent kills any worker that outlives it.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import queue
import time
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

__all__ = [
    "CallResult",
    "LoadGenerator",
    "FixedRequest",
    "LoadResult",
    "RequestSource",
    "Workload",
    "percentile",
    "run_load",
]

# Calls that need more than this are recorded as DEADLINE_EXCEEDED errors.
CALL_TIMEOUT = 10.0
# How long workers may take to start (spawn, import grpc) and connect.
START_TIMEOUT = 60.0
# Generous room on top of warm-up + duration before a worker is killed.
STOP_SLACK = 15.0


class RequestSource(Protocol):
    """Where a workload's requests come from; implementations must be picklable."""

    def request(self, worker: int, sequence: int) -> bytes: ...


@dataclass(frozen=True)
class FixedRequest:
    """The same serialized request on every call."""

    payload: bytes

    def request(self, worker: int, sequence: int) -> bytes:
        return self.payload


@dataclass(frozen=True)
class Workload:
    """One kind of call: `kind` is 'unary' or 'server_stream' (items counted)."""

    target: str
    method: str
    requests: RequestSource
    kind: str = "unary"
    metadata: tuple[tuple[str, str], ...] = ()
    timeout: float = CALL_TIMEOUT


@dataclass
class CallResult:
    """What one worker measured (picklable, sent back to the parent)."""

    latencies: bytes = b""  # array('d') of seconds, one per successful call in the window
    items: int = 0  # streamed messages received by successful calls in the window
    errors: dict[str, int] = field(default_factory=dict)
    straddled: int = 0  # calls that started in the warm-up or ended after the window
    window: float = 0.0
    failure: str | None = None


@dataclass(frozen=True)
class LoadResult:
    """Every worker's calls in the measured window, merged."""

    calls: int
    items: int
    errors: dict[str, int]
    duration: float
    p50: float
    p99: float
    processes: int
    concurrency: int
    straddled: int = 0

    @property
    def throughput(self) -> float:
        """Successful calls a second."""
        return self.calls / self.duration if self.duration > 0 else 0.0

    @property
    def item_throughput(self) -> float:
        """Streamed items a second."""
        return self.items / self.duration if self.duration > 0 else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of already sorted values (0.0 when there are none)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(fraction * len(sorted_values) - 1e-9))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _passthrough(data: bytes) -> bytes:
    return data


async def _prime(unary: Any, stream: Any, workload: Workload, worker: int) -> None:
    """One call before the clock starts, so connection set-up is not in the window; its
    outcome does not matter (a failing workload shows in the measured calls)."""
    payload = workload.requests.request(worker, -1)
    try:
        if unary is not None:
            await unary(payload, metadata=workload.metadata, timeout=workload.timeout)
        else:
            async for _item in stream(
                payload, metadata=workload.metadata, timeout=workload.timeout
            ):
                pass
    except grpc.aio.AioRpcError:
        pass


async def _drive(
    job: int,
    workload: Workload,
    worker: int,
    in_flight: int,
    ready: Any,
    starts: Any,
    warm_up: float,
    duration: float,
) -> CallResult:
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(workload.target, options=options) as channel:
        await asyncio.wait_for(channel.channel_ready(), START_TIMEOUT)
        if workload.kind == "unary":
            unary = channel.unary_unary(
                workload.method, request_serializer=_passthrough, response_deserializer=_passthrough
            )
            stream = None
        elif workload.kind == "server_stream":
            unary = None
            stream = channel.unary_stream(
                workload.method, request_serializer=_passthrough, response_deserializer=_passthrough
            )
        else:
            raise ValueError(f"unknown call kind {workload.kind!r}")
        await _prime(unary, stream, workload, worker)
        # Every worker measures over the same wall-clock window, fixed once all are connected.
        ready.put((job, worker))
        start_at: float = await asyncio.to_thread(starts.get, True, START_TIMEOUT)
        await asyncio.sleep(max(0.0, start_at - time.time()))
        origin = time.perf_counter()
        measure_from = origin + warm_up
        measure_until = measure_from + duration
        latencies = array("d")
        errors: Counter[str] = Counter()
        items = 0
        straddled = 0
        metadata = workload.metadata
        timeout = workload.timeout
        counter = iter(range(1 << 62))

        async def one_slot() -> None:
            nonlocal items, straddled
            while True:
                started = time.perf_counter()
                if started >= measure_until:
                    return
                payload = workload.requests.request(worker, next(counter))
                received = 0
                try:
                    if unary is not None:
                        await unary(payload, metadata=metadata, timeout=timeout)
                    else:
                        assert stream is not None
                        async for _item in stream(payload, metadata=metadata, timeout=timeout):
                            received += 1
                    code = None
                except grpc.aio.AioRpcError as error:
                    code = error.code().name
                ended = time.perf_counter()
                if started < measure_from or ended > measure_until:
                    straddled += 1
                    continue
                if code is None:
                    latencies.append(ended - started)
                    items += received
                else:
                    errors[code] += 1

        await asyncio.gather(*(one_slot() for _ in range(in_flight)))
        return CallResult(
            latencies=latencies.tobytes(),
            items=items,
            errors=dict(errors),
            straddled=straddled,
            window=duration,
        )


def _serve(worker: int, jobs: Any, ready: Any, starts: Any, results: Any) -> None:
    """A worker process: runs one job after another until told to stop (None)."""
    while True:
        job = jobs.get()
        if job is None:
            return
        number, workload, in_flight, warm_up, duration = job
        try:
            result = asyncio.run(
                _drive(number, workload, worker, in_flight, ready, starts, warm_up, duration)
            )
        except BaseException as error:  # reported to the parent, which fails the run
            result = CallResult(failure=f"worker {worker}: {type(error).__name__}: {error}")
        results.put((number, worker, result))


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


class LoadGenerator:
    """Worker processes, spawned once and reused by every load test (a spawned interpreter
    costs about a second of CPU to start). A load test that fails or overruns ends them all;
    the next one starts fresh ones."""

    def __init__(self) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[Any] = []
        self._jobs: list[Any] = []
        self._queues: tuple[Any, Any, Any] | None = None
        self._job = 0

    def _ensure(self, count: int) -> tuple[Any, Any, Any]:
        if self._queues is None:
            context = self._context
            self._queues = (context.Queue(), context.Queue(), context.Queue())
        ready, starts, results = self._queues
        while len(self._workers) < count:
            index = len(self._workers)
            jobs: Any = self._context.Queue()
            process = self._context.Process(
                target=_serve,
                args=(index, jobs, ready, starts, results),
                name=f"parley-bench-worker-{index}",
                daemon=True,
            )
            process.start()
            self._workers.append(process)
            self._jobs.append(jobs)
        return self._queues

    def close(self) -> None:
        """Stops every worker (and kills any that does not stop)."""
        for jobs in self._jobs:
            jobs.put(None)
        for process in self._workers:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
        self._workers, self._jobs, self._queues = [], [], None

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(
        self,
        workload: Workload,
        *,
        processes: int,
        concurrency: int,
        duration: float,
        warm_up: float,
    ) -> LoadResult:
        """Runs `workload` with `concurrency` calls in flight in total over `processes`
        workers, for `warm_up` seconds unmeasured, then `duration` seconds measured."""
        if processes < 1 or concurrency < processes:
            raise ValueError("need at least one process and one call in flight per process")
        if duration <= 0 or warm_up < 0:
            raise ValueError("duration must be positive and warm-up not negative")
        ready, starts, results = self._ensure(processes)
        workers = self._workers[:processes]
        self._job += 1
        job = self._job
        for jobs, slots in zip(self._jobs, _split(concurrency, processes), strict=False):
            jobs.put((job, workload, slots, warm_up, duration))
        collected: dict[int, CallResult] = {}
        healthy = False
        try:
            # Once every worker has connected, all get the same start time, a moment ahead.
            connected = 0
            give_up = time.time() + START_TIMEOUT
            while connected < processes and time.time() < give_up:
                try:
                    number, _ = ready.get(timeout=0.5)
                    connected += number == job
                except queue.Empty:
                    if not all(p.is_alive() for p in workers):
                        break
            start_at = time.time() + 0.2
            for _ in workers:
                starts.put(start_at)
            deadline = start_at + warm_up + duration + CALL_TIMEOUT + STOP_SLACK
            while len(collected) < processes:
                remaining = deadline - time.time()
                if remaining <= 0:
                    break
                try:
                    number, index, result = results.get(timeout=min(remaining, 0.5))
                except queue.Empty:
                    if not all(p.is_alive() for p in workers):
                        break
                    continue
                if number == job:
                    collected[index] = result
            failures = [r.failure for r in collected.values() if r.failure]
            if len(collected) < processes:
                failures.append(f"{processes - len(collected)} worker(s) did not report in time")
            if failures:
                raise RuntimeError("load generator failed: " + "; ".join(failures))
            healthy = True
        finally:
            if not healthy:
                self.close()
        latencies = array("d")
        errors: Counter[str] = Counter()
        items = straddled = 0
        for result in collected.values():
            latencies.frombytes(result.latencies)
            errors.update(result.errors)
            items += result.items
            straddled += result.straddled
        ordered = sorted(latencies)
        return LoadResult(
            calls=len(ordered),
            items=items,
            errors=dict(errors),
            duration=duration,
            p50=percentile(ordered, 0.50),
            p99=percentile(ordered, 0.99),
            processes=processes,
            concurrency=concurrency,
            straddled=straddled,
        )


def run_load(
    workload: Workload,
    *,
    processes: int,
    concurrency: int,
    duration: float,
    warm_up: float,
) -> LoadResult:
    """One load test with worker processes of its own (see LoadGenerator.run)."""
    with LoadGenerator() as generator:
        return generator.run(
            workload,
            processes=processes,
            concurrency=concurrency,
            duration=duration,
            warm_up=warm_up,
        )
