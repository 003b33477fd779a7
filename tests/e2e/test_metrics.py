"""The UserService's Prometheus endpoint counts handled RPCs by service, method and code."""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from parley.proto import user_pb2, user_pb2_grpc

CALL_TIMEOUT = 10.0


@pytest.fixture
def metrics_url() -> str:
    addr = os.environ.get("PARLEY_USER_METRICS_ADDR", "").strip()
    if not addr:
        pytest.skip("PARLEY_USER_METRICS_ADDR is not set; the metrics endpoint is not checked")
    return f"http://{addr}/metrics"


def _handled(metrics_url: str) -> dict[tuple[str, str, str, str], float]:
    """grpc_server_handled_total by (grpc_type, grpc_service, grpc_method, grpc_code)."""
    with urllib.request.urlopen(metrics_url, timeout=CALL_TIMEOUT) as response:
        assert response.status == 200
        assert response.headers.get_content_type() == "text/plain"
        text = response.read().decode()
    handled: dict[tuple[str, str, str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "grpc_server_handled_total":
                labels = sample.labels
                key = (
                    labels["grpc_type"],
                    labels["grpc_service"],
                    labels["grpc_method"],
                    labels["grpc_code"],
                )
                handled[key] = sample.value
    return handled


def test_handled_rpcs_are_counted_with_their_code(
    metrics_url: str,
    users: user_pb2_grpc.UserServiceStub,
    auth: tuple[tuple[str, str], ...],
    create_user: Callable[..., user_pb2.User],
) -> None:
    user = create_user()
    got = users.GetUser(user_pb2.GetUserRequest(id=user.id), metadata=auth, timeout=CALL_TIMEOUT)
    assert got.user.id == user.id

    handled = _handled(metrics_url)

    assert handled, "the metrics endpoint exposes no grpc_server_handled_total"
    assert handled.get(("unary", "user.UserService", "GetUser", "OK"), 0) >= 1
    assert handled.get(("unary", "user.UserService", "CreateUser", "OK"), 0) >= 1
    # Every method of the service has its series from the start, failures included.
    assert ("server_stream", "user.UserService", "ListUsers", "NotFound") in handled
    assert ("client_stream", "user.UserService", "ImportUsers", "OK") in handled
