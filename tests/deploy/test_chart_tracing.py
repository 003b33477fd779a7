"""Tracing in the chart: the standard OTEL_* variables reach both services' containers only
while tracing.enabled, and the services make of them what the values say (the tracing
settings code and the OpenTelemetry resource the services build read them); turning tracing
on without an endpoint is refused in one line; PARLEY_ACCESS_LOG_SAMPLE is a chart value.
Which names may be rendered at all is test_chart_drift's check against env_reads."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml

from parley.chassis import Env
from parley.chassis.tracing import TracingSettings
from parley.chat_service.settings import ChatSettings
from parley.user_service.settings import UserSettings

from .env_reads import service_resource
from .helm import CHART, NAMESPACE, RELEASE, by_component, named, pod_container, render, run_helm

TRACING_VALUES = CHART / "ci" / "tracing-values.yaml"
MESSAGE = "tracing.enabled is true but tracing.endpoint is empty"
SETTINGS: dict[str, Callable[[Env], Any]] = {
    "user": UserSettings.from_env,
    "chat": ChatSettings.from_env,
}
PROGRAMS = {"user": "parley-user", "chat": "parley-chat"}
# Stand-ins for what the containers read from the release's Secret.
SECRETS = {
    "PARLEY_DATABASE_URL": "postgresql://parley@postgres:5432/parley",
    "PARLEY_JWT_SECRET": os.urandom(32).hex(),
    "PARLEY_REDIS_URL": "redis://redis:6379/0",
}
RENDERED = {
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_RESOURCE_ATTRIBUTES",
}


def container_env(manifests: list[dict[str, Any]], component: str) -> dict[str, str]:
    """The plain variables of a service's container: its ConfigMaps and `value`s."""
    (deployment,) = by_component(manifests, "Deployment", component)
    spec = pod_container(deployment["spec"]["template"]["spec"], component)
    values: dict[str, str] = {}
    for source in spec.get("envFrom", []):
        values.update(named(manifests, "ConfigMap", source["configMapRef"]["name"])["data"])
    values.update({e["name"]: e["value"] for e in spec.get("env", []) if "value" in e})
    return values


def otel(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith("OTEL_")}


def all_env_names(manifests: list[dict[str, Any]]) -> set[str]:
    """Every variable any container or ConfigMap of the render sets."""
    names: set[str] = set()
    for manifest in manifests:
        data = manifest.get("data", {}) if manifest["kind"] == "ConfigMap" else {}
        if not any(key.endswith(".json") for key in data):  # the dashboard's is no environment
            names |= set(data)
        spec = manifest.get("spec", {})
        pod = spec["template"]["spec"] if "template" in spec else spec
        for container in [*pod.get("initContainers", []), *pod.get("containers", [])]:
            names |= {e["name"] for e in container.get("env", [])}
    return names


def values_file(tmp_path: Path, values: dict[str, Any]) -> Path:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_nothing_of_tracing_is_rendered_while_it_is_off(
    helm: str, ci_values: Path, tmp_path: Path
) -> None:
    names = all_env_names(render(helm, ci_values))
    if ci_values == TRACING_VALUES:
        assert RENDERED <= names
        # Every tracing value still set, but not `enabled`: nothing.
        off = values_file(tmp_path, {"tracing": {"enabled": False}})
        names = all_env_names(render(helm, ci_values, "", "--values", str(off)))
    assert not {n for n in names if n.startswith("OTEL_")}


@pytest.mark.parametrize("component", sorted(SETTINGS))
def test_the_services_trace_as_the_values_say(helm: str, component: str) -> None:
    values = yaml.safe_load(TRACING_VALUES.read_text(encoding="utf-8"))["tracing"]
    env = container_env(render(helm, TRACING_VALUES), component)
    assert set(otel(env)) == RENDERED
    settings = TracingSettings.from_env(Env(env))
    assert settings.enabled
    assert settings.endpoint == values["endpoint"]
    assert settings.protocol == values["protocol"]
    assert (settings.sampler, settings.ratio) == (values["sampler"], values["samplerRatio"])
    # The serving settings accept the rest (a ConfigError would name the variable).
    SETTINGS[component](Env(env | SECRETS))
    # The resource the service builds carries the attributes, and still its own name.
    with mock.patch.dict(os.environ, {"OTEL_RESOURCE_ATTRIBUTES": env["OTEL_RESOURCE_ATTRIBUTES"]}):
        attributes = dict(service_resource(PROGRAMS[component]).attributes)
    assert values["resourceAttributes"].items() <= attributes.items()
    assert attributes["service.name"] == PROGRAMS[component]


@pytest.mark.parametrize(
    ("sampler", "has_arg"),
    [
        ("always_on", False),
        ("always_off", False),
        ("parentbased_always_on", False),
        ("parentbased_always_off", False),
        ("traceidratio", True),
        ("parentbased_traceidratio", True),
    ],
)
def test_the_ratio_is_rendered_only_for_the_samplers_that_read_it(
    helm4: str, sampler: str, has_arg: bool, tmp_path: Path
) -> None:
    values = values_file(
        tmp_path,
        {"tracing": {"enabled": True, "endpoint": "https://otlp.example.com", "sampler": sampler,
                     "samplerRatio": 0.5}},
    )  # fmt: skip
    for component in SETTINGS:
        env = otel(container_env(render(helm4, values), component))
        assert ("OTEL_TRACES_SAMPLER_ARG" in env) == has_arg, component
        assert "OTEL_RESOURCE_ATTRIBUTES" not in env  # none given
        settings = TracingSettings.from_env(Env(env))
        assert settings.sampler == sampler
        assert settings.ratio == (0.5 if has_arg else 1.0)


@pytest.mark.parametrize(
    "extra",
    [(), ("--set", "tracing.endpoint="), ("--set", "tracing.protocol=http/protobuf")],
    ids=["no endpoint", "empty endpoint", "http/protobuf"],
)
def test_tracing_without_an_endpoint_fails_with_one_line(helm: str, extra: tuple[str, ...]) -> None:
    result = run_helm(
        helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
        "--set", "tracing.enabled=true", *extra,
    )  # fmt: skip
    assert result.returncode != 0 and result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if MESSAGE in line]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ") and "OTLP URL" in lines[0]


@pytest.mark.parametrize("component", sorted(SETTINGS))
def test_the_access_log_sample_is_a_chart_value(helm: str, component: str) -> None:
    default = container_env(render(helm), component)
    assert default["PARLEY_ACCESS_LOG_SAMPLE"] == "1"
    assert SETTINGS[component](Env(default | SECRETS)).server.access_log_sample == 1.0
    sampled = container_env(render(helm, TRACING_VALUES), component)
    assert SETTINGS[component](Env(sampled | SECRETS)).server.access_log_sample == 0.1
