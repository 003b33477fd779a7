"""The PrometheusRule alerts and the Grafana dashboard: every query parses as PromQL, and every
metric it reads is one the services really export, so no alert or panel is silently empty;
the latency panel with exemplars reads the histogram the services put trace ids on.

The exported metrics are read from the servers' own registries (created, not started); the
queries from the chart rendered with the monitoring variant.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from typing import Any

import promql_parser
import pytest

from parley.chassis import Env
from parley.chat_service import ChatSettings
from parley.chat_service import create_server as create_chat_server
from parley.user_service import UserSettings
from parley.user_service import create_server as create_user_server

from .helm import CHART, render

MONITORING_VALUE_FILE = "monitoring-values.yaml"
# Metrics that come from outside Parley: kube-state-metrics' pod readiness.
EXTERNAL = {"kube_pod_status_ready"}
# What Grafana substitutes before a query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$namespace": "parley", "$service": ".*"}
SAMPLE_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}


def exported_metrics() -> set[str]:
    """Every sample name the user and chat servers expose on /metrics."""
    env = Env(
        {
            "PARLEY_DATABASE_URL": "postgresql://parley@127.0.0.1:5432/parley",
            "PARLEY_JWT_SECRET": secrets.token_urlsafe(32),
            "PARLEY_REDIS_URL": "redis://127.0.0.1:6379/0",
            # Creating a server binds its gRPC port: any free one will do.
            "PARLEY_GRPC_HOST": "127.0.0.1",
            "PARLEY_GRPC_PORT": "0",
            "PARLEY_METRICS_HOST": "127.0.0.1",
            "PARLEY_METRICS_PORT": "0",
        }
    )
    apps = [
        create_user_server(UserSettings.from_env(env)),
        create_chat_server(ChatSettings.from_env(env)),
    ]
    names: set[str] = set()
    for app in apps:
        for family in app.metrics.registry.collect():
            suffixes = SAMPLE_SUFFIXES.get(family.type, ("",))
            names.update(family.name + suffix for suffix in suffixes)
    return names


def alert_expressions(manifests: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
    rules = [m for m in manifests if m["kind"] == "PrometheusRule"]
    assert rules, "the monitoring variant renders no PrometheusRule"
    for rule in rules:
        for group in rule["spec"]["groups"]:
            for item in group["rules"]:
                yield item.get("alert") or item.get("record"), item["expr"]


def dashboards(manifests: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(key, dashboard) of every dashboard ConfigMap of the render."""
    maps = [
        m
        for m in manifests
        if m["kind"] == "ConfigMap" and any(key.endswith(".json") for key in m.get("data", {}))
    ]
    assert maps, "the monitoring variant renders no dashboard ConfigMap"
    for config_map in maps:
        for key, text in config_map["data"].items():
            yield key, json.loads(text)


