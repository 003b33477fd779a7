"""Tracing (issue 17): the OTEL_* settings, and what a traced `parley-user serve` exports, logs
and serves as metrics, checked against a real OTLP receiver."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.openmetrics import parser as openmetrics
from prometheus_client.parser import text_string_to_metric_families as prometheus_families

from parley.chassis import ConfigError, Env
from parley.chassis.tracing import TracingSettings
from parley.proto import user_pb2, user_pb2_grpc
from parley.proto.contract import REQUEST_ID_KEY, USER_SERVICE
from parley.testing.launcher import Launcher, Served, run_to_exit, service_env
from parley.testing.metrics import sample_key, scrape_metrics
from parley.testing.otlp import OtlpReceiver, ReceivedSpan
from parley.testing.tokens import bearer
from parley.testing.waiting import wait_until

OPENMETRICS = "application/openmetrics-text; version=1.0.0"
ENDPOINT = "http://collector.example:4317"
# prometheus_client's OpenMetrics parser has no type annotations.
openmetrics_families: Callable[[str], Any] = openmetrics.text_string_to_metric_families
PLAIN_IDS = re.compile(r" trace_id=([0-9a-f]{32}) span_id=([0-9a-f]{16})$")

# --- TracingSettings.from_env ---------------------------------------------------------------


def settings(**environ: str) -> TracingSettings:
    return TracingSettings.from_env(Env(environ))


def test_tracing_is_off_by_default() -> None:
    off = settings()
    assert not off.enabled
    assert off.describe() == "tracing off"


@pytest.mark.parametrize(
    "environ",
    [
        {"OTEL_TRACES_SAMPLER": "always_on"},
        {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
        {"OTEL_SERVICE_NAME": "parley-user"},
        {"OTEL_SDK_DISABLED": "false"},
    ],
)
def test_settings_other_than_an_endpoint_or_exporter_leave_tracing_off(
    environ: dict[str, str],
) -> None:
    assert not settings(**environ).enabled


@pytest.mark.parametrize(
    ("environ", "endpoint"),
    [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}, ENDPOINT),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ENDPOINT}, ENDPOINT),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, None),
        ({"OTEL_TRACES_EXPORTER": "OTLP"}, None),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "false"}, None),
    ],
)
def test_an_endpoint_or_the_otlp_exporter_turns_tracing_on(
    environ: dict[str, str], endpoint: str | None
) -> None:
    on = settings(**environ)
    assert on.enabled
    assert on.endpoint == endpoint
    assert (on.protocol, on.sampler, on.ratio) == ("grpc", "parentbased_always_on", 1.0)
    assert on.describe().startswith("tracing on: OTLP grpc to ")


@pytest.mark.parametrize(
    "environ",
    [
        {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT},
        {"OTEL_TRACES_EXPORTER": "None", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ENDPOINT},
        {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT},
        {"OTEL_SDK_DISABLED": "TRUE", "OTEL_TRACES_EXPORTER": "otlp"},
        {
            "OTEL_SDK_DISABLED": "true",
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT,
        },
    ],
)
def test_exporter_none_and_sdk_disabled_win(environ: dict[str, str]) -> None:
    assert not settings(**environ).enabled


def test_the_traces_variables_take_precedence() -> None:
    chosen = settings(
        OTEL_EXPORTER_OTLP_ENDPOINT="http://general.example:4317",
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="https://traces.example:4318",
        OTEL_EXPORTER_OTLP_PROTOCOL="grpc",
        OTEL_EXPORTER_OTLP_TRACES_PROTOCOL="http/protobuf",
    )
    assert chosen.enabled
    assert chosen.endpoint == "https://traces.example:4318"
    assert chosen.protocol == "http/protobuf"
    # A blank traces variable is as good as unset: the general one applies.
    fallback = settings(
        OTEL_EXPORTER_OTLP_ENDPOINT="http://general.example:4317",
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=" ",
        OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
    )
    assert (fallback.endpoint, fallback.protocol) == (
        "http://general.example:4317",
        "http/protobuf",
    )


@pytest.mark.parametrize(
    ("sampler", "argument", "ratio"),
    [
        ("traceidratio", "0.25", 0.25),
        ("parentbased_traceidratio", "0", 0.0),
        ("parentbased_traceidratio", None, 1.0),
        ("always_off", None, 1.0),
        # An argument a sampler does not take is not read.
        ("parentbased_always_on", "not a number", 1.0),
    ],
)
def test_sampler_and_its_ratio(sampler: str, argument: str | None, ratio: float) -> None:
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_TRACES_SAMPLER": sampler}
    if argument is not None:
        environ["OTEL_TRACES_SAMPLER_ARG"] = argument
    chosen = settings(**environ)
    assert (chosen.sampler, chosen.ratio) == (sampler, ratio)
    assert f"sampler {sampler}" in chosen.describe()


def test_describe_names_endpoint_protocol_and_sampler() -> None:
    chosen = settings(
        OTEL_EXPORTER_OTLP_ENDPOINT=ENDPOINT,
        OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
        OTEL_TRACES_SAMPLER="traceidratio",
        OTEL_TRACES_SAMPLER_ARG="0.25",
    )
    assert chosen.describe() == (
        f"tracing on: OTLP http/protobuf to {ENDPOINT}, sampler traceidratio 0.25"
    )


BAD_TRACING_SETTINGS = [
    ("OTEL_TRACES_EXPORTER", "jaeger", {}),
    ("OTEL_TRACES_EXPORTER", "otlp,console", {}),
    ("OTEL_SDK_DISABLED", "yes", {}),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317", {}),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "ftp://collector.example", {}),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://", {}),
    ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "collector:4317", {}),
    ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "grpc://x", {"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}),
    ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json", {"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}),
    ("OTEL_EXPORTER_OTLP_PROTOCOL", "GRPC", {"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}),
    (
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "grpc-web",
        {"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
    ),
    ("OTEL_TRACES_SAMPLER", "jaeger_remote", {"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}),
]


@pytest.mark.parametrize(("variable", "value", "others"), BAD_TRACING_SETTINGS)
def test_a_bad_tracing_setting_is_a_one_line_config_error(
    variable: str, value: str, others: dict[str, str]
) -> None:
    with pytest.raises(ConfigError) as info:
        settings(**others, **{variable: value})
    assert info.value.variable == variable
    message = str(info.value)
    assert message.startswith(f"{variable}: ")
    assert repr(value) in message
    assert "\n" not in message


@pytest.mark.parametrize("sampler", ["traceidratio", "parentbased_traceidratio"])
@pytest.mark.parametrize("argument", ["1.5", "-0.1", "half", "nan", "inf"])
def test_a_bad_sampler_ratio_is_a_one_line_config_error(sampler: str, argument: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings(
            OTEL_EXPORTER_OTLP_ENDPOINT=ENDPOINT,
            OTEL_TRACES_SAMPLER=sampler,
            OTEL_TRACES_SAMPLER_ARG=argument,
        )
    assert info.value.variable == "OTEL_TRACES_SAMPLER_ARG"
    assert "\n" not in str(info.value)


def test_batch_span_processor_defaults_and_settings() -> None:
    default = settings(OTEL_EXPORTER_OTLP_ENDPOINT=ENDPOINT)
    assert (default.queue, default.delay_ms, default.batch) == (2048, 5000, 512)
    chosen = settings(
        OTEL_EXPORTER_OTLP_ENDPOINT=ENDPOINT,
        OTEL_BSP_MAX_QUEUE_SIZE="100",
        OTEL_BSP_SCHEDULE_DELAY="250",
    )
    # The batch follows a queue smaller than the default batch.
    assert (chosen.queue, chosen.delay_ms, chosen.batch) == (100, 250, 100)


@pytest.mark.parametrize(
    ("variable", "value", "others"),
    [
        ("OTEL_BSP_MAX_QUEUE_SIZE", "0", {}),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "lots", {}),
        ("OTEL_BSP_SCHEDULE_DELAY", "5s", {}),
        ("OTEL_BSP_SCHEDULE_DELAY", "0", {}),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "0", {}),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "200", {"OTEL_BSP_MAX_QUEUE_SIZE": "100"}),
    ],
)
def test_a_bad_batch_setting_is_a_one_line_config_error(
    variable: str, value: str, others: dict[str, str]
) -> None:
    with pytest.raises(ConfigError) as info:
        settings(OTEL_EXPORTER_OTLP_ENDPOINT=ENDPOINT, **others, **{variable: value})
    assert info.value.variable == variable
    assert "\n" not in str(info.value)


def test_a_bad_setting_is_refused_even_with_tracing_off() -> None:
    # A typo must not wait for the day tracing is turned on to show.
    with pytest.raises(ConfigError) as info:
        settings(OTEL_TRACES_SAMPLER="always-on")
    assert info.value.variable == "OTEL_TRACES_SAMPLER"


def test_an_unparsable_endpoint_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        settings(OTEL_EXPORTER_OTLP_ENDPOINT="http://[::1")
    assert info.value.variable == "OTEL_EXPORTER_OTLP_ENDPOINT"


@pytest.mark.parametrize("endpoint", ["http://collector.example:abc", "http://collector:99999"])
def test_an_endpoint_with_a_bad_port_is_a_config_error(endpoint: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings(OTEL_EXPORTER_OTLP_ENDPOINT=endpoint)
    assert info.value.variable == "OTEL_EXPORTER_OTLP_ENDPOINT"


# --- A service that must refuse to start ----------------------------------------------------

# Settings good enough to get past validation; the database is never reached.
REFUSED = {
    "PARLEY_DATABASE_URL": "postgresql://parley@127.0.0.1:1/parley",
    "PARLEY_JWT_SECRET": uuid.uuid4().hex * 2,
    "PARLEY_GRPC_HOST": "127.0.0.1",
    "PARLEY_GRPC_PORT": "0",
    "PARLEY_METRICS_HOST": "127.0.0.1",
    "PARLEY_METRICS_PORT": "0",
}


def assert_refused_with_one_line(environ: dict[str, str], variable: str) -> None:
    result = run_to_exit("user", {**REFUSED, **environ})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("parley-user: configuration error: "), lines[0]
    assert variable in lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OTEL_TRACES_SAMPLER", "bogus"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317"),
        ("OTEL_TRACES_SAMPLER_ARG", "2"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "-5"),
    ],
)
def test_serve_with_a_bad_tracing_setting_exits_with_one_line(variable: str, value: str) -> None:
    environ = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1",
        "OTEL_TRACES_SAMPLER": "traceidratio",
        variable: value,
    }
    assert_refused_with_one_line(environ, variable)


def test_serve_with_an_unparsable_endpoint_exits_with_one_line() -> None:
    assert_refused_with_one_line(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://[::1"}, "OTEL_EXPORTER_OTLP_ENDPOINT"
    )


def test_serve_with_tracing_on_and_a_bad_setting_exits_with_one_line() -> None:
    assert_refused_with_one_line(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1", "PARLEY_ACCESS_LOG_SAMPLE": "1.5"},
        "PARLEY_ACCESS_LOG_SAMPLE",
    )


# --- A traced service -----------------------------------------------------------------------

# The tests ask for `launcher` after `otlp_receiver` and `database`, so it is torn down first:
# the service drains and exports its last spans while both are still there.


async def start_user(
    launcher: Launcher, database: str, receiver: OtlpReceiver | None, **env: str
) -> Served:
    otel = receiver.env() if receiver is not None else {}
    return await launcher.process("user", service_env(database, **otel, **env))


def writer(token: Callable[..., str], request_id: str) -> list[tuple[str, str]]:
    return [*bearer(token("1", "users:write")), (REQUEST_ID_KEY, request_id)]


async def create_user(served: Served, metadata: list[tuple[str, str]]) -> int:
    async with grpc.aio.insecure_channel(served.target) as channel:
        stub: Any = user_pb2_grpc.UserServiceStub(channel)
        name = uuid.uuid4().hex[:8]
        response = await stub.CreateUser(
            user_pb2.CreateUserRequest(name=name, email=f"{name}@example.com", age=30),
            metadata=metadata,
            timeout=10,
        )
        return int(response.user.id)


async def get_user(served: Served, user_id: int, metadata: list[tuple[str, str]]) -> None:
    async with grpc.aio.insecure_channel(served.target) as channel:
        stub: Any = user_pb2_grpc.UserServiceStub(channel)
        await stub.GetUser(user_pb2.GetUserRequest(id=user_id), metadata=metadata, timeout=10)


async def check_health(served: Served, times: int = 1) -> None:
    async with grpc.aio.insecure_channel(served.target) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        for _ in range(times):
            await stub.Check(health_pb2.HealthCheckRequest(service=USER_SERVICE), timeout=5)


def server_span(receiver: OtlpReceiver, method: str) -> ReceivedSpan:
    """Waits for the server span of `/user.UserService/<method>`; there must be one only."""
    name = f"/{USER_SERVICE}/{method}"

    def found(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
        return [s for s in spans if s.kind == "server" and s.name == name]

    matches: list[ReceivedSpan] = receiver.wait_for(found)
    assert len(matches) == 1, matches
    return matches[0]


async def lines_of(served: Served, request_id: str, count: int) -> list[str]:
    """Waits until `count` log lines carry `request_id` and returns them."""

    def found() -> list[str]:
        lines = [line for line in served.log_text().splitlines() if request_id in line]
        return lines if len(lines) >= count else []

    lines: list[str] = await wait_until(found, 15, f"{count} log lines of {request_id}")
    return lines


async def test_log_lines_carry_the_ids_of_the_server_span_in_plain_format(
    otlp_receiver: OtlpReceiver, database: str, launcher: Launcher, token: Callable[..., str]
) -> None:
    served = await start_user(launcher, database, otlp_receiver, PARLEY_LOG_FORMAT="plain")
    request_id = f"req-{uuid.uuid4().hex}"
    user_id = await create_user(served, writer(token, request_id))
    span = server_span(otlp_receiver, "CreateUser")

    # The servicer's own line and the access line, both within the call.
    lines = await lines_of(served, request_id, 2)
    assert any(f"created user {user_id}" in line for line in lines), lines
    assert any("rpc /user.UserService/CreateUser OK" in line for line in lines), lines
    for line in lines:
        assert f"[{request_id}]" in line
        ids = PLAIN_IDS.search(line)
        assert ids is not None, line
        assert ids.groups() == (span.trace_id, span.span_id), line

    # Outside any call there is no span, and no ids.
    started = [line for line in served.log_text().splitlines() if "serving gRPC on" in line]
    assert len(started) == 1
    assert "trace_id=" not in started[0]


async def test_log_lines_carry_the_ids_of_the_server_span_in_json_format(
    otlp_receiver: OtlpReceiver, database: str, launcher: Launcher, token: Callable[..., str]
) -> None:
    served = await start_user(launcher, database, otlp_receiver, PARLEY_LOG_FORMAT="json")
    request_id = f"req-{uuid.uuid4().hex}"
    user_id = await create_user(served, writer(token, request_id))
    span = server_span(otlp_receiver, "CreateUser")

    lines = await lines_of(served, request_id, 2)
    events = [json.loads(line) for line in lines]
    messages = [event["message"] for event in events]
    assert f"created user {user_id}" in messages
    assert any(m.startswith("rpc /user.UserService/CreateUser OK") for m in messages)
    for event in events:
        assert event["request_id"] == request_id
        assert (event["trace_id"], event["span_id"]) == (span.trace_id, span.span_id), event


@pytest.mark.parametrize("log_format", ["plain", "json"])
async def test_no_trace_fields_with_tracing_off(
    database: str, launcher: Launcher, token: Callable[..., str], log_format: str
) -> None:
    served = await start_user(launcher, database, None, PARLEY_LOG_FORMAT=log_format)
    request_id = f"req-{uuid.uuid4().hex}"
    await create_user(served, writer(token, request_id))
    lines = await lines_of(served, request_id, 2)
    log = served.log_text()
    assert "trace_id" not in log
    assert "span_id" not in log
    assert "tracing on" not in log
    if log_format == "json":
        for line in lines:
            event = json.loads(line)
            assert event["request_id"] == request_id
            assert "trace_id" not in event and "span_id" not in event
    else:
        assert all(f"[{request_id}]" in line for line in lines)


def fetch_metrics(port: int, accept: str | None) -> tuple[str, str]:
    """The body and content type of http://127.0.0.1:port/metrics."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if accept is not None:
        request.add_header("Accept", accept)
    with urllib.request.urlopen(request, timeout=5) as response:
        body: bytes = response.read()
        return body.decode(), str(response.headers.get("Content-Type", ""))


