"""The chart's NetworkPolicies let every pod it makes do its work in a namespace that denies
all traffic by default, DNS and Prometheus peers replace the defaults as lists, hook-mode
policies exist before the hooks that need them, and GitOps renders (`helm template`, as Argo
CD does) are refused without secret.existingSecret, repeatable, and roll the pods through
their checksum/secret annotation.

The policies are checked by a small evaluator of NetworkPolicy semantics (pod and namespace
selectors, ipBlocks, numbered and named ports, policy types), not by matching strings: a
deny-all policy is added to each render, and for every pod template the chart renders each
connection it needs must be allowed by one of the chart's policies."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from .helm import CHART, CI_VALUES, NAMESPACE, RELEASE, by_component, by_kind, render, run_helm

Manifest = dict[str, Any]
DENY_ALL: Manifest = {
    "apiVersion": "networking.k8s.io/v1",
    "kind": "NetworkPolicy",
    "metadata": {"name": "default-deny-all", "namespace": NAMESPACE},
    "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]},
}
GITOPS_MESSAGE = "gitops is true but secret.existingSecret is empty"
GIVEN_JWT = secrets.token_urlsafe(32)


# --- A NetworkPolicy evaluator --------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """A pod (labels, namespace, named container ports) or an address outside any pod."""

    name: str
    labels: tuple[tuple[str, str], ...] = ()
    namespace: str | None = None  # None: not a pod, `ip` is its address
    ip: str = "10.99.0.1"
    ports: tuple[tuple[str, int], ...] = ()
    manifest: Manifest = field(default_factory=dict, compare=False, hash=False)

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)

    @property
    def namespace_labels(self) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": self.namespace or ""}


def pod(name: str, namespace: str, **labels: str) -> Endpoint:
    return Endpoint(name, tuple(sorted(labels.items())), namespace)


def address(ip: str) -> Endpoint:
    return Endpoint(ip, ip=ip)


def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A LabelSelector: every matchLabels pair and every matchExpression holds."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values")
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def peer_matches(peer: dict[str, Any], policy_namespace: str, other: Endpoint) -> bool:
    if "ipBlock" in peer:
        if other.namespace is not None:
            return False  # pod IPs are not what these checks give ipBlocks
        block = peer["ipBlock"]
        ip = ipaddress.ip_address(other.ip)
        inside = ip in ipaddress.ip_network(block["cidr"])
        return inside and not any(ip in ipaddress.ip_network(c) for c in block.get("except", []))
    if other.namespace is None:
        return False
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], other.namespace_labels):
            return False
    elif other.namespace != policy_namespace:
        return False  # a podSelector alone means the policy's namespace
    return selects(peer.get("podSelector"), other.label_map)


def port_matches(
    ports: list[dict[str, Any]] | None, number: int, protocol: str, target: Endpoint
) -> bool:
    """Whether a rule's ports admit number/protocol; a named port is looked up on `target`,
    the pod receiving the connection."""
    if not ports:
        return True
    named = dict(target.ports)
    for entry in ports:
        if entry.get("protocol", "TCP") != protocol:
            continue
        port = entry.get("port")
        if port is None:
            return True
        if isinstance(port, str):
            if named.get(port) == number:
                return True
        elif port <= number <= entry.get("endPort", port):
            return True
    return False


def policies_selecting(policies: list[Manifest], target: Endpoint, kind: str) -> list[Manifest]:
    return [
        p
        for p in policies
        if p["metadata"].get("namespace", NAMESPACE) == target.namespace
        and selects(p["spec"]["podSelector"], target.label_map)
        and kind in p["spec"].get("policyTypes", ["Ingress"])
    ]


def allowing(
    policies: list[Manifest], source: Endpoint, dest: Endpoint, number: int, protocol: str = "TCP"
) -> tuple[list[Manifest], list[Manifest]] | None:
    """The policies that let source reach dest (on dest's side: ingress; on source's side:
    egress), or None when the connection is denied. A side no policy selects is open."""
    sides = []
    for kind, selected, other, rules_key, peers_key in (
        ("Egress", source, dest, "egress", "to"),
        ("Ingress", dest, source, "ingress", "from"),
    ):
        if selected.namespace is None:  # not a pod: no policy applies to it
            sides.append([])
            continue
        chosen = policies_selecting(policies, selected, kind)
        if not chosen:
            sides.append([])
            continue
        allowed = [
            p
            for p in chosen
            for rule in p["spec"].get(rules_key) or []
            if port_matches(rule.get("ports"), number, protocol, dest)
            and (
                not rule.get(peers_key)
                or any(
                    peer_matches(peer, p["metadata"].get("namespace", NAMESPACE), other)
                    for peer in rule[peers_key]
                )
            )
        ]
        if not allowed:
            return None
        sides.append(allowed)
    return sides[0], sides[1]


# --- The pods a render makes, and what each needs --------------------------------------------


def pod_templates(manifests: list[Manifest]) -> dict[str, Endpoint]:
    """Every pod the chart would run, by component: Deployments, StatefulSets, Jobs (hooks
    too) and bare Pods (the helm test pod)."""
    found: dict[str, Endpoint] = {}
    for manifest in manifests:
        if manifest["kind"] in ("Deployment", "StatefulSet", "Job"):
            template = manifest["spec"]["template"]
        elif manifest["kind"] == "Pod":
            template = manifest
        else:
            continue
        labels = template["metadata"]["labels"]
        ports = {
            (p["name"], p["containerPort"])
            for c in template["spec"]["containers"]
            for p in c.get("ports", [])
            if "name" in p
        }
        component = labels["app.kubernetes.io/component"]
        assert component not in found, f"two pod templates of {component}"
        found[component] = Endpoint(
            component, tuple(sorted(labels.items())), NAMESPACE, ports=tuple(sorted(ports)),
            manifest=manifest,
        )  # fmt: skip
    return found


@dataclass
class World:
    """What surrounds the release in a test cluster."""

    dns: list[Endpoint]
    postgres: Endpoint | None = None  # None: the in-chart Postgres
    redis: Endpoint | None = None  # None: the in-chart Redis
    prometheus: list[Endpoint] = field(
        default_factory=lambda: [
            pod("prometheus", "monitoring", **{"app.kubernetes.io/name": "prometheus"})
        ]
    )
    # Sources that must NOT reach the metrics ports.
    not_prometheus: list[Endpoint] = field(
        default_factory=lambda: [pod("stranger", "elsewhere", app="x")]
    )
    # The OTLP collector user and chat send traces to, and its port; None: tracing is off.
    tracing: tuple[Endpoint, int] | None = None


KUBE_DNS = pod("kube-dns", "kube-system", **{"k8s-app": "kube-dns"})
GKE_DNS = [address("169.254.20.10"), address("169.254.169.254")]
DATABASES_POSTGRES = pod("postgres", "databases", app="postgres")
DATABASES_REDIS = pod("redis", "databases", app="redis")
COLLECTOR = pod(
    "otel-collector", "observability", **{"app.kubernetes.io/name": "opentelemetry-collector"}
)
OTLP_GRPC = 4317

WORLDS: dict[str, World] = {
    "default-deny-values.yaml": World([KUBE_DNS], DATABASES_POSTGRES, DATABASES_REDIS),
    "default-values.yaml": World([KUBE_DNS], DATABASES_POSTGRES, address("10.20.0.15")),
    "kind-values.yaml": World([KUBE_DNS]),
    "digests-values.yaml": World([KUBE_DNS]),
    "existing-secret-values.yaml": World([KUBE_DNS], address("10.1.2.3")),
    "tls-values.yaml": World([KUBE_DNS], address("10.1.2.3"), address("10.1.2.4")),
    "gitops-values.yaml": World([KUBE_DNS], address("10.1.2.3"), address("10.1.2.4")),
    "gke-dns-values.yaml": World(GKE_DNS, address("10.30.0.5"), address("10.30.0.6")),
    "gmp-prometheus-values.yaml": World(
        [KUBE_DNS],
        address("10.1.2.3"),
        address("10.1.2.4"),
        prometheus=[
            pod("collector", ns, **{"app.kubernetes.io/name": "collector"})
            for ns in ("gmp-system", "gke-gmp-system")
        ],
        not_prometheus=[
            pod("prometheus", "monitoring", **{"app.kubernetes.io/name": "prometheus"})
        ],
    ),  # fmt: skip
    "any-prometheus-values.yaml": World(
        [KUBE_DNS],
        address("10.1.2.3"),
        address("10.1.2.4"),
        prometheus=[address("203.0.113.7"), pod("agent", "anywhere", app="agent")],
        not_prometheus=[],
    ),  # fmt: skip
    "monitoring-values.yaml": World([KUBE_DNS], address("10.1.2.3"), address("10.1.2.4")),
    # One node of the Redis Cluster; the policy allows the cluster's whole /24.
    "redis-cluster-values.yaml": World([KUBE_DNS], DATABASES_POSTGRES, address("10.30.0.12")),
    "tracing-values.yaml": World(
        [KUBE_DNS], DATABASES_POSTGRES, DATABASES_REDIS, tracing=(COLLECTOR, OTLP_GRPC)
    ),
}


@dataclass(frozen=True)
class Need:
    source: Endpoint
    dest: Endpoint
    port: int
    protocol: str = "TCP"

    def __str__(self) -> str:
        return f"{self.source.name} -> {self.dest.name}:{self.port}/{self.protocol}"


def grpc_port(endpoint: Endpoint) -> int:
    return dict(endpoint.ports)["grpc"]


def needs(pods: dict[str, Endpoint], world: World) -> list[Need]:
    """Every connection the release's pods make or must accept."""
    postgres = world.postgres or pods["postgresql"]
    redis = world.redis or pods["redis"]
    result: list[Need] = []
    for component in ("user", "chat", "migrations", "test"):
        if component in pods:
            for dns in world.dns:
                result += [Need(pods[component], dns, 53, "UDP"), Need(pods[component], dns, 53)]
    for component in ("user", "chat", "migrations"):
        if component in pods:
            result.append(Need(pods[component], postgres, 5432))
    result.append(Need(pods["chat"], redis, 6379))
    result.append(Need(pods["chat"], pods["user"], grpc_port(pods["user"])))
    if "test" in pods:
        for service in ("user", "chat"):
            result.append(Need(pods["test"], pods[service], grpc_port(pods[service])))
    for service in ("user", "chat"):
        for scraper in world.prometheus:
            result.append(Need(scraper, pods[service], dict(pods[service].ports)["metrics"]))
        if world.tracing is not None:
            result.append(Need(pods[service], *world.tracing))
    return result


