"""The one launcher: a service process on ports it picks, kept across a restart; an in-process
app; and a whole stack whose replicas reach their UserService."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from parley.testing.launcher import SERVING, Launcher, service_env


async def test_process_picks_its_ports_and_keeps_them_across_a_restart(
    launcher: Launcher, database: str, health: Callable[[int, str], Awaitable[int]]
) -> None:
    served = await launcher.process("user", service_env(database))
    port, metrics_port, first_pid = served.port, served.metrics_port, served.pid
    assert port > 0 and metrics_port > 0 and port != metrics_port
    assert await health(port, "user.UserService") == SERVING

    await launcher.kill(served)
    assert not served.alive()
    await launcher.restart(served)
    assert (served.port, served.metrics_port) == (port, metrics_port)
    assert served.pid != first_pid
    assert await health(port, "user.UserService") == SERVING

    seconds, code = await launcher.terminate(served)
    assert code == 0, served.log_text()
    assert seconds < 30
    assert served.log_text().count("serving gRPC on") == 2


async def test_a_process_that_cannot_start_fails_the_test_with_its_log(
    launcher: Launcher, database: str
) -> None:
    env = service_env(database, PARLEY_MAX_UNARY_CALLS="many")
    with pytest.raises(pytest.fail.Exception, match="PARLEY_MAX_UNARY_CALLS"):
        await launcher.process("user", env)


async def test_in_process_app(launcher: Launcher, database: str) -> None:
    served = await launcher.app("user", service_env(database))
    assert served.app is not None and served.port > 0
    with pytest.raises(AssertionError):
        _ = served.pid
    await launcher.stop(served)
    assert served.app is None


async def test_whole_stack(make_stack: Callable[..., Awaitable[Any]], token: Any) -> None:
    stack = await make_stack(replicas=2, people=("Ada",))
    assert len(stack.replicas) == 2
    assert len({stack.users.port, *(r.port for r in stack.replicas)}) == 3
    assert stack.people["Ada"].id > 0
