"""`parley --trace` (issue 17): one `trace <trace id> <method>` line on stderr per call, the
same id in the server's spans, log lines and exemplars, and what happens when the OTEL_*
variables are wrong or the collector is away."""

from __future__ import annotations

import re
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import pytest

from parley.client import UserClient
from parley.testing.cli import command_env, run
from parley.testing.launcher import Launcher, service_env
from parley.testing.otlp import OtlpReceiver, ReceivedSpan
from parley.testing.waiting import wait_until

if TYPE_CHECKING:
    from conftest import Person, RunningStack

    from parley.testing.cli import Ran, Terminal

Run = Callable[..., "Ran"]
TRACE_LINE = re.compile(r"^trace ([0-9a-f]{32}) (\S+)$")
NO_CHAT = "127.0.0.1:1"  # these commands never call ChatService
OPENMETRICS = "application/openmetrics-text; version=1.0.0"

# The OTEL_* variables a developer's shell may carry that would change where spans go.
_OTEL = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_TRACES_EXPORTER",
    "OTEL_SDK_DISABLED",
)


def otel(**variables: str) -> dict[str, str | None]:
    """Environment changes: `variables`, and none of the shell's other OTEL_* settings."""
    return {**dict.fromkeys(_OTEL), **variables}


def trace_lines(stderr: str) -> list[tuple[str, str]]:
    """(trace id, method) of each `trace` line; every line of `stderr` must be one."""
    found = []
    for line in stderr.splitlines():
        match = TRACE_LINE.match(line)
        assert match is not None, f"not a trace line: {line!r}"
        found.append((match[1], match[2]))
    return found


def spans_of(
    spans: list[ReceivedSpan], trace_id: str, method: str
) -> tuple[ReceivedSpan, ReceivedSpan] | None:
    """The CLI's span and the server's span of the call traced as `trace_id`, once both came."""
    client = [s for s in spans if s.trace_id == trace_id and s.service == "parley-cli"]
    server = [s for s in spans if s.trace_id == trace_id and s.kind == "server"]
    if not (client and server):
        return None
    assert (len(client), len(server)) == (1, 1), (client, server)
    assert (client[0].name, client[0].kind) == (method, "client")
    assert (server[0].name, server[0].kind) == (method, "server")  # named alike
    return client[0], server[0]