def forbidden(pods: dict[str, Endpoint], world: World) -> list[Need]:
    """Connections the policies must still refuse, so that "allowed" means something."""
    stranger = pod("stranger", "elsewhere", app="x")
    result = [
        Need(stranger, pods["user"], grpc_port(pods["user"])),
        Need(stranger, pods["chat"], grpc_port(pods["chat"])),
        Need(pods["user"], pods["chat"], grpc_port(pods["chat"])),
        Need(pods["user"], address("198.51.100.9"), 443),
    ]
    if "migrations" in pods:
        result.append(Need(pods["migrations"], pods["user"], grpc_port(pods["user"])))
    if "test" in pods:
        result.append(Need(pods["test"], address("198.51.100.9"), 443))
    if "redis" in pods:
        result.append(Need(pods["user"], pods["redis"], 6379))
    if "postgresql" in pods:
        result.append(Need(stranger, pods["postgresql"], 5432))
    for service in ("user", "chat"):
        for source in world.not_prometheus:
            result.append(Need(source, pods[service], dict(pods[service].ports)["metrics"]))
    # The collector: for user and chat only while tracing is on, and only on its port.
    collector, port = world.tracing or (COLLECTOR, OTLP_GRPC)
    if world.tracing is None:
        result += [Need(pods[service], collector, port) for service in ("user", "chat")]
    else:
        result.append(Need(pods["user"], collector, port + 1))
    result += [Need(pods[c], collector, port) for c in ("migrations", "test") if c in pods]
    return result


