"""The idle-streams row's parts: delivery times, their percentiles, the open-file limit, and a
crowd of streams on connections of their own against the bare broadcast server."""

from __future__ import annotations

import asyncio
import resource
import subprocess
from collections.abc import Iterator

import grpc
import pytest

from parley.bench import idle
from parley.bench.baseline import BROADCAST_METHOD, start_broadcast_server
from parley.bench.idle import Crowd, Fanout, Listening, delivery_times, raise_open_files


def test_delivery_times_are_sorted_seconds_and_count_what_never_came() -> None:
    times, missing = delivery_times(1_000_000_000, [1_300_000_000, None, 1_100_000_000, None])
    assert times == pytest.approx([0.1, 0.3])
    assert missing == 2
    assert delivery_times(5, []) == ([], 0)


def test_fanout_pools_every_round_and_keeps_each_rounds_p99() -> None:
    fanout = Fanout()
    fanout.add([0.01 * i for i in range(1, 101)], 0)  # 10 ms .. 1 s
    fanout.add([2.0], 3)
    assert len(fanout.times) == 101
    assert fanout.times == sorted(fanout.times)
    assert fanout.round_p99 == pytest.approx([0.99, 2.0])
    assert fanout.p50 == pytest.approx(0.51)
    assert fanout.p99 == pytest.approx(1.0)
    assert fanout.missing == 3
    assert "times" not in fanout.summary()
    assert Fanout().p99 == 0.0


@pytest.fixture
def open_files() -> Iterator[tuple[int, int]]:
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield limits
    resource.setrlimit(resource.RLIMIT_NOFILE, limits)


def test_raises_the_soft_open_file_limit_up_to_the_hard_one(open_files: tuple[int, int]) -> None:
    soft, hard = open_files
    if hard != resource.RLIM_INFINITY and hard < 64:
        pytest.skip("a hard limit too low to test with")
    resource.setrlimit(resource.RLIMIT_NOFILE, (32, hard))
    assert raise_open_files(48) == (32, 48)
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (48, hard)
    assert raise_open_files(40) == (48, 48)  # never lowered
    if hard != resource.RLIM_INFINITY:
        assert raise_open_files(hard + 1000) == (48, hard)  # never past the hard limit


def _connections(port: str) -> int:
    out = subprocess.run(
        ["ss", "-tnH", "state", "established", f"dport = :{port}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return len(out.strip().splitlines())


def test_a_crowd_on_connections_of_its_own_hears_every_round(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(idle, "STREAMS_PER_CONNECTION", 10)
    monkeypatch.setattr(idle, "OPEN_WAVE", 12)

    async def run(address: str, pid: int) -> tuple[Fanout, int, int]:
        crowd = Crowd(address, BROADCAST_METHOD, (), 25)
        sender_channel = grpc.aio.insecure_channel(address)
        try:
            await crowd.open()
            connections = _connections(address.rsplit(":", 1)[1])
            sender = Listening(sender_channel, (), BROADCAST_METHOD)
            await sender.opened()
            fanout = await crowd.send_rounds(sender, 2, "hello", pid)
            await sender.close()
            ended = sum(crowd.ended().values())
        finally:
            await crowd.close()
            await sender_channel.close()
        return fanout, connections, ended

    with start_broadcast_server() as server:
        fanout, connections, ended = asyncio.run(run(server.address, server.pid))

    assert len(fanout.times) == 2 * 25
    assert fanout.missing == 0
    assert ended == 0
    assert 0 < fanout.p50 <= fanout.p99
    assert len(fanout.round_p99) == len(fanout.wall) == len(fanout.server_cpu) == 2
    assert connections == 3  # 25 streams at 10 a connection
