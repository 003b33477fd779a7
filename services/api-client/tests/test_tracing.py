"""Client spans (issue 17): a CLIENT span per call, its W3C trace context in the metadata, and
no tracing interceptor at all when nobody traces.

The trace context is read where it arrives: by a real UserService exporting to a real OTLP
receiver (one CreateUser from the SDK down to Postgres), and by a small real gRPC server that
records the metadata of every call it gets, on all four call patterns.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc
from opentelemetry import context, trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from parley.client import (
    AsyncChatClient,
    AsyncUserClient,
    ChatClient,
    NewUser,
    NotFound,
    UserClient,
)
from parley.client._tracing import tracer_for
from parley.proto import chat_pb2, chat_pb2_grpc, user_pb2, user_pb2_grpc
from parley.proto.contract import REQUEST_ID_KEY
from parley.testing.launcher import Launcher, service_env
from parley.testing.otlp import OtlpReceiver, ReceivedSpan

if TYPE_CHECKING:
    from conftest import Person, RunningStack

TRACEPARENT = "traceparent"


# --- spans as the test's own provider sees them ---------------------------------------------


class EndedSpans(SpanProcessor):
    """Every span of a provider once it ended; `wait_for` waits on a condition, no polling."""

    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []
        self._changed = threading.Condition()

    def on_start(self, span: Span, parent_context: context.Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        with self._changed:
            self.spans.append(span)
            self._changed.notify_all()

    def named(self, name: str) -> list[ReadableSpan]:
        with self._changed:
            return [span for span in self.spans if span.name == name]

    def wait_for(self, *names: str, timeout: float = 10) -> list[ReadableSpan]:
        """The ended span of each name (one of each), once all have ended."""

        def ended() -> bool:
            return all(any(s.name == name for s in self.spans) for name in names)

        with self._changed:
            if not self._changed.wait_for(ended, timeout):
                got = [span.name for span in self.spans]
                pytest.fail(f"spans {names} did not end within {timeout}s; ended: {got}")
        found = [self.named(name) for name in names]
        assert all(len(each) == 1 for each in found), found
        return [each[0] for each in found]


@pytest.fixture
def provider() -> Iterator[tuple[TracerProvider, EndedSpans]]:
    """A tracer provider of the test's own (never the global one), and its ended spans."""
    ended = EndedSpans()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(ended)
    yield provider, ended
    provider.shutdown()


def ids(span: ReadableSpan) -> tuple[str, str]:
    assert span.context is not None
    return format(span.context.trace_id, "032x"), format(span.context.span_id, "016x")


def parent_id(span: ReadableSpan) -> str:
    return format(span.parent.span_id, "016x") if span.parent is not None else ""


def traceparent_of(span: ReadableSpan) -> str:
    assert span.context is not None
    trace_id, span_id = ids(span)
    return f"00-{trace_id}-{span_id}-{span.context.trace_flags:02x}"


# --- a server that records what each call carries -------------------------------------------