def chart_policies(manifests: list[Manifest]) -> list[Manifest]:
    return [m for m in manifests if m["kind"] == "NetworkPolicy"]


def problems(policies: list[Manifest], pods: dict[str, Endpoint], world: World) -> list[str]:
    found = [f"denied: {n}" for n in needs(pods, world)
             if allowing(policies, n.source, n.dest, n.port, n.protocol) is None]  # fmt: skip
    found += [f"allowed: {n}" for n in forbidden(pods, world)
              if allowing(policies, n.source, n.dest, n.port, n.protocol) is not None]  # fmt: skip
    return found


# --- Hook order -------------------------------------------------------------------------------

PRE_HOOKS = {"pre-install", "pre-upgrade"}


def hook(manifest: Manifest) -> tuple[set[str], int] | None:
    """(phases, weight) of a Helm hook; None for a release resource."""
    annotations = manifest["metadata"].get("annotations") or {}
    if "helm.sh/hook" not in annotations:
        return None
    phases = {p.strip() for p in annotations["helm.sh/hook"].split(",")}
    return phases, int(annotations.get("helm.sh/hook-weight", "0"))


def present_before(policy: Manifest, workload: Manifest) -> bool:
    """Whether Helm has created `policy` by the time `workload`'s pods start.

    Pre-install/pre-upgrade hooks run before any release resource exists, in order of weight;
    test hooks run after the release's resources are all there."""
    workload_hook, policy_hook = hook(workload), hook(policy)
    if workload_hook is None:
        return policy_hook is None or bool(policy_hook[0] & PRE_HOOKS)
    phases, weight = workload_hook
    if policy_hook is None:
        return not phases & PRE_HOOKS  # a test hook: release resources exist by then
    policy_phases, policy_weight = policy_hook
    return phases <= policy_phases and policy_weight < weight


