"""PARLEY_ACCESS_LOG_SAMPLE (issue 17): the share of successful calls that get an access line;
failed calls always do, sampled lines say so, and the start-up line names the sampling."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from parley.chassis.observability import AccessLog
from parley.proto import user_pb2, user_pb2_grpc
from parley.proto.contract import REQUEST_ID_KEY, USER_SERVICE
from parley.testing.launcher import Launcher, Served, run_to_exit, service_env
from parley.testing.metrics import sample_key, scrape_metrics
from parley.testing.tokens import bearer
from parley.testing.waiting import wait_until

# Binomial(400, 0.5) leaves [135, 265] with probability 3.9e-11.
CALLS = 400
LEAST, MOST = 135, 265


def lines_with(served: Served, text: str) -> list[str]:
    return [line for line in served.log_text().splitlines() if text in line]


def startup_line(served: Served) -> str:
    lines = lines_with(served, "serving gRPC on ")
    assert len(lines) == 1, lines
    return lines[0]


class UserCalls:
    """Calls of one client to a UserService, each with a request id the test chooses."""

    def __init__(self, channel: grpc.aio.Channel, token: Callable[..., str]) -> None:
        self._stub: Any = user_pb2_grpc.UserServiceStub(channel)
        self._auth = bearer(token("1", "users:write"))

    def _metadata(self, request_id: str) -> list[tuple[str, str]]:
        return [*self._auth, (REQUEST_ID_KEY, request_id)]

    async def create(self, request_id: str) -> int:
        name = uuid.uuid4().hex[:8]
        response = await self._stub.CreateUser(
            user_pb2.CreateUserRequest(name=name, email=f"{name}@example.com", age=30),
            metadata=self._metadata(request_id),
            timeout=10,
        )
        return int(response.user.id)

    async def get(self, user_id: int, request_id: str) -> None:
        await self._stub.GetUser(
            user_pb2.GetUserRequest(id=user_id), metadata=self._metadata(request_id), timeout=10
        )

    async def get_missing(self, request_id: str) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await self.get(987654, request_id)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def failed_call_line(served: Served, calls: UserCalls) -> str:
    """A NOT_FOUND GetUser, once its access line is in the log: every line of the calls
    made before it is in the log by then too."""
    request_id = f"failed-{uuid.uuid4().hex}"
    await calls.get_missing(request_id)
    lines: list[str] = await wait_until(
        lambda: lines_with(served, request_id), 15, "the failed call's access line"
    )
    assert len(lines) == 1, lines
    return lines[0]


async def start(launcher: Launcher, database: str, **env: str) -> Served:
    return await launcher.process("user", service_env(database, **env))


async def test_every_call_is_logged_by_default(
    database: str, launcher: Launcher, token: Callable[..., str]
) -> None:
    served = await start(launcher, database)
    assert startup_line(served).endswith("; access log: every call")
    async with grpc.aio.insecure_channel(served.target) as channel:
        calls = UserCalls(channel, token)
        user_id = await calls.create(f"create-{uuid.uuid4().hex}")
        prefix = f"get-{uuid.uuid4().hex}"
        for number in range(20):
            await calls.get(user_id, f"{prefix}-{number}")
        await failed_call_line(served, calls)
    access = lines_with(served, "rpc /user.UserService/GetUser OK")
    assert len(access) == 20
    assert all(f"[{prefix}-" in line for line in access)
    assert "sampled=" not in served.log_text()


@pytest.mark.parametrize("log_format", ["plain", "json"])
async def test_sample_zero_logs_failed_calls_only(
    database: str, launcher: Launcher, token: Callable[..., str], log_format: str
) -> None:
    served = await start(
        launcher, database, PARLEY_ACCESS_LOG_SAMPLE="0", PARLEY_LOG_FORMAT=log_format
    )
    assert "access log: every failed call and 0% of successful ones" in startup_line(served)
    created, got = f"create-{uuid.uuid4().hex}", f"get-{uuid.uuid4().hex}"
    async with grpc.aio.insecure_channel(served.target) as channel:
        calls = UserCalls(channel, token)
        user_id = await calls.create(created)
        await calls.get(user_id, got)
        failed = await failed_call_line(served, calls)

    if log_format == "json":
        event = json.loads(failed)
        assert event["message"].startswith("rpc /user.UserService/GetUser NOT_FOUND")
        assert event["level"] == "INFO"
        assert "sampled" not in event
    else:
        assert " INFO parley.rpc " in failed and "GetUser NOT_FOUND" in failed
        assert "sampled=" not in failed
    # The servicer's own line stays: sampling is about access lines only.
    assert [f"created user {user_id}" in line for line in lines_with(served, created)] == [True]
    assert lines_with(served, got) == []
    assert lines_with(served, "rpc /user.UserService/CreateUser") == []

    # The metrics still count every call.
    samples = await asyncio.to_thread(scrape_metrics, served.metrics_port)
    for code in ("OK", "NotFound"):
        key = sample_key(
            "grpc_server_handled_total",
            grpc_code=code,
            grpc_method="GetUser",
            grpc_service=USER_SERVICE,
            grpc_type="unary",
        )
        assert samples[key] == 1, key


@pytest.mark.parametrize("log_format", ["plain", "json"])
async def test_sample_half_logs_about_half_and_says_so(
    database: str, launcher: Launcher, token: Callable[..., str], log_format: str
) -> None:
    served = await start(
        launcher, database, PARLEY_ACCESS_LOG_SAMPLE="0.5", PARLEY_LOG_FORMAT=log_format
    )
    assert "access log: every failed call and 50% of successful ones" in startup_line(served)
    prefix = f"get-{uuid.uuid4().hex}"
    async with grpc.aio.insecure_channel(served.target) as channel:
        calls = UserCalls(channel, token)
        user_id = await calls.create(f"create-{uuid.uuid4().hex}")
        for number in range(CALLS):
            await calls.get(user_id, f"{prefix}-{number}")
        failed = await failed_call_line(served, calls)

    logged = lines_with(served, prefix)
    assert LEAST <= len(logged) <= MOST, len(logged)
    # Each call was logged at most once, with the sampling noted on its line.
    numbers = [re.search(rf"{prefix}-(\d+)", line) for line in logged]
    assert len({number.group(1) for number in numbers if number is not None}) == len(logged)
    if log_format == "json":
        events = [json.loads(line) for line in logged]
        assert all(e["message"].startswith("rpc /user.UserService/GetUser OK") for e in events)
        assert all(e["sampled"] == "0.5" for e in events)
        assert "sampled" not in json.loads(failed)
    else:
        assert all("rpc /user.UserService/GetUser OK" in line for line in logged)
        assert all(line.endswith(" sampled=0.5") for line in logged), logged[:3]
        assert "sampled=" not in failed


@pytest.mark.parametrize("value", ["1.5", "-1", "abc", "nan", "50%"])
def test_a_bad_sample_stops_start_up_with_one_line(value: str) -> None:
    environ = {
        "PARLEY_DATABASE_URL": "postgresql://parley@127.0.0.1:1/parley",
        "PARLEY_JWT_SECRET": uuid.uuid4().hex * 2,
        "PARLEY_GRPC_HOST": "127.0.0.1",
        "PARLEY_GRPC_PORT": "0",
        "PARLEY_METRICS_HOST": "127.0.0.1",
        "PARLEY_METRICS_PORT": "0",
        "PARLEY_ACCESS_LOG_SAMPLE": value,
    }
    result = run_to_exit("user", environ)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("parley-user: configuration error: PARLEY_ACCESS_LOG_SAMPLE: ")
    assert repr(value) in lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("sample", "described", "field"),
    [
        (1.0, "every call", None),
        (0.0, "every failed call and 0% of successful ones", "0"),
        (0.25, "every failed call and 25% of successful ones", "0.25"),
    ],
)
def test_access_log_describes_its_sampling(
    sample: float, described: str, field: str | None
) -> None:
    access = AccessLog(sample)
    assert access.describe() == described
    assert access.fields == (None if field is None else {"sampled": field})


@pytest.mark.parametrize("sample", [0.001, 0.004])
def test_a_small_sample_is_not_described_as_none(sample: float) -> None:
    assert " 0% of " not in AccessLog(sample).describe()