class Recorder:
    """The metadata of every call a `RecordingServer` got, by method name."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []
        self._lock = threading.Lock()

    def record(self, method: str, context: grpc.ServicerContext) -> None:
        metadata = {key: str(value) for key, value in context.invocation_metadata()}
        with self._lock:
            self.calls.append((method, metadata))

    def of(self, method: str) -> list[dict[str, str]]:
        with self._lock:
            return [metadata for name, metadata in self.calls if name == method]


class RecordingUsers(user_pb2_grpc.UserServiceServicer):
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def GetUser(
        self, request: user_pb2.GetUserRequest, context: grpc.ServicerContext
    ) -> user_pb2.GetUserResponse:
        self.recorder.record("GetUser", context)
        return user_pb2.GetUserResponse(user=user_pb2.User(id=request.id, name="Ada"))

    def ListUsers(
        self, request: user_pb2.ListUsersRequest, context: grpc.ServicerContext
    ) -> Iterator[user_pb2.User]:
        self.recorder.record("ListUsers", context)
        yield user_pb2.User(id=1, name="Ada")

    def ImportUsers(
        self, request_iterator: Iterator[user_pb2.CreateUserRequest], context: grpc.ServicerContext
    ) -> user_pb2.ImportUsersResponse:
        self.recorder.record("ImportUsers", context)
        # The asyncio client writes its rows once it has the headers of an admitted import.
        context.send_initial_metadata(((REQUEST_ID_KEY, "recorded"),))
        rows = [row for row in request_iterator if not row.commit]
        return user_pb2.ImportUsersResponse(created_count=len(rows))


class RecordingChat(chat_pb2_grpc.ChatServiceServicer):
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def ListMessages(
        self, request: chat_pb2.ListMessagesRequest, context: grpc.ServicerContext
    ) -> chat_pb2.ListMessagesResponse:
        self.recorder.record("ListMessages", context)
        return chat_pb2.ListMessagesResponse()  # an empty room

    def StreamChat(
        self, request_iterator: Iterator[chat_pb2.ChatMessage], context: grpc.ServicerContext
    ) -> Iterator[chat_pb2.ChatMessage]:
        self.recorder.record("StreamChat", context)
        context.send_initial_metadata(())  # a session waits for the stream's headers
        for sequence, message in enumerate(request_iterator, start=1):
            yield chat_pb2.ChatMessage(
                text=message.text, client_message_id=message.client_message_id, sequence=sequence
            )


@pytest.fixture
def recording_server() -> Iterator[tuple[str, Recorder]]:
    """A real gRPC server (threads, so sync clients may call it from an event loop's thread
    too) with UserService and ChatService methods that record each call's metadata."""
    recorder = Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    # The clients' service config checks health; a server without it gets a log line each time.
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    user_pb2_grpc.add_UserServiceServicer_to_server(RecordingUsers(recorder), server)
    chat_pb2_grpc.add_ChatServiceServicer_to_server(RecordingChat(recorder), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", recorder
    finally:
        server.stop(grace=None)


def _rows() -> list[NewUser]:
    return [NewUser("Row", f"row-{uuid.uuid4().hex[:12]}@example.com", 3)]


# --- (a) one CreateUser, from the SDK to Postgres -------------------------------------------


def _create_user_trace(
    spans: list[ReceivedSpan], caller_trace: str
) -> tuple[ReceivedSpan, ReceivedSpan, ReceivedSpan] | None:
    """The client, server and INSERT spans of the CreateUser in `caller_trace`, once all came."""
    mine = [s for s in spans if s.trace_id == caller_trace]
    client = [s for s in mine if s.kind == "client" and s.service == "sdk-test"]
    server = [s for s in mine if s.kind == "server" and s.service == "parley-user"]
    insert = [
        s
        for s in mine
        if s.service == "parley-user"
        and str(s.attributes.get("db.statement", "")).lstrip().upper().startswith("INSERT")
    ]
    if not (client and server and insert):
        return None
    assert (len(client), len(server), len(insert)) == (1, 1, 1), mine
    return client[0], server[0], insert[0]


async def test_a_create_user_is_one_trace_from_the_sdk_to_postgres(
    launcher: Launcher, database: str, otlp_receiver: OtlpReceiver, token: Callable[..., str]
) -> None:
    served = await launcher.process("user", service_env(database, **otlp_receiver.env()))
    provider = TracerProvider(
        resource=Resource.create({SERVICE_NAME: "sdk-test"}), shutdown_on_exit=False
    )
    provider.add_span_processor(
        SimpleSpanProcessor(OTLPSpanExporter(endpoint=otlp_receiver.endpoint, insecure=True))
    )
    try:
        with (
            UserClient(
                served.target, token=token("1", "users:write"), tracer_provider=provider
            ) as users,
            provider.get_tracer("test").start_as_current_span("sign up Ada") as caller,
        ):
            ada = users.create_user(name="Ada", email=f"ada-{uuid.uuid4().hex}@x.io", age=36)
        assert ada.id > 0
    finally:
        provider.shutdown()

    caller_trace = format(caller.get_span_context().trace_id, "032x")
    caller_id = format(caller.get_span_context().span_id, "016x")
    client, server, insert = otlp_receiver.wait_for(
        lambda spans: _create_user_trace(spans, caller_trace)
    )
    assert (client.name, client.kind) == ("/user.UserService/CreateUser", "client")
    assert client.parent_span_id == caller_id
    assert client.attributes["rpc.system"] == "grpc"
    assert (client.attributes["rpc.service"], client.attributes["rpc.method"]) == (
        "user.UserService",
        "CreateUser",
    )
    assert client.attributes["rpc.grpc.status_code"] == 0
    assert client.attributes["server.address"] == "127.0.0.1"
    assert client.attributes["server.port"] == served.port
    assert client.status_code == 0  # unset: the call worked

    assert (server.name, server.kind) == ("/user.UserService/CreateUser", "server")
    assert server.parent_span_id == client.span_id
    assert (insert.name, insert.kind) == ("INSERT", "client")
    assert insert.attributes["db.system"] == "postgresql"
    assert insert.parent_span_id == server.span_id
    assert {client.trace_id, server.trace_id, insert.trace_id} == {caller_trace}


# --- every call pattern carries its span's context ------------------------------------------


def test_sync_calls_send_their_spans_context_on_all_four_patterns(
    recording_server: tuple[str, Recorder], provider: tuple[TracerProvider, EndedSpans]
) -> None:
    address, recorder = recording_server
    tracer_provider, ended = provider
    tracer = tracer_provider.get_tracer("test")
    with (
        UserClient(address, token="t0ken", tracer_provider=tracer_provider) as users,
        ChatClient(address, token="t0ken", tracer_provider=tracer_provider) as chat,
        tracer.start_as_current_span("caller") as caller,
    ):
        assert users.get_user(7).id == 7  # unary-unary
        assert [u.id for u in users.list_users_page(page_size=1).users] == [1]  # unary-stream
        assert users.import_users(_rows()).created_count == 1  # stream-unary
        [posted] = chat.post("lobby", "hello")  # stream-stream, cancelled once echoed
        assert posted.text == "hello"

    methods = ("GetUser", "ListUsers", "ImportUsers", "StreamChat")
    spans = ended.wait_for(
        *(f"/user.UserService/{m}" for m in methods[:3]), "/chat.ChatService/StreamChat"
    )
    for method, span in zip(methods, spans, strict=True):
        assert span.kind is trace.SpanKind.CLIENT
        assert parent_id(span) == format(caller.get_span_context().span_id, "016x")
        [metadata] = recorder.of(method)
        assert metadata[TRACEPARENT] == traceparent_of(span), method
        assert metadata["authorization"] == "Bearer t0ken", "the token goes out too"
        assert span.status.status_code is trace.StatusCode.UNSET, (method, span.status)
    assert spans[3].attributes is not None
    # The SDK cancels the stream once every message came back: not a failure of the call.
    assert spans[3].attributes["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]


async def test_asyncio_calls_send_their_spans_context_on_all_four_patterns(
    recording_server: tuple[str, Recorder], provider: tuple[TracerProvider, EndedSpans]
) -> None:
    address, recorder = recording_server
    tracer_provider, ended = provider
    async with (
        AsyncUserClient(address, token="t0ken", tracer_provider=tracer_provider) as users,
        AsyncChatClient(address, token="t0ken", tracer_provider=tracer_provider) as chat,
    ):
        assert (await users.get_user(7)).id == 7
        assert [u.id for u in (await users.list_users_page(page_size=1)).users] == [1]
        # Written with call.write() after the headers: a tracing interceptor that held the
        # call back until its status came would leave this waiting for its deadline.
        assert (await users.import_users(_rows(), timeout=5)).created_count == 1
        [posted] = await chat.post("lobby", "hello")  # a short session: a bidi stream
        assert posted.text == "hello"

    methods = ("GetUser", "ListUsers", "ImportUsers", "StreamChat")
    spans = ended.wait_for(
        *(f"/user.UserService/{m}" for m in methods[:3]), "/chat.ChatService/StreamChat"
    )
    for method, span in zip(methods, spans, strict=True):
        assert span.kind is trace.SpanKind.CLIENT
        assert span.parent is None, "no span was current: each call is a trace of its own"
        [metadata] = recorder.of(method)
        assert metadata[TRACEPARENT] == traceparent_of(span), method
        assert metadata["authorization"] == "Bearer t0ken"
        assert span.status.status_code is trace.StatusCode.UNSET, (method, span.status)
    assert len({span.context.trace_id for span in spans if span.context is not None}) == 4


async def test_an_asyncio_call_is_a_child_of_the_current_span(
    recording_server: tuple[str, Recorder], provider: tuple[TracerProvider, EndedSpans]
) -> None:
    address, recorder = recording_server
    tracer_provider, ended = provider
    async with AsyncUserClient(address, token="t0ken", tracer_provider=tracer_provider) as users:
        with tracer_provider.get_tracer("test").start_as_current_span("caller") as caller:
            await users.get_user(7)
    [span] = ended.wait_for("/user.UserService/GetUser")
    assert parent_id(span) == format(caller.get_span_context().span_id, "016x")
    assert recorder.of("GetUser")[0][TRACEPARENT] == traceparent_of(span)


async def test_a_call_that_cannot_start_ends_its_span(
    recording_server: tuple[str, Recorder], provider: tuple[TracerProvider, EndedSpans]
) -> None:
    address, recorder = recording_server
    tracer_provider, ended = provider

    def no_token() -> str:
        raise RuntimeError("the token service is down")

    with (
        UserClient(address, token=no_token, tracer_provider=tracer_provider) as users,
        pytest.raises(RuntimeError, match="token service"),
    ):
        users.get_user(1)
    async with AsyncUserClient(address, token=no_token, tracer_provider=tracer_provider) as aio:
        with pytest.raises(RuntimeError, match="token service"):
            await aio.list_users_page()
    spans = ended.wait_for("/user.UserService/GetUser", "/user.UserService/ListUsers")
    for span in spans:
        assert span.status.status_code is trace.StatusCode.ERROR
        assert span.status.description == "RuntimeError: the token service is down"
    assert recorder.calls == []


def test_a_failed_call_is_a_failed_span(
    stack: RunningStack, provider: tuple[TracerProvider, EndedSpans]
) -> None:
    tracer_provider, ended = provider
    with (
        UserClient(stack.user, token=stack.admin_token, tracer_provider=tracer_provider) as users,
        pytest.raises(NotFound),
    ):
        users.get_user(2**31 - 1)
    [span] = ended.wait_for("/user.UserService/GetUser")
    assert span.status.status_code is trace.StatusCode.ERROR
    assert span.attributes is not None
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]


async def test_a_chat_session_and_an_import_end_their_spans(
    stack: RunningStack,
    person: Callable[[str], Person],
    room: str,
    provider: tuple[TracerProvider, EndedSpans],
) -> None:
    # Against the real services: the session's stream and the import's client stream end
    # their spans when they end, whoever ends them.
    tracer_provider, ended = provider
    ada = person("Ada")
    async with (
        AsyncChatClient(stack.chat, token=ada.token, tracer_provider=tracer_provider) as chat,
        AsyncUserClient(
            stack.user, token=stack.admin_token, tracer_provider=tracer_provider
        ) as users,
    ):
        async with chat.session(room) as session:
            stored = await session.wait_stored(await session.send("traced"), timeout=10)
            assert stored.text == "traced"
        assert (await users.import_users(_rows())).created_count == 1
    stream, imported = ended.wait_for(
        "/chat.ChatService/StreamChat", "/user.UserService/ImportUsers"
    )
    assert stream.status.status_code is trace.StatusCode.UNSET  # the session cancelled it
    assert imported.attributes is not None and imported.attributes["rpc.grpc.status_code"] == 0


# --- (c) nobody traces: no interceptor ------------------------------------------------------


def _no_global_provider() -> None:
    # PARLEY_TEST_CLIENT_TRACING=1 runs the suite with one (see conftest).
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        pytest.skip("a global tracer provider is installed in this test process")


async def test_without_a_provider_calls_carry_no_trace_context(
    recording_server: tuple[str, Recorder],
) -> None:
    _no_global_provider()
    assert tracer_for(None, "0") is None  # so the channels get no tracing interceptor
    address, recorder = recording_server
    with UserClient(address, token="t0ken") as users:
        users.get_user(1)
    async with AsyncUserClient(address, token="t0ken") as async_users:
        await async_users.get_user(2)
    calls = recorder.of("GetUser")
    assert len(calls) == 2
    for metadata in calls:
        assert metadata["authorization"] == "Bearer t0ken"
        assert TRACEPARENT not in metadata and "tracestate" not in metadata, metadata


_GLOBAL_LATER = """
import sys
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from parley.client import UserClient

early = UserClient(sys.argv[1], token="t0ken")
early.get_user(1)                        # nobody traces yet: this channel has no interceptor
unused = UserClient(sys.argv[1], token="t0ken")  # made now, first used below
trace.set_tracer_provider(TracerProvider())
early.get_user(2)                        # still its untraced channel
unused.get_user(3)                       # its channel opens now: traced
"""


def test_the_global_provider_counts_from_a_clients_first_call(
    recording_server: tuple[str, Recorder],
) -> None:
    address, recorder = recording_server
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_GLOBAL_LATER), address],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    # The calls came one after the other, in the script's order.
    assert [TRACEPARENT in metadata for metadata in recorder.of("GetUser")] == [False, False, True]