def order_problems(manifests: list[Manifest], world: World) -> list[str]:
    pods = pod_templates(manifests)
    policies = chart_policies(manifests)
    found = []
    for need in needs(pods, world):
        for endpoint, side in ((need.source, 0), (need.dest, 1)):
            if endpoint.namespace != NAMESPACE or hook(endpoint.manifest) is None:
                continue
            allowed = allowing(policies, need.source, need.dest, need.port, need.protocol)
            assert allowed is not None, f"denied: {need}"
            if not any(present_before(p, endpoint.manifest) for p in allowed[side]):
                names = [p["metadata"]["name"] for p in allowed[side]]
                found.append(f"{need}: allowed only by {names}, made after {endpoint.name}")
    return found


# --- Tests: default-deny namespaces -----------------------------------------------------------


@pytest.mark.parametrize("values", sorted(WORLDS))
def test_every_pod_works_in_a_default_deny_namespace(helm: str, values: str) -> None:
    manifests = render(helm, CHART / "ci" / values)
    pods = pod_templates(manifests)
    assert {"user", "chat", "test"} <= set(pods)
    policies = [DENY_ALL, *chart_policies(manifests)]
    found = problems(policies, pods, WORLDS[values])
    assert not found, "\n".join(found)
    late = order_problems(manifests, WORLDS[values])
    assert not late, "\n".join(late)


def test_every_ci_variant_has_a_world() -> None:
    assert {p.name for p in CI_VALUES} == set(WORLDS)


def test_the_evaluator_sees_a_missing_policy(helm4: str) -> None:
    values = CHART / "ci" / "default-deny-values.yaml"
    manifests = render(helm4, values)
    pods = pod_templates(manifests)
    world = WORLDS["default-deny-values.yaml"]
    for name in ("parley-test", "parley-migrations", "parley-user"):
        policies = [DENY_ALL] + [
            p for p in chart_policies(manifests) if p["metadata"]["name"] != name
        ]
        assert problems(policies, pods, world), f"nothing needs NetworkPolicy {name}"
    # Nothing at all is allowed with the deny-all policy alone.
    denied = problems([DENY_ALL], pods, world)
    assert len(denied) == len(needs(pods, world))


