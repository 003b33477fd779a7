"""The ChatService's public surface: health and reflection without a token, auth on StreamChat."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from parley.proto import chat_pb2, chat_pb2_grpc

CALL_TIMEOUT = 10.0


@pytest.mark.parametrize("service", ["", "chat.ChatService"])
def test_health_check_is_serving_without_a_token(chat_channel: grpc.Channel, service: str) -> None:
    response = health_pb2_grpc.HealthStub(chat_channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT
    )
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_chat_service_without_a_token(chat_channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(chat_channel)
    responses = list(
        stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
            timeout=CALL_TIMEOUT,
        )
    )
    assert len(responses) == 1
    names = {s.name for s in responses[0].list_services_response.service}
    assert "chat.ChatService" in names


@pytest.mark.parametrize(
    "metadata",
    [
        pytest.param((), id="no-token"),
        pytest.param((("authorization", "Bearer not-a-jwt"),), id="garbage-token"),
    ],
)
def test_stream_chat_without_a_valid_token_is_unauthenticated(
    chat_channel: grpc.Channel, metadata: tuple[tuple[str, str], ...]
) -> None:
    stream = chat_pb2_grpc.ChatServiceStub(chat_channel).StreamChat(
        iter([chat_pb2.ChatMessage(user="e2e", text="hello")]),
        metadata=metadata,
        timeout=CALL_TIMEOUT,
    )
    with pytest.raises(grpc.RpcError) as info:
        list(stream)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