def exemplars(text: str) -> list[tuple[str, dict[str, str], dict[str, str]]]:
    """(sample name, labels, exemplar labels) of every sample with an exemplar in an
    OpenMetrics exposition."""
    return [
        (sample.name, dict(sample.labels), dict(sample.exemplar.labels))
        for family in openmetrics_families(text)
        for sample in family.samples
        if sample.exemplar is not None
    ]


async def test_handling_time_carries_the_trace_id_as_an_exemplar(
    otlp_receiver: OtlpReceiver, database: str, launcher: Launcher, token: Callable[..., str]
) -> None:
    served = await start_user(launcher, database, otlp_receiver)
    await check_health(served, times=3)  # untraced: they must leave no exemplar
    await create_user(served, writer(token, f"req-{uuid.uuid4().hex}"))
    span = server_span(otlp_receiver, "CreateUser")

    text, content_type = await asyncio.to_thread(fetch_metrics, served.metrics_port, OPENMETRICS)
    assert content_type.startswith("application/openmetrics-text"), content_type
    found = exemplars(text)
    assert found, "no exemplar in the OpenMetrics exposition"
    for name, labels, exemplar in found:
        assert name == "grpc_server_handling_seconds_bucket", (name, labels)
        assert labels["grpc_service"] == USER_SERVICE, labels
        assert exemplar == {"trace_id": exemplar["trace_id"]}
    create = [e for _, labels, e in found if labels["grpc_method"] == "CreateUser"]
    assert create == [{"trace_id": span.trace_id}]

    # The classic text format has no exemplars, and still parses.
    classic, content_type = await asyncio.to_thread(fetch_metrics, served.metrics_port, None)
    assert content_type.startswith("text/plain"), content_type
    assert " # {" not in classic
    buckets = [
        sample
        for family in prometheus_families(classic)
        for sample in family.samples
        if sample.name == "grpc_server_handling_seconds_bucket"
        and sample.labels["grpc_method"] == "CreateUser"
        and sample.labels["le"] == "+Inf"
    ]
    assert [sample.value for sample in buckets] == [1.0]