def test_hook_migrations_get_their_policy_before_the_job(helm: str) -> None:
    manifests = render(helm, CHART / "ci" / "default-deny-values.yaml")
    (job,) = by_component(manifests, "Job", "migrations")
    job_phases, job_weight = hook(job) or (set(), 0)
    assert job_phases == PRE_HOOKS
    (policy,) = by_component(manifests, "NetworkPolicy", "migrations")
    policy_hook = hook(policy)
    assert policy_hook is not None, "the Job's NetworkPolicy would come after the hook Job"
    phases, weight = policy_hook
    assert job_phases <= phases and weight < job_weight
    # Replaced on the next run; never deleted while a retried pod of the Job may need it.
    assert policy["metadata"]["annotations"]["helm.sh/hook-delete-policy"] == (
        "before-hook-creation"
    )
    # The Secret the Job reads comes first of all.
    (secret,) = by_kind(manifests, "Secret")
    secret_hook = hook(secret)
    assert secret_hook is not None and secret_hook[1] < weight
    # A release-resource policy would not do: the evaluator's ordering says so.
    demoted = [
        {**m, "metadata": {k: v for k, v in m["metadata"].items() if k != "annotations"}}
        if m is policy else m
        for m in manifests
    ]  # fmt: skip
    assert order_problems(demoted, WORLDS["default-deny-values.yaml"])


