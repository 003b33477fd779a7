"""A Node.js client (@grpc/grpc-js, @grpc/proto-loader on proto/user.proto) uses the service."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from parley.proto import user_pb2, user_pb2_grpc

CALL_TIMEOUT = 10.0
RUN_TIMEOUT = 60.0


@pytest.fixture(scope="session")
def node_client(node_dir: Path) -> Path:
    return node_dir / "client.js"


def _run(client: Path, addr: str, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    node = shutil.which("node")
    assert node is not None
    return subprocess.run(
        [node, str(client), *args],
        cwd=client.parent,
        env={**os.environ, "PARLEY_USER_ADDR": addr, "PARLEY_TOKEN": token},
        capture_output=True,
        encoding="utf-8",
        timeout=RUN_TIMEOUT,
    )


def _fields(user: dict[str, Any]) -> tuple[int, str, str, int]:
    return user["id"], user["name"], user["email"], user["age"]


def test_node_client_creates_gets_and_lists_a_user(
    node_client: Path,
    user_addr: str,
    token: str,
    users: user_pb2_grpc.UserServiceStub,
    auth: tuple[tuple[str, str], ...],
    new_email: Callable[[], str],
    created_ids: list[int],
) -> None:
    email = new_email()

    result = _run(node_client, user_addr, token, "Zoë Node", email, "41")

    assert result.returncode == 0, f"the Node.js client failed:\n{result.stdout}{result.stderr}"
    output = json.loads(result.stdout)
    created = output["created"]
    assert created["success"] is True
    user_id = created["user"]["id"]
    created_ids.append(user_id)
    assert _fields(created["user"]) == (user_id, "Zoë Node", email, 41)
    assert int(created["user"]["create_time"]["seconds"]) > 0
    assert output["got"] == created["user"]
    assert output["listed"]["user"] == created["user"]
    assert output["listed"]["pages"] >= 1

    # The Python stub sees exactly what the Node.js client stored.
    stored = users.GetUser(
        user_pb2.GetUserRequest(id=user_id), metadata=auth, timeout=CALL_TIMEOUT
    ).user
    assert (stored.id, stored.name, stored.email, stored.age) == _fields(created["user"])


def test_node_client_reports_the_status_of_a_refused_call(
    node_client: Path, user_addr: str, readonly_token: str, new_email: Callable[[], str]
) -> None:
    result = _run(node_client, user_addr, readonly_token, "Read Only", new_email(), "20")

    assert result.returncode == 1, result.stdout
    assert result.stdout == ""
    error = json.loads(result.stderr)["error"]
    assert error["code"] == "PERMISSION_DENIED"
    assert "users:write" in error["details"]