async def test_no_exemplars_with_tracing_off(
    database: str, launcher: Launcher, token: Callable[..., str]
) -> None:
    served = await start_user(launcher, database, None)
    await create_user(served, writer(token, f"req-{uuid.uuid4().hex}"))
    key = sample_key(
        "grpc_server_handled_total",
        grpc_code="OK",
        grpc_method="CreateUser",
        grpc_service=USER_SERVICE,
        grpc_type="unary",
    )
    assert (await asyncio.to_thread(scrape_metrics, served.metrics_port))[key] == 1
    text, _ = await asyncio.to_thread(fetch_metrics, served.metrics_port, OPENMETRICS)
    assert exemplars(text) == []
    assert "trace_id" not in text


async def test_a_callers_trace_context_is_continued(
    otlp_receiver: OtlpReceiver, database: str, launcher: Launcher, token: Callable[..., str]
) -> None:
    served = await start_user(launcher, database, otlp_receiver)
    unsampled_trace, sampled_trace = uuid.uuid4().hex, uuid.uuid4().hex
    caller_span = uuid.uuid4().hex[:16]
    create_id = f"req-{uuid.uuid4().hex}"
    user_id = await create_user(
        served,
        [*writer(token, create_id), ("traceparent", f"00-{unsampled_trace}-{caller_span}-00")],
    )
    await get_user(
        served,
        user_id,
        [
            *writer(token, f"req-{uuid.uuid4().hex}"),
            ("traceparent", f"00-{sampled_trace}-{caller_span}-01"),
        ],
    )
    span = server_span(otlp_receiver, "GetUser")
    assert (span.trace_id, span.parent_span_id) == (sampled_trace, caller_span)
    # The caller said not to sample the first call: nothing of it was exported (it ended
    # before the second, whose span has arrived), and no exemplar points to it.
    assert {s.trace_id for s in otlp_receiver.spans} == {sampled_trace}
    text, _ = await asyncio.to_thread(fetch_metrics, served.metrics_port, OPENMETRICS)
    assert [(labels["grpc_method"], e["trace_id"]) for _, labels, e in exemplars(text)] == [
        ("GetUser", sampled_trace)
    ]