def test_the_test_pod_keeps_its_logs_and_has_its_own_policy(helm: str) -> None:
    manifests = render(helm, CHART / "ci" / "default-values.yaml")
    (test_pod,) = by_component(manifests, "Pod", "test")
    annotations = test_pod["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "test"
    # Helm 3 deletes a hook-succeeded pod before `helm test --logs` reads it (helm#9098).
    assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation"
    (policy,) = by_component(manifests, "NetworkPolicy", "test")
    assert hook(policy) is None  # a release resource: there before any `helm test`
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in policy["spec"]  # nothing calls the test pod


def test_no_policy_without_network_policies(helm: str) -> None:
    manifests = render(
        helm, CHART / "ci" / "default-deny-values.yaml", "",
        "--set", "networkPolicy.enabled=false",
    )  # fmt: skip
    assert chart_policies(manifests) == []


# --- Tests: DNS and Prometheus peers ----------------------------------------------------------


def dns_rules(policy: Manifest) -> list[dict[str, Any]]:
    return [
        rule
        for rule in policy["spec"].get("egress", [])
        if any(p.get("port") == 53 for p in rule.get("ports", []))
    ]


def test_gke_dns_goes_to_the_node_resolvers_and_kube_dns(helm: str) -> None:
    manifests = render(helm, CHART / "ci" / "gke-dns-values.yaml")
    pods = pod_templates(manifests)
    policies = [DENY_ALL, *chart_policies(manifests)]
    egress_policies = [p for p in chart_policies(manifests) if p["spec"].get("egress")]
    assert egress_policies
    for policy in egress_policies:
        (rule,) = dns_rules(policy)
        assert rule["to"][1:] == [
            {"ipBlock": {"cidr": "10.0.0.10/32"}},  # the kube-dns Service IP (NodeLocal)
            {"ipBlock": {"cidr": "169.254.20.10/32"}},
            {"ipBlock": {"cidr": "169.254.169.254/32"}},
        ], policy["metadata"]["name"]
        assert sorted((p["port"], p["protocol"]) for p in rule["ports"]) == [
            (53, "TCP"), (53, "UDP"),
        ]  # fmt: skip
    for component in ("user", "chat", "migrations", "test"):
        source = pods[component]
        for resolver in [*GKE_DNS, KUBE_DNS, address("10.0.0.10")]:
            for protocol in ("UDP", "TCP"):
                assert allowing(policies, source, resolver, 53, protocol), (component, resolver)
        assert allowing(policies, source, address("8.8.8.8"), 53, "UDP") is None, component
        assert allowing(policies, source, address("10.0.0.11"), 53, "UDP") is None, component


def test_default_dns_is_the_kube_dns_pods(helm: str) -> None:
    manifests = render(helm, CHART / "ci" / "default-values.yaml")
    pods = pod_templates(manifests)
    policies = [DENY_ALL, *chart_policies(manifests)]
    assert allowing(policies, pods["user"], KUBE_DNS, 53, "UDP")
    assert allowing(policies, pods["user"], address("169.254.20.10"), 53, "UDP") is None
    lookalike = pod("kube-dns", "default", **{"k8s-app": "kube-dns"})
    assert allowing(policies, pods["user"], lookalike, 53, "UDP") is None


def test_an_empty_dns_list_means_any_resolver_and_ports_can_change(
    helm: str, tmp_path: Path
) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(
        "networkPolicy:\n  dns:\n    to: []\n    ports:\n      - {port: 5353, protocol: UDP}\n"
    )
    manifests = render(helm, values)
    pods = pod_templates(manifests)
    policies = [DENY_ALL, *chart_policies(manifests)]
    assert allowing(policies, pods["chat"], address("192.0.2.53"), 5353, "UDP")
    assert allowing(policies, pods["chat"], address("192.0.2.53"), 53, "UDP") is None


def test_prometheus_peers_replace_the_default(helm: str) -> None:
    gmp = render(helm, CHART / "ci" / "gmp-prometheus-values.yaml")
    for service in ("user", "chat"):
        (policy,) = by_component(gmp, "NetworkPolicy", service)
        metrics = [r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == "metrics"]
        (rule,) = metrics
        namespaces = [p["namespaceSelector"]["matchLabels"] for p in rule["from"]]
        assert namespaces == [
            {"kubernetes.io/metadata.name": "gmp-system"},
            {"kubernetes.io/metadata.name": "gke-gmp-system"},
        ]
    anyone = render(helm, CHART / "ci" / "any-prometheus-values.yaml")
    for service in ("user", "chat"):
        (policy,) = by_component(anyone, "NetworkPolicy", service)
        (rule,) = [r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == "metrics"]
        assert "from" not in rule  # any source
        (grpc,) = [r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == "grpc"]
        assert grpc["from"], "the gRPC port must stay closed to strangers"


# --- Tests: the OTLP collector ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "protocol", "port", "expected"),
    [
        ("http://otel-collector.observability:4317", "grpc", "", 4317),
        ("http://otel-collector.observability:4318", "http/protobuf", "", 4318),
        ("http://[fd00::7]:4317", "grpc", "", 4317),
        ("https://otlp.example.com", "grpc", "", 443),
        ("https://otlp.example.com/otlp", "http/protobuf", "", 443),
        ("http://otel-collector.observability", "http/protobuf", "", 80),
        # gRPC dials 443 when the target names no port, whatever the scheme.
        ("http://otel-collector.observability", "grpc", "", 443),
        # A Service in between that maps 4317 to another targetPort.
        ("http://otel-collector.observability:4317", "grpc", 14317, 14317),
    ],
)
def test_user_and_chat_reach_the_collector_on_its_port(
    helm: str, endpoint: str, protocol: str, port: int | str, expected: int, tmp_path: Path
) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "tracing": {"enabled": True, "endpoint": endpoint, "protocol": protocol},
                "networkPolicy": {"tracing": {"port": port, "to": []}},
            }
        )
    )
    manifests = render(helm, values)
    pods = pod_templates(manifests)
    policies = [DENY_ALL, *chart_policies(manifests)]
    collector = address("10.40.0.7")
    for component in ("user", "chat"):
        assert allowing(policies, pods[component], collector, expected), component
        assert allowing(policies, pods[component], collector, expected + 1) is None, component
    for component in ("migrations", "test"):
        assert allowing(policies, pods[component], collector, expected) is None, component


# --- Tests: GitOps renders and the checksum of the Secret -------------------------------------


def template(helm: str, *args: str) -> tuple[int, str, str]:
    """`helm template` as Argo CD runs it: no cluster, not cached."""
    result = run_helm(helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args)
    return result.returncode, result.stdout, result.stderr


def checksums(text: str) -> dict[str, str]:
    found = {}
    for manifest in yaml.safe_load_all(text):
        if manifest and manifest["kind"] in ("Deployment", "StatefulSet"):
            annotations = manifest["spec"]["template"]["metadata"].get("annotations") or {}
            if "checksum/secret" in annotations:
                found[manifest["metadata"]["name"]] = annotations["checksum/secret"]
    return found


