"""A chat message sent on one replica and delivered on another is one traced path.

Every process exports its spans to a real OTLP receiver in this test process: the two chat
replicas, UserService, and the test's own client (OpenTelemetry's gRPC client instrumentation
with a tracer provider of the test's). The send is followed from the client's StreamChat span
to the replica's server span; the message's "chat send" span (a trace of its own, linked to
the stream's server span) has the store in Postgres and the publish on Redis under it; the
other replica's "chat deliver" span is linked to that send, and its read from Postgres is its
child.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from parley.proto import chat_pb2, chat_pb2_grpc
from parley.proto.contract import ROOM_KEY
from parley.testing.otlp import OtlpReceiver, ReceivedSpan
from parley.testing.tokens import bearer

ROOM = "traced"
STREAM_CHAT = "/chat.ChatService/StreamChat"
GET_USER = "/user.UserService/GetUser"


@pytest.fixture
def client_tracing(otlp_receiver: OtlpReceiver) -> Iterator[TracerProvider]:
    """The test's own tracer provider, exporting each span to the receiver as it ends."""
    provider = TracerProvider(resource=Resource.create({"service.name": "chat-test-client"}))
    exporter = OTLPSpanExporter(endpoint=otlp_receiver.endpoint, insecure=True)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        yield provider
    finally:
        provider.shutdown()


def _instance(served_pid: int, span: ReceivedSpan) -> bool:
    return str(span.resource.get("service.instance.id", "")).endswith(f":{served_pid}")


def _one(spans: list[ReceivedSpan], what: str, **match: object) -> ReceivedSpan:
    found = [s for s in spans if all(getattr(s, k) == v for k, v in match.items())]
    assert len(found) == 1, f"expected one {what}, found {len(found)}: {found}"
    return found[0]


async def test_a_message_sent_on_one_replica_is_traced_to_its_delivery_on_the_other(
    make_stack, otlp_receiver, client_tracing, wait_for
):
    traced = otlp_receiver.env()
    # No periodic re-read: replica B must learn of the message from its Redis hint.
    stack = await make_stack(
        replicas=2, user_overrides=traced, PARLEY_CHAT_RESYNC_INTERVAL="60", **traced
    )
    a, b = stack.replicas
    ada, grace = stack.people["Ada"], stack.people["Grace"]

    listener_channel = grpc.aio.insecure_channel(b.target)
    sender_channel = grpc.aio.insecure_channel(
        a.target, interceptors=aio_client_interceptors(tracer_provider=client_tracing)
    )
    try:
        listener = chat_pb2_grpc.ChatServiceStub(listener_channel).StreamChat(
            metadata=[*bearer(grace.token), (ROOM_KEY, ROOM)]
        )
        sender = chat_pb2_grpc.ChatServiceStub(sender_channel).StreamChat(
            metadata=[*bearer(ada.token), (ROOM_KEY, ROOM)]
        )
        # Both streams are in the room once each has its own first message back.
        await listener.write(chat_pb2.ChatMessage(text="listening", client_message_id="g1"))
        assert (await listener.read()).client_message_id == "g1"
        first = await sender.read()
        assert first.client_message_id == "g1"

        await sender.write(chat_pb2.ChatMessage(text="hello, traced", client_message_id="a1"))
        delivered = await listener.read()
        assert (delivered.text, delivered.client_message_id) == ("hello, traced", "a1")
        sender.cancel()
        listener.cancel()
        # OpenTelemetry's client span of a stream ends when the stream's responses end: read
        # the cancelled call once more so that it sees the end.
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await sender.read()
    finally:
        await sender_channel.close()
        await listener_channel.close()

    def the_send(spans: list[ReceivedSpan]) -> ReceivedSpan | None:
        sends = [
            s
            for s in spans
            if s.name == "chat send" and s.attributes.get("chat.sequence") == delivered.sequence
        ]
        return sends[0] if sends else None

    send = await otlp_receiver.arrival(the_send)

    def the_delivery(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
        return [
            s
            for s in spans
            if s.name == "chat deliver" and (send.trace_id, send.span_id) in s.links
        ]

    (deliver,) = await otlp_receiver.arrival(the_delivery)
    (client,) = await otlp_receiver.arrival(
        lambda spans: [s for s in spans if s.service == "chat-test-client" and s.kind == "client"]
    )
    trace_id = client.trace_id  # the stream's
    await otlp_receiver.arrival(
        lambda spans: [s for s in spans if s.trace_id == trace_id and s.service == "parley-user"]
    )
    # The stream's server span ends (and is exported) once the stream has.
    await otlp_receiver.arrival(
        lambda spans: [
            s
            for s in spans
            if s.trace_id == trace_id and (s.kind, s.name) == ("server", STREAM_CHAT)
        ]
    )
    spans = otlp_receiver.spans

    # The sender's side: client -> replica A's server span; the send -> Postgres and Redis.
    assert (client.trace_id, client.parent_span_id, client.name) == (trace_id, "", STREAM_CHAT)
    in_trace = [s for s in spans if s.trace_id == trace_id]
    server = _one(in_trace, "StreamChat server span", kind="server", name=STREAM_CHAT)
    assert server.parent_span_id == client.span_id
    assert server.service == "parley-chat" and _instance(a.pid, server)
    # The message: a trace of its own, linked to the stream's server span.
    assert (send.parent_span_id, send.kind) == ("", "producer")
    assert send.trace_id != trace_id and send.links == ((trace_id, server.span_id),)
    assert _instance(a.pid, send)
    children = [s for s in spans if s.parent_span_id == send.span_id]
    assert {s.trace_id for s in children} == {send.trace_id}
    statements = [s for s in children if s.attributes.get("db.system") == "postgresql"]
    assert statements, f"no Postgres span under the send: {children}"
    assert any("INSERT" in str(s.attributes.get("db.statement", "")) for s in statements)
    publishes = [s for s in children if s.attributes.get("db.system") == "redis"]
    assert [s.name for s in publishes] == ["PUBLISH"], children

    # Chat's call to UserService for the sender's name: a client span in the stream's trace,
    # and UserService's server span under it.
    lookup = _one(in_trace, "GetUser client span", kind="client", name=GET_USER)
    assert lookup.service == "parley-chat" and lookup.parent_span_id == server.span_id
    answered = _one(in_trace, "GetUser server span", kind="server", name=GET_USER)
    assert answered.service == "parley-user" and answered.parent_span_id == lookup.span_id

    # The receiver's side: replica B's delivery span is linked to the send and reads Postgres.
    assert deliver.kind == "consumer" and deliver.service == "parley-chat"
    assert _instance(b.pid, deliver)
    assert deliver.trace_id not in (trace_id, send.trace_id) and deliver.parent_span_id == ""
    reads = [s for s in spans if s.parent_span_id == deliver.span_id]
    assert any(s.attributes.get("db.system") == "postgresql" for s in reads), reads

    # Streams the clients left (cancelled) end their spans without an error line.
    for replica in (a, b):
        assert " ERROR " not in replica.log_text(), replica.log_text()[-3000:]