def roots_by_trace(spans: list[ReceivedSpan]) -> dict[str, list[ReceivedSpan]]:
    roots: dict[str, list[ReceivedSpan]] = {s.trace_id: [] for s in spans}
    for s in spans:
        if not s.parent_span_id:
            roots[s.trace_id].append(s)
    return roots


async def dependency_checks(served: Served) -> float:
    key = sample_key("parley_dependency_check_seconds_count", dependency="postgres")
    return (await asyncio.to_thread(scrape_metrics, served.metrics_port))[key]


async def test_only_requests_are_traced(
    otlp_receiver: OtlpReceiver, database: str, launcher: Launcher, token: Callable[..., str]
) -> None:
    served = await start_user(launcher, database, otlp_receiver, PARLEY_HEALTH_CHECK_INTERVAL="0.2")
    user_id = await create_user(served, writer(token, f"req-{uuid.uuid4().hex}"))
    first = server_span(otlp_receiver, "CreateUser")

    # Several of the service's own health-check queries run, and health checks are called ...
    checks = await dependency_checks(served)

    async def more_checks() -> bool:
        return await dependency_checks(served) >= checks + 3

    await wait_until(more_checks, 15, "three more dependency checks")
    await check_health(served, times=5)
    # ... before a second call: spans are exported in the order they end, so once its server
    # span has arrived, every span that ended before it has too.
    await get_user(served, user_id, writer(token, f"req-{uuid.uuid4().hex}"))
    second = server_span(otlp_receiver, "GetUser")

    spans = otlp_receiver.spans
    roots = roots_by_trace(spans)
    assert set(roots) == {first.trace_id, second.trace_id}, roots
    for trace_id, trace_roots in roots.items():
        assert [(r.kind, r.span_id) for r in trace_roots] in (
            [("server", first.span_id)],
            [("server", second.span_id)],
        ), trace_id
    assert not [s for s in spans if "grpc.health" in s.name or "Health" in s.name]
    assert {s.service for s in spans} == {"parley-user"}
    # The call's queries are traced, as children of its server span: health-check queries
    # would be visible if they were sampled.
    queries = [s for s in spans if s.kind == "client" and s.trace_id == first.trace_id]
    assert queries, spans
    assert {s.parent_span_id for s in queries} <= {s.span_id for s in spans}