def test_gitops_renders_nothing_generated_and_the_same_twice(helm: str) -> None:
    values = str(CHART / "ci" / "gitops-values.yaml")
    code, first, err = template(helm, "--values", values)
    assert code == 0, err
    code, second, err = template(helm, "--values", values)
    assert code == 0, err
    assert first == second
    manifests = [m for m in yaml.safe_load_all(first) if m]
    assert [m for m in manifests if m["kind"] == "Secret"] == []
    assert "Generated by this render" not in first
    refs = {
        e["valueFrom"]["secretKeyRef"]["name"]
        for m in manifests if m["kind"] in ("Deployment", "Job", "Pod")
        for spec in (m["spec"]["template"]["spec"] if "template" in m["spec"] else m["spec"],)
        for c in [*spec.get("initContainers", []), *spec["containers"]]
        for e in c.get("env", []) if "valueFrom" in e
    }  # fmt: skip
    assert refs == {"parley-credentials"}
    # Also with the in-chart Postgres and Redis: their passwords come from that Secret.
    extra = ("--set", "postgresql.enabled=true", "--set", "redis.enabled=true")
    code, third, err = template(helm, "--values", values, *extra)
    assert code == 0, err
    assert third == template(helm, "--values", values, *extra)[1]
    assert "kind: Secret\n" not in third


