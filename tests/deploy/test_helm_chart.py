"""The Helm chart lints and renders with Helm 3 and Helm 4, its manifests are valid for every
Kubernetes version it supports, and its values are documented, typed and checked."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml

from .helm import (
    CHART,
    CI_VALUES,
    NAMESPACE,
    RELEASE,
    helm_binary,
    render,
    run_helm,
    supported_kube_versions,
)

SCHEMAS = Path(__file__).resolve().parent / "schemas"
# Prometheus Operator kinds are CRDs, absent from the Kubernetes schemas: each is checked
# against a strict subset of its CRD kept next to this file. Every other kind must be found
# in kubernetes-validate's schemas, or the test fails.
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SCHEMAS / "servicemonitor.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): SCHEMAS / "prometheusrule.json",
}
SCHEMA_ERROR = "values don't meet the specifications of the schema"

# kubernetes-validate reads its schema files on every call; they never change during a run.
kubernetes_validate.utils.schema_contents = functools.cache(  # type: ignore[assignment]
    kubernetes_validate.utils.schema_contents
)
_valid: set[tuple[str, str]] = set()


def _validate(manifest: dict[str, Any], kube_version: str) -> None:
    key = (kube_version, json.dumps(manifest, sort_keys=True))
    if key in _valid:  # the same document, already checked for this version
        return
    crd = CRD_SCHEMAS.get((manifest["apiVersion"], manifest["kind"]))
    if crd is not None:
        jsonschema.validate(manifest, json.loads(crd.read_text(encoding="utf-8")))
    else:
        kubernetes_validate.validate(manifest, kube_version, strict=True)
    _valid.add(key)


def test_lint_strict_without_ci_values(helm: str) -> None:
    result = run_helm(helm, "lint", "--strict", str(CHART))
    assert result.returncode == 0, result.stdout + result.stderr


def test_lint_strict(helm: str, ci_values: Path, kube_version: str) -> None:
    result = run_helm(
        helm, "lint", "--strict", str(CHART), "--values", str(ci_values),
        "--kube-version", kube_version,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_rendered_manifests_are_valid_kubernetes_objects(
    helm: str, ci_values: Path, kube_version: str
) -> None:
    manifests = render(helm, ci_values, kube_version)
    assert manifests
    problems = []
    for manifest in manifests:
        where = f"{manifest['kind']} {manifest['metadata']['name']}"
        try:
            _validate(manifest, kube_version)
        except kubernetes_validate.SchemaNotFoundError as error:
            problems.append(f"{where}: {error.message}")
        except jsonschema.ValidationError as error:
            path = "/".join(str(p) for p in error.absolute_path)
            problems.append(f"{where}: {path}: {error.message}")
    assert not problems, f"invalid for Kubernetes {kube_version}:\n" + "\n".join(problems)


def _comparable(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Generated secrets (randAlphaNum) differ between two renders; their keys must not. The
    # pods' checksum/secret hashes that data, so it differs too when the chart makes a Secret.
    makes_secret = any(m["kind"] == "Secret" for m in manifests)
    for manifest in manifests:
        if manifest["kind"] == "Secret":
            manifest["data"] = sorted(manifest.get("data", {}))
        template = manifest.get("spec", {}).get("template", {})
        annotations = template.get("metadata", {}).get("annotations", {})
        if makes_secret and "checksum/secret" in annotations:
            annotations["checksum/secret"] = "<generated>"
    return manifests


def test_helm3_and_helm4_render_the_same_manifests(ci_values: Path) -> None:
    helm3, helm4 = (helm_binary(name) for name in ("helm3", "helm4"))
    assert _comparable(render(helm3, ci_values)) == _comparable(render(helm4, ci_values))


def test_ci_variants_render_every_kind_the_chart_makes(helm4: str) -> None:
    seen: set[tuple[str, str]] = set()
    for values in CI_VALUES:
        for manifest in render(helm4, values):
            labels = manifest["metadata"].get("labels", {})
            seen.add((manifest["kind"], labels.get("app.kubernetes.io/component", "")))
    expected = {
        ("ConfigMap", "user"), ("ConfigMap", "chat"), ("Deployment", "user"),
        ("Deployment", "chat"), ("Service", "user"), ("Service", "chat"),
        ("HorizontalPodAutoscaler", "user"), ("HorizontalPodAutoscaler", "chat"),
        ("PodDisruptionBudget", "user"), ("PodDisruptionBudget", "chat"),
        ("NetworkPolicy", "user"), ("NetworkPolicy", "chat"), ("NetworkPolicy", "migrations"),
        ("Job", "migrations"), ("Secret", ""), ("ServiceAccount", ""), ("Pod", "test"),
        ("StatefulSet", "postgresql"), ("Deployment", "redis"), ("ServiceMonitor", ""),
        ("PrometheusRule", ""), ("ConfigMap", ""),
    }  # fmt: skip
    assert expected <= seen, f"no CI variant renders {sorted(expected - seen)}"


def test_monitoring_objects_need_the_prometheus_operator_api(helm: str) -> None:
    values = CHART / "ci" / "monitoring-values.yaml"
    result = run_helm(helm, "template", RELEASE, str(CHART), "--values", str(values))
    assert result.returncode == 0, result.stderr
    kinds = {doc["kind"] for doc in yaml.safe_load_all(result.stdout) if doc}
    assert not kinds & {"ServiceMonitor", "PrometheusRule"}
    with_api = {m["kind"] for m in render(helm, values)}
    assert {"ServiceMonitor", "PrometheusRule"} <= with_api


BAD_VALUES = {
    "string replica count": ["--set-string", "user.replicaCount=two"],
    "unknown top-level key": ["--set", "replicas=3"],
    "unknown nested key": ["--set", "chat.image.sha=abc"],
    "short image digest": ["--set", "user.image.digest=sha256:abc"],
    "digest without its algorithm": ["--set", "redis.image.digest=" + "a" * 64],
    "upper-case digest": ["--set", "postgresql.image.digest=sha256:" + "A" * 64],
    "empty Redis tag": ["--set", "redis.image.tag="],
    "bad Redis password Secret name": ["--set", "redis.auth.existingSecret=Not_A_Name"],
    "negative port": ["--set", "chat.ports.grpc=-1"],
    "port above 65535": ["--set", "user.ports.metrics=70000"],
    "bad pull policy": ["--set", "user.image.pullPolicy=Sometimes"],
    "bad log level": ["--set", "config.logLevel=TRACE"],
    "short JWT secret": ["--set", "secret.jwtSecret=too-short"],
    "bad duration": ["--set", "config.keepaliveTime=soon"],
    "DNS selector map instead of a peer list": [
        "--set",
        "networkPolicy.dns.podSelector.matchLabels.k8s-app=kube-dns",
    ],
    "Prometheus peers as a map": ["--set", "networkPolicy.prometheus.from.podSelector=x"],
    "DNS peer with a bad CIDR": ["--set", "networkPolicy.dns.to[0].ipBlock.cidr=nowhere"],
    "DNS peer with an unknown field": ["--set", "networkPolicy.dns.to[0].selector=x"],
    "DNS port with a bad protocol": ["--set", "networkPolicy.dns.ports[0].protocol=ICMP"],
    "no DNS ports": ["--set-json", "networkPolicy.dns.ports=[]"],
    "gitops not a boolean": ["--set-string", "gitops=yes"],
    "tracing not a boolean": ["--set-string", "tracing.enabled=yes"],
    "unknown tracing sampler": ["--set", "tracing.sampler=sometimes"],
    "tracing sampler in upper case": ["--set", "tracing.sampler=TRACEIDRATIO"],
    "tracing ratio above 1": ["--set-json", "tracing.samplerRatio=1.5"],
    "negative tracing ratio": ["--set-json", "tracing.samplerRatio=-0.1"],
    "tracing ratio as a string": ["--set-string", "tracing.samplerRatio=0.5"],
    "unknown tracing protocol": ["--set", "tracing.protocol=http/json"],
    "tracing endpoint without a scheme": ["--set", "tracing.endpoint=collector:4317"],
    "tracing endpoint over gRPC's own scheme": ["--set", "tracing.endpoint=grpc://collector:4317"],
    "resource attribute with a comma": [
        "--set-json",
        'tracing.resourceAttributes={"team": "chat,user"}',
    ],
    "resource attribute not a string": ["--set-json", 'tracing.resourceAttributes={"n": 1}'],
    "unknown tracing key": ["--set", "tracing.serviceName=parley"],
    "tracing egress port above 65535": ["--set", "networkPolicy.tracing.port=70000"],
    "access log sample above 1": ["--set-json", "config.accessLogSample=2"],
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_schema_rejects_bad_values(helm: str, case: str) -> None:
    for command in ("template", "lint"):
        args = [command]
        args += [RELEASE] if command == "template" else []
        result = run_helm(helm, *args, str(CHART), *BAD_VALUES[case])
        output = result.stdout + result.stderr
        assert result.returncode != 0, f"helm {command} accepted {case}"
        assert SCHEMA_ERROR in output, f"helm {command}, {case}: not a schema error:\n{output}"


def test_kubernetes_older_than_the_chart_supports_is_refused(helm: str) -> None:
    oldest = supported_kube_versions()[0]
    major, minor = (int(part) for part in oldest.split(".")[:2])
    result = run_helm(
        helm, "template", RELEASE, str(CHART),
        "--kube-version", f"{major}.{minor - 1}.0",
    )  # fmt: skip
    assert result.returncode != 0
    assert "kubeVersion" in result.stderr


def test_a_grace_period_shorter_than_the_drain_is_refused(helm: str) -> None:
    result = run_helm(
        helm, "template", RELEASE, str(CHART),
        "--set", "chat.terminationGracePeriodSeconds=30",
    )  # fmt: skip
    assert result.returncode != 0
    assert "chat.terminationGracePeriodSeconds (30) must be greater than" in result.stderr


# --- values.yaml and values.schema.json ---------------------------------------------------


def _key_lines(text: str) -> list[tuple[int, str, str]]:
    """(line number, dotted path, the line) of every mapping key in values.yaml.

    Keys inside the items of a list (e.g. the NetworkPolicyPeers of a default peer list) are
    data, not values of the chart: the list's own key is documented and typed."""
    keys: list[tuple[int, str, str]] = []
    stack: list[tuple[int, str]] = []  # (indent, key)
    key_line = re.compile(r"^(\s*)([A-Za-z_][\w./-]*|\"[^\"]+\"):(\s|$)")
    item_line = re.compile(r"^(\s*)- ")
    item_indent: int | None = None  # indent of the "- " of the list item being skipped
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        if item_indent is not None and indent > item_indent:
            continue
        item_indent = None
        item = item_line.match(line)
        if item is not None:
            item_indent = len(item.group(1))
            continue
        match = key_line.match(line)
        if match is None:
            continue
        indent, key = len(match.group(1)), match.group(2).strip('"')
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        keys.append((number, ".".join(k for _, k in stack), line))
    return keys