async def test_exported_spans_are_counted(
    otlp_receiver: OtlpReceiver, database: str, launcher: Launcher, token: Callable[..., str]
) -> None:
    served = await start_user(launcher, database, otlp_receiver)
    ok = sample_key("parley_trace_spans_total", result="ok")
    failed = sample_key("parley_trace_spans_total", result="failed")
    before = await asyncio.to_thread(scrape_metrics, served.metrics_port)
    assert (before[ok], before[failed]) == (0, 0)

    user_id = await create_user(served, writer(token, f"req-{uuid.uuid4().hex}"))
    server_span(otlp_receiver, "CreateUser")
    await get_user(served, user_id, writer(token, f"req-{uuid.uuid4().hex}"))
    server_span(otlp_receiver, "GetUser")
    received = len(otlp_receiver.spans)
    assert received >= 2

    async def counted() -> dict[str, float] | None:
        now = await asyncio.to_thread(scrape_metrics, served.metrics_port)
        return now if now[ok] >= received else None

    after = await wait_until(counted, 15, f"{received} spans counted as exported")
    assert after[ok] == len(otlp_receiver.spans)
    assert after[failed] == 0
    # Every span that ended went out: none dropped, none waiting.
    assert after[sample_key("parley_trace_spans_total", result="ended")] == after[ok]