def dashboard_expressions(manifests: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
    for key, dashboard in dashboards(manifests):
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                yield f"{key}: {panel['title']}", _substitute(target["expr"])
        for variable in dashboard.get("templating", {}).get("list", []):
            query = variable.get("query")
            if isinstance(query, dict) and "label_values(" in query.get("query", ""):
                inner = query["query"].removeprefix("label_values(").rsplit(",", 1)[0]
                yield f"{key}: variable {variable['name']}", _substitute(inner)


@pytest.fixture(scope="module")
def monitoring(helm4: str) -> list[dict[str, Any]]:
    """The chart's manifests with ServiceMonitor, PrometheusRule and dashboard switched on."""
    manifests: list[dict[str, Any]] = render(helm4, CHART / "ci" / MONITORING_VALUE_FILE)
    return manifests


@pytest.fixture(scope="module")
def queries(monitoring: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(where, PromQL) of every alert rule, dashboard panel and dashboard variable."""
    return [*alert_expressions(monitoring), *dashboard_expressions(monitoring)]


def _substitute(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads, from its parsed syntax tree."""
    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
        elif isinstance(node, promql_parser.MatrixSelector):
            walk(node.vector_selector)
        elif isinstance(node, promql_parser.BinaryExpr):
            walk(node.lhs)
            walk(node.rhs)
        elif isinstance(node, promql_parser.Call):
            for argument in node.args:
                walk(argument)
        elif isinstance(node, promql_parser.AggregateExpr):
            walk(node.expr)
            if node.param is not None:
                walk(node.param)
        elif isinstance(
            node, (promql_parser.ParenExpr, promql_parser.UnaryExpr, promql_parser.SubqueryExpr)
        ):
            walk(node.expr)

    walk(promql_parser.parse(expr))
    return names


def test_every_alert_and_panel_query_is_valid_promql(queries: list[tuple[str, str]]) -> None:
    errors = []
    for where, expr in queries:
        try:
            promql_parser.parse(expr)
        except ValueError as error:
            errors.append(f"{where}: {error}\n    {expr}")
    assert not errors, "invalid PromQL:\n" + "\n".join(errors)


def test_every_metric_a_query_reads_is_exported_by_the_services(
    queries: list[tuple[str, str]],
) -> None:
    exported = exported_metrics() | EXTERNAL
    unknown = {
        f"{where}: {name}"
        for where, expr in queries
        for name in metric_names(expr)
        if name not in exported
    }
    assert not unknown, f"queries read metrics no service exports: {sorted(unknown)}"


def test_the_dashboard_shows_the_chat_metrics(monitoring: list[dict[str, Any]]) -> None:
    read = {name for _, expr in dashboard_expressions(monitoring) for name in metric_names(expr)}
    chat = {name for name in exported_metrics() if name.startswith("parley_chat_")}
    # One series of a histogram is enough to show it.
    shown = {name for name in chat if name in read or name.removesuffix("_bucket") in read}
    missing = {
        name
        for name in chat
        if name not in shown and not name.endswith(("_count", "_sum", "_publish_errors_total"))
    }
    assert not missing, f"the dashboard has no panel for {sorted(missing)}"


# The histogram whose observations carry the trace id as an exemplar while tracing is on.
EXEMPLAR_HISTOGRAM = "grpc_server_handling_seconds"


def test_a_latency_panel_shows_the_trace_exemplars(monitoring: list[dict[str, Any]]) -> None:
    exported = exported_metrics()
    shown = []
    for key, dashboard in dashboards(monitoring):
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                if not target.get("exemplar"):
                    continue
                assert panel["type"] == "timeseries", f"{key}: {panel['title']}"
                # Grafana shows exemplars of the buckets a query reads.
                names = metric_names(_substitute(target["expr"]))
                assert names <= exported, f"{key}: {panel['title']} reads {sorted(names)}"
                shown += [n for n in names if n == f"{EXEMPLAR_HISTOGRAM}_bucket"]
    assert shown, f"no dashboard panel shows the exemplars of {EXEMPLAR_HISTOGRAM}"


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (job, le) (rate(a_bucket{x="b c"}[5m]))', {"a_bucket"}),
        ("min(up) == 0 and on (job) b", {"up", "b"}),
        ('histogram_quantile(0.9, rate(h_bucket{le!="x"}[1m]))', {"h_bucket"}),
    ],
)
def test_metric_names_are_read_from_an_expression(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def alert_names(manifests: list[dict[str, Any]]) -> set[str]:
    return {name for name, _ in alert_expressions(manifests)}


def test_the_capacity_alerts_are_there_and_retention_s_only_while_it_is_on(
    helm4: str, monitoring: list[dict[str, Any]]
) -> None:
    capacity = {
        "ParleyChatStreamsNearLimit",
        "ParleyChatDeliverySlow",
        "ParleyLimitRefusing",
        "ParleyDatabasePoolWaiting",
        "ParleyChatRedisPublishFailing",
        "ParleyChatRetentionStalled",
    }
    assert capacity <= alert_names(monitoring)
    retention_off = render(
        helm4,
        CHART / "ci" / MONITORING_VALUE_FILE,
        "",
        "--set",
        "chat.config.retentionMaxAge=0d",
        "--set",
        "chat.config.retentionMaxMessages=0",
    )
    assert capacity - alert_names(retention_off) == {"ParleyChatRetentionStalled"}
