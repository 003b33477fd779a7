"""Health checks and reflection are logged at DEBUG, never at INFO (issue 17), checked on a real
`parley-user serve`: calls on its gRPC port and on its health-only port."""

from __future__ import annotations

import uuid
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from parley.proto import user_pb2, user_pb2_grpc
from parley.proto.contract import HEALTH_SERVICE, REQUEST_ID_KEY, USER_SERVICE
from parley.testing.launcher import Launcher, Served, service_env
from parley.testing.metrics import scrape
from parley.testing.network import free_port
from parley.testing.tokens import bearer
from parley.testing.waiting import wait_until

SERVING = health_pb2.HealthCheckResponse.SERVING
REFLECTION_SERVICES = (
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)


def tagged(request_id: str) -> list[tuple[str, str]]:
    return [(REQUEST_ID_KEY, request_id)]


async def list_services(channel: grpc.aio.Channel, service: str, request_id: str) -> list[str]:
    """The services `service` (v1alpha or v1 reflection, the same messages) lists."""
    info = channel.stream_stream(
        f"/{service}/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    call = info(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
        metadata=tagged(request_id),
        timeout=5,
    )
    return [s.name async for r in call for s in r.list_services_response.service]


async def handled(served: Served, service: str, method: str, code: str) -> float:
    metrics = await scrape(served.metrics_port)
    samples = metrics.samples(
        "grpc_server_handled_total", grpc_service=service, grpc_method=method, grpc_code=code
    )
    return sum(float(sample.value) for sample in samples)


async def quiet_calls(served: Served, health_port: int) -> dict[str, str]:
    """Health Check and Watch, and reflection, each call with a request id of its own; returns
    what each request id was for, once the server has finished every call."""
    ids = {f"quiet-{what}-{uuid.uuid4().hex}": what for what in ("check", "watch", "health-port")}
    by_what = {what: request_id for request_id, what in ids.items()}
    v1alpha, v1 = REFLECTION_SERVICES
    wanted = {
        (HEALTH_SERVICE, "Check", "OK"): 2.0,
        (HEALTH_SERVICE, "Watch", "Canceled"): 1.0,
        (v1alpha, "ServerReflectionInfo", "OK"): 1.0,
        (v1, "ServerReflectionInfo", "OK"): 0.0,
    }
    before = {key: await handled(served, *key) for key in wanted}

    async with grpc.aio.insecure_channel(served.target) as channel:
        health: Any = health_pb2_grpc.HealthStub(channel)
        response = await health.Check(
            health_pb2.HealthCheckRequest(service=USER_SERVICE),
            metadata=tagged(by_what["check"]),
            timeout=5,
        )
        assert response.status == SERVING
        watch = health.Watch(
            health_pb2.HealthCheckRequest(service=USER_SERVICE), metadata=tagged(by_what["watch"])
        )
        assert (await watch.read()).status == SERVING
        watch.cancel()

        request_id = f"quiet-reflection-{uuid.uuid4().hex}"
        ids[request_id] = f"reflection {v1alpha}"
        listed = await list_services(channel, v1alpha, request_id)
        assert {USER_SERVICE, HEALTH_SERVICE, v1alpha} <= set(listed), listed
        if v1 in listed:  # grpcio-reflection serves v1 beside v1alpha where asked to
            request_id = f"quiet-reflection-{uuid.uuid4().hex}"
            ids[request_id] = f"reflection {v1}"
            assert USER_SERVICE in await list_services(channel, v1, request_id)
            wanted[(v1, "ServerReflectionInfo", "OK")] = 1.0

    async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        response = await health.Check(
            health_pb2.HealthCheckRequest(service=USER_SERVICE),
            metadata=tagged(by_what["health-port"]),
            timeout=5,
        )
        assert response.status == SERVING

    # The metrics count a call just before its line would be logged: once they show every
    # call, the next call's line comes after every line these calls could have left.
    async def all_handled() -> bool:
        for key, count in wanted.items():
            if await handled(served, *key) < before[key] + count:
                return False
        return True

    await wait_until(all_handled, 15, "the health and reflection calls to be handled")
    return ids


async def start(launcher: Launcher, database: str, level: str) -> tuple[Served, int]:
    health_port = free_port()
    served = await launcher.process(
        "user",
        service_env(database, PARLEY_LOG_LEVEL=level, PARLEY_HEALTH_PORT=str(health_port)),
    )
    return served, health_port


async def logged_marker(served: Served, token: Any) -> str:
    """A GetUser call that fails with NOT_FOUND (logged at INFO whatever the sampling), once
    its line is in the log; returns that line."""
    request_id = f"marker-{uuid.uuid4().hex}"
    async with grpc.aio.insecure_channel(served.target) as channel:
        stub: Any = user_pb2_grpc.UserServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetUser(
                user_pb2.GetUserRequest(id=987654),
                metadata=[*bearer(token("1")), *tagged(request_id)],
                timeout=5,
            )
        assert info.value.code() == grpc.StatusCode.NOT_FOUND

    def found() -> list[str]:
        return [line for line in served.log_text().splitlines() if request_id in line]

    lines: list[str] = await wait_until(found, 15, "the marker call's log line")
    assert len(lines) == 1, lines
    return lines[0]


async def test_health_checks_and_reflection_do_not_reach_the_info_log(
    database: str, launcher: Launcher, token: Any
) -> None:
    served, health_port = await start(launcher, database, "INFO")
    ids = await quiet_calls(served, health_port)
    marker = await logged_marker(served, token)
    assert " INFO parley.rpc " in marker and "GetUser NOT_FOUND" in marker

    log = served.log_text().splitlines()
    assert not [line for line in log if any(request_id in line for request_id in ids)], ids
    assert not [line for line in log if "grpc.health" in line or "ServerReflection" in line]
    # The launcher's readiness checks left nothing either: the marker is the only call logged.
    assert [line for line in log if " parley.rpc " in line] == [marker]


async def test_health_checks_and_reflection_are_logged_at_debug(
    database: str, launcher: Launcher, token: Any
) -> None:
    served, health_port = await start(launcher, database, "DEBUG")
    ids = await quiet_calls(served, health_port)
    await logged_marker(served, token)

    expected = {
        "check": "rpc /grpc.health.v1.Health/Check OK",
        "health-port": "rpc /grpc.health.v1.Health/Check OK",
        "watch": "rpc /grpc.health.v1.Health/Watch CANCELLED",
    }
    log = served.log_text().splitlines()
    for request_id, what in ids.items():
        lines = [line for line in log if f"[{request_id}]" in line and " parley.rpc " in line]
        assert len(lines) == 1, (what, lines)
        assert f" DEBUG parley.rpc [{request_id}] " in lines[0], lines[0]
        if what.startswith("reflection "):
            service = what.removeprefix("reflection ")
            assert f"rpc /{service}/ServerReflectionInfo OK" in lines[0], lines[0]
        else:
            assert expected[what] in lines[0], lines[0]