def exemplar_trace_ids(metrics_port: int, method: str) -> set[str]:
    """The trace ids of the exemplars of `method`'s handling time, in OpenMetrics."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{metrics_port}/metrics", headers={"Accept": OPENMETRICS}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        text = response.read().decode()
    return set(
        re.findall(
            rf'^grpc_server_handling_seconds_bucket{{[^}}]*grpc_method="{method}"[^}}]*}} '
            r'\S+ # {trace_id="([0-9a-f]{32})"}',
            text,
            re.MULTILINE,
        )
    )


async def test_each_call_is_one_trace_that_the_server_joins(
    launcher: Launcher, database: str, otlp_receiver: OtlpReceiver, token: Callable[..., str]
) -> None:
    served = await launcher.process(
        "user", service_env(database, PARLEY_LOG_FORMAT="plain", **otlp_receiver.env())
    )
    env: Mapping[str, str] = command_env(
        served.target,
        NO_CHAT,
        {
            "PARLEY_TOKEN": token("1", "users:write"),
            **otel(OTEL_EXPORTER_OTLP_ENDPOINT=otlp_receiver.endpoint),
        },
    )
    email = f"ada-{uuid.uuid4().hex}@example.com"
    created = run(
        ["--trace", "-o", "json", "users", "create", "--name", "Ada", "--email", email], env
    )
    assert created.code == 0, created
    [user] = created.json_lines()  # stdout stays JSON Lines: the trace line is on stderr
    [(create_trace, method)] = trace_lines(created.stderr)
    assert method == "/user.UserService/CreateUser"
    client, server = otlp_receiver.wait_for(lambda spans: spans_of(spans, create_trace, method))
    assert client.parent_span_id == "", "each call is the root of its own trace"
    assert server.parent_span_id == client.span_id

    # The server's log lines and the exemplar of its handling time carry the same id.
    def logged() -> list[str]:
        # The servicer's line and the access line, of the only CreateUser so far.
        marks = (f"created user {user['id']}", "rpc /user.UserService/CreateUser OK")
        lines = [line for line in served.log_text().splitlines() if any(m in line for m in marks)]
        return lines if len(lines) == 2 else []

    lines = await wait_until(logged, 10, "the server's log lines of the CreateUser")
    assert all(f"trace_id={create_trace}" in line for line in lines), lines
    assert exemplar_trace_ids(served.metrics_port, "CreateUser") == {create_trace}

    with UserClient(served.target, token=token("1", "users:write")) as users:
        users.create_user(name="Grace", email=f"grace-{uuid.uuid4().hex}@example.com")
    # Two pages of one user: two calls, two lines, two traces (--trace after the command).
    listed = run(["users", "list", "--page-size", "1", "--limit", "2", "--trace"], env)
    assert listed.code == 0, listed
    pages = trace_lines(listed.stderr)
    assert [method for _, method in pages] == ["/user.UserService/ListUsers"] * 2
    assert len({trace_id for trace_id, _ in pages}) == 2
    for trace_id, method in pages:
        client, server = otlp_receiver.wait_for(
            lambda spans, t=trace_id, m=method: spans_of(spans, t, m)
        )
        assert client.parent_span_id == ""
        assert server.parent_span_id == client.span_id


def test_a_server_that_does_not_trace_still_gets_an_id_to_match(
    parley: Run, stack: RunningStack, otlp_receiver: OtlpReceiver
) -> None:
    # The stack's services do not trace: the id finds the CLI's own span, failed as the call.
    missing = parley(
        "--trace", "users", "get", str(2**31 - 1),
        token=stack.admin_token,
        env=otel(OTEL_EXPORTER_OTLP_ENDPOINT=otlp_receiver.endpoint),
    )  # fmt: skip
    assert missing.code == 15, missing  # NOT_FOUND
    first, error = missing.stderr.splitlines()
    [(trace_id, method)] = trace_lines(first)
    assert error.startswith("parley: NOT_FOUND: ")
    [span] = otlp_receiver.wait_for(
        lambda spans: [s for s in spans if s.trace_id == trace_id and s.service == "parley-cli"]
    )
    assert (span.name, span.kind, span.parent_span_id) == (method, "client", "")
    assert span.status_code == 2  # error
    assert span.attributes["rpc.grpc.status_code"] == 5
    assert span.attributes["server.address"] == "127.0.0.1"


def test_without_an_endpoint_the_ids_are_printed_only(
    cli: Run, stack: RunningStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in _OTEL:
        monkeypatch.delenv(variable, raising=False)
    shown = cli("--trace", "health", "--output", "json")
    assert shown.code == 0, shown
    checks = shown.json_lines()
    lines = trace_lines(shown.stderr)
    assert [method for _, method in lines] == ["/grpc.health.v1.Health/Check"] * len(checks)
    assert len({trace_id for trace_id, _ in lines}) == len(checks)


@pytest.mark.parametrize(
    ("variables", "line"),
    [
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "localhost:4317"},
            "OTEL_EXPORTER_OTLP_ENDPOINT must be an http:// or https:// URL, got 'localhost:4317'",
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "json"},
            "OTEL_EXPORTER_OTLP_PROTOCOL must be grpc or http/protobuf, got 'json'",
        ),
        (
            {"OTEL_TRACES_EXPORTER": "zipkin"},
            "OTEL_TRACES_EXPORTER must be otlp or none (parley exports OTLP), got 'zipkin'",
        ),
    ],
    ids=["endpoint", "protocol", "exporter"],
)
def test_a_bad_otel_variable_is_a_usage_error_with_trace_only(
    parley: Run, stack: RunningStack, variables: dict[str, str], line: str
) -> None:
    refused = parley("--trace", "users", "list", token=stack.admin_token, env=otel(**variables))
    assert (refused.code, refused.stdout) == (2, ""), refused
    assert refused.stderr == f"parley: error: {line}\n"  # one line, and no call was made
    # Without --trace the command does not read them.
    listed = parley("users", "list", "--limit", "1", token=stack.admin_token, env=otel(**variables))
    assert (listed.code, listed.stderr) == (0, ""), listed


def test_a_collector_that_is_away_does_not_fail_the_command(
    parley: Run, stack: RunningStack, unused_port: int
) -> None:
    with UserClient(stack.user, token=stack.admin_token) as users:
        ada = users.create_user(name="Ada", email=f"ada-{uuid.uuid4().hex}@example.com")
    endpoint = f"http://127.0.0.1:{unused_port}"
    shown = parley(
        "--trace", "users", "get", str(ada.id), "-o", "json",
        token=stack.admin_token,
        env=otel(OTEL_EXPORTER_OTLP_ENDPOINT=endpoint, OTEL_EXPORTER_OTLP_TIMEOUT="1"),
    )  # fmt: skip
    assert shown.code == 0, shown
    assert [user["id"] for user in shown.json_lines()] == [ada.id]
    trace_line, warning = shown.stderr.splitlines()
    assert [method for _, method in trace_lines(trace_line)] == ["/user.UserService/GetUser"]
    assert warning == (
        f"parley: warning: --trace could not export 1 span(s) to {endpoint} (OTLP grpc); "
        "run with --debug to see why"
    )


def test_the_interactive_chat_prints_the_trace_of_each_call(
    terminal: Callable[..., Terminal], person: Callable[[str], Person], room: str
) -> None:
    ada = person("Ada")
    chat = terminal("--trace", "chat", "--room", room, token=ada.token)
    chat.expect(r"trace [0-9a-f]{32} /chat\.ChatService/StreamChat")
    chat.expect(rf"joined #{room}")
    chat.prompt(room)
    chat.type("/who")
    chat.expect(r"trace [0-9a-f]{32} /chat\.ChatService/ListPresence")
    chat.expect(rf"in #{room}: Ada")
    chat.prompt(room)
    chat.sendcontrol("d")
    assert chat.wait_exit() == 0
    assert "Traceback" not in chat.text