def test_every_key_in_values_yaml_has_a_comment() -> None:
    lines = (CHART / "values.yaml").read_text(encoding="utf-8").splitlines()
    undocumented = []
    for number, path, line in _key_lines("\n".join(lines)):
        above = lines[number - 2].strip() if number > 1 else ""
        if not above.startswith("#") and " # " not in line:
            undocumented.append(f"line {number}: {path}")
    assert not undocumented, "keys without a comment above them:\n" + "\n".join(undocumented)


def _typed(schema: dict[str, Any], path: list[str]) -> bool:
    for key in path:
        properties = schema.get("properties", {})
        if key in properties:
            schema = properties[key]
        elif isinstance(schema.get("additionalProperties"), dict):
            schema = schema["additionalProperties"]
        else:
            return False
    return "type" in schema or "enum" in schema or "const" in schema


def _paths(value: Any, prefix: list[str]) -> list[list[str]]:
    paths = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, child in value.items():
            paths += _paths(child, [*prefix, str(key)])
    return paths


def test_every_key_in_values_yaml_is_typed_in_the_schema() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    untyped = [".".join(p) for p in _paths(values, []) if not _typed(schema, p)]
    assert not untyped, "keys of values.yaml the schema does not type:\n" + "\n".join(untyped)


def test_the_schema_accepts_values_yaml_and_every_ci_variant() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    defaults = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    jsonschema.validate(defaults, schema)
    for path in CI_VALUES:
        merged = _merge(defaults, yaml.safe_load(path.read_text(encoding="utf-8")) or {})
        jsonschema.validate(merged, schema)


def _merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        return {k: _merge(base.get(k), override[k]) if k in override else base[k]
                for k in {**base, **override}}  # fmt: skip
    return override


def test_notes_tell_how_to_reach_the_services_and_get_a_token(helm4: str) -> None:
    # Helm 4 only: Helm 3's `install --dry-run=client` still asks a cluster for its version.
    result = run_helm(
        helm4, "install", RELEASE, str(CHART), "--dry-run=client",
        "--namespace", NAMESPACE,
        "--values", str(CHART / "ci" / "kind-values.yaml"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert f"port-forward svc/{RELEASE}-user 50051:grpc" in notes
    assert f"port-forward svc/{RELEASE}-chat 50052:grpc" in notes
    assert "parley token --sub 1 --scope users:write" in notes
    assert "jsonpath='{.data.PARLEY_JWT_SECRET}'" in notes
    assert f"helm test {RELEASE}" in notes