@pytest.mark.parametrize(
    "extra",
    [(), ("--set", "postgresql.enabled=true"), ("--set", f"secret.jwtSecret={GIVEN_JWT}")],
    ids=["plain", "in-chart postgres", "jwtSecret given"],
)
def test_gitops_without_existing_secret_fails_with_one_line(
    helm: str, extra: tuple[str, ...]
) -> None:
    code, out, err = template(helm, "--set", "gitops=true", *extra)
    assert code != 0 and out == ""
    lines = [line for line in err.splitlines() if GITOPS_MESSAGE in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("Error: ") and "secret.existingSecret" in lines[0]


def test_a_plain_template_tells_that_it_generated_secrets(helm: str) -> None:
    code, out, err = template(helm, "--values",
                              str(CHART / "ci" / "kind-values.yaml"))  # fmt: skip
    assert code == 0, err
    assert (
        "# Generated by this render: PARLEY_JWT_SECRET, POSTGRES_PASSWORD, REDIS_PASSWORD." in out
    )
    assert "gitops=true and secret.existingSecret" in out


def secret_and_checksums(helm: str, *args: str) -> tuple[dict[str, str], dict[str, str]]:
    code, out, err = template(helm, *args)
    assert code == 0, err
    (secret,) = [m for m in yaml.safe_load_all(out) if m and m["kind"] == "Secret"]
    return secret["data"], checksums(out)


def test_the_checksum_is_the_rendered_secret_data(helm: str) -> None:
    # Generated values: the annotation hashes exactly what the Secret of that render holds.
    data, sums = secret_and_checksums(helm, "--values", str(CHART / "ci" / "kind-values.yaml"))
    expected = hashlib.sha256(
        json.dumps({"data": data, "revision": ""}, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    redis_expected = hashlib.sha256(
        json.dumps(
            {"password": data["REDIS_PASSWORD"], "revision": ""},
            sort_keys=True,
            separators=(",", ":"),
        ).encode()
    ).hexdigest()
    assert sums == {
        "parley-user": expected,
        "parley-chat": expected,
        "parley-redis": redis_expected,  # its own password only
    }
    decoded = {k: base64.b64decode(v).decode() for k, v in data.items()}
    assert len(decoded["PARLEY_JWT_SECRET"]) == 48


def test_the_checksum_changes_with_the_secret_input(helm: str) -> None:
    first, second = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    url = "--set=secret.databaseUrl=postgresql://parley@db:5432/parley"

    def sums(*args: str) -> dict[str, str]:
        return secret_and_checksums(helm, url, *args)[1]

    one = sums(f"--set=secret.jwtSecret={first}")
    assert set(one) == {"parley-user", "parley-chat"} and len(set(one.values())) == 1
    assert sums(f"--set=secret.jwtSecret={first}") == one  # given values: stable
    assert sums(f"--set=secret.jwtSecret={second}") != one
    assert sums(f"--set=secret.jwtSecret={first}", "--set=config.logLevel=DEBUG") == one
    assert sums(f"--set=secret.jwtSecret={first}", "--set=secret.revision=2") != one


def test_the_existing_secret_checksum_follows_the_revision(helm: str) -> None:
    values = str(CHART / "ci" / "gitops-values.yaml")

    def sums(*args: str) -> dict[str, str]:
        code, out, err = template(helm, "--values", values, *args)
        assert code == 0, err
        return checksums(out)

    base = sums()
    assert set(base) == {"parley-user", "parley-chat"}
    assert sums() == base
    assert sums("--set", "secret.revision=2") != base
    assert sums("--set", "secret.existingSecret=other") != base
    redis = ("--set", "redis.enabled=true", "--set", "redis.auth.existingSecret=r")
    with_redis = sums(*redis)
    assert set(with_redis) == {"parley-user", "parley-chat", "parley-redis"}
    assert with_redis["parley-user"] != base["parley-user"]
    # Redis rolls for its own password only: another app Secret leaves it running.
    other_app_secret = sums(*redis, "--set", "secret.existingSecret=other")
    assert other_app_secret["parley-user"] != with_redis["parley-user"]
    assert other_app_secret["parley-redis"] == with_redis["parley-redis"]
    assert (
        sums(*redis, "--set", "redis.auth.existingSecret=r2")["parley-redis"]
        != (with_redis["parley-redis"])
    )
    assert sums(*redis, "--set", "secret.revision=2")["parley-redis"] != with_redis["parley-redis"]


def test_rotating_the_jwt_secret_does_not_restart_redis(helm: str) -> None:
    def sums(jwt: str) -> dict[str, str]:
        code, out, err = template(
            helm, "--set", "redis.enabled=true", "--set", "redis.auth.existingSecret=r",
            "--set", "secret.databaseUrl=postgresql://parley@db:5432/parley",
            "--set", f"secret.jwtSecret={jwt}",
        )  # fmt: skip
        assert code == 0, err
        return checksums(out)

    first, second = sums(secrets.token_urlsafe(32)), sums(secrets.token_urlsafe(32))
    assert first["parley-user"] != second["parley-user"]
    assert first["parley-chat"] != second["parley-chat"]
    assert first["parley-redis"] == second["parley-redis"]


REDIS_CLUSTER_MESSAGE = "chat.config.redisCluster is true but redis.enabled is true"


def chat_config(manifests: list[dict[str, Any]]) -> dict[str, str]:
    (config_map,) = by_component(manifests, "ConfigMap", "chat")
    data: dict[str, str] = config_map["data"]
    return data


def test_chat_is_told_when_its_redis_is_a_cluster(helm: str) -> None:
    assert chat_config(render(helm))["PARLEY_REDIS_CLUSTER"] == "false"
    cluster = render(helm, CHART / "ci" / "redis-cluster-values.yaml")
    assert chat_config(cluster)["PARLEY_REDIS_CLUSTER"] == "true"
    # The chart makes no Redis of its own for a cluster: the URL names a node of the user's.
    assert not by_component(cluster, "Deployment", "redis")


def test_a_cluster_with_the_in_chart_redis_fails_with_one_line(helm: str) -> None:
    code, out, err = template(
        helm, "--set", "redis.enabled=true", "--set", "chat.config.redisCluster=true"
    )
    assert code != 0 and out == ""
    lines = [line for line in err.splitlines() if REDIS_CLUSTER_MESSAGE in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("Error: ") and "redis.enabled=false" in lines[0]


def test_large_whole_numbers_from_a_values_file_reach_the_services_as_digits(
    helm: str, tmp_path: Path
) -> None:
    # YAML numbers reach templates as floats; printed as they are, 1000000 became "1e+06",
    # which the services refuse as a setting.
    values = tmp_path / "big-values.yaml"
    values.write_text(
        "chat:\n  config:\n    maxMembers: 1000000\n    maxStreams: 1000000\n"
        "    retentionMaxMessages: 250000000\n"
    )
    config = chat_config(render(helm, values))
    assert config["PARLEY_CHAT_MAX_MEMBERS"] == "1000000"
    assert config["PARLEY_MAX_STREAMS"] == "1000000"
    assert config["PARLEY_CHAT_RETENTION_MAX_MESSAGES"] == "250000000"