async def test_spans_that_fail_to_export_are_counted(
    database: str, launcher: Launcher, token: Callable[..., str], unused_port: int
) -> None:
    served = await start_user(
        launcher,
        database,
        None,
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{unused_port}",
        OTEL_EXPORTER_OTLP_TIMEOUT="1",
        OTEL_BSP_SCHEDULE_DELAY="100",
    )
    await create_user(served, writer(token, f"req-{uuid.uuid4().hex}"))
    failed = sample_key("parley_trace_spans_total", result="failed")
    ok = sample_key("parley_trace_spans_total", result="ok")

    async def counted() -> dict[str, float] | None:
        now = await asyncio.to_thread(scrape_metrics, served.metrics_port)
        return now if now[failed] >= 1 else None

    after = await wait_until(counted, 30, "a span counted as failed")
    assert after[ok] == 0


async def test_no_span_metric_with_tracing_off(database: str, launcher: Launcher) -> None:
    served = await start_user(launcher, database, None)
    samples = await asyncio.to_thread(scrape_metrics, served.metrics_port)
    assert any(key.startswith("grpc_server_handled_total") for key in samples)
    assert not [key for key in samples if key.startswith("parley_trace_")]


async def test_a_collector_that_never_answers_does_not_hold_up_shutdown(
    database: str, launcher: Launcher, token: Callable[..., str]
) -> None:
    """A collector that accepts connections and never answers: the spans queued at SIGTERM
    get their bounded flush (2 s), and the exporter's retries (10 s a batch) are not waited
    for. Before, such a service took 40 s to exit."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # never accepted, never answered
    try:
        served = await start_user(
            launcher,
            database,
            None,
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{silent.getsockname()[1]}",
            OTEL_BSP_SCHEDULE_DELAY="60000",  # everything still queued at SIGTERM
            PARLEY_SHUTDOWN_GRACE="1",
        )
        for _ in range(20):
            await create_user(served, writer(token, f"req-{uuid.uuid4().hex}"))
        took, code = await launcher.terminate(served, timeout=30)
    finally:
        silent.close()
    assert code == 0, served.log_text()[-2000:]
    assert took < 8, f"exit took {took:.1f}s after SIGTERM"
