"""The Helm chart as `helm template` renders it, and finding things in the manifests."""

from __future__ import annotations

import functools
import os
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .tools import REPO, missing_tool

CHART = REPO / "deploy" / "helm" / "parley"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
RELEASE = "parley"
NAMESPACE = "parley"
# The Prometheus Operator API the chart looks for before it renders ServiceMonitor and
# PrometheusRule; passed to `helm template`, which has no cluster to ask.
MONITORING_API = "monitoring.coreos.com/v1"
HELM_MAJORS = {"helm3": "v3.", "helm4": "v4."}

Manifest = dict[str, Any]


@functools.cache
def helm_binary(name: str) -> str:
    """The Helm of HELM3 or HELM4 (`name` is "helm3" or "helm4"), checked to be that major."""
    variable = name.upper()
    path = os.environ.get(variable) or str(REPO / ".tools" / name / "helm")
    if not os.access(path, os.X_OK):
        missing_tool(f"{variable}={path} is not an executable Helm: run `make helm-tools`")
    version = subprocess.run(
        [path, "version", "--template", "{{.Version}}"], capture_output=True, text=True
    ).stdout.strip()
    assert version.startswith(HELM_MAJORS[name]), f"{variable}={path} is Helm {version}"
    return path


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    # An empty KUBECONFIG keeps helm away from any cluster this machine may know.
    env = {**os.environ, "KUBECONFIG": os.devnull, "HELM_CACHE_HOME": os.devnull}
    return subprocess.run([helm, *args], capture_output=True, text=True, env=env, timeout=60)


@functools.cache
def _render(helm: str, values: tuple[str, ...], kube_version: str, extra: tuple[str, ...]) -> str:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    args += ["--kube-version", kube_version, "--api-versions", MONITORING_API]
    for path in values:
        args += ["--values", path]
    result = run_helm(helm, *args, *extra)
    assert result.returncode == 0, f"helm template failed:\n{result.stderr}"
    return result.stdout


def render(
    helm: str, values: Path | None = None, kube_version: str = "", *extra: str
) -> list[Manifest]:
    """The chart's manifests, rendered by `helm template` (cached per arguments)."""
    version = kube_version or supported_kube_versions()[-1]
    text = _render(helm, (str(values),) if values else (), version, extra)
    return [doc for doc in yaml.safe_load_all(text) if doc]


@functools.cache
def _chart_yaml() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    return loaded


@functools.cache
def supported_kube_versions() -> tuple[str, ...]:
    """The lowest and highest Kubernetes minor kubernetes-validate has that Chart.yaml allows."""
    from kubernetes_validate.utils import all_versions
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    # Chart.yaml says ">=1.27.0-0" (semver, "-0" admits pre-releases); as a PEP 440 specifier
    # the "-0" suffix is dropped and pre-releases are allowed.
    constraint = re.sub(r"-0\b", "", _chart_yaml()["kubeVersion"])
    specifier = SpecifierSet(constraint.replace(" ", ","), prereleases=True)
    versions = [v for v in all_versions() if Version(v) in specifier]
    assert versions, f"kubernetes-validate has no version inside kubeVersion {constraint!r}"
    return (versions[0], versions[-1]) if len(versions) > 1 else (versions[0],)


def by_kind(manifests: list[Manifest], kind: str) -> list[Manifest]:
    return [m for m in manifests if m["kind"] == kind]


def named(manifests: list[Manifest], kind: str, name: str) -> Manifest:
    found = [m for m in by_kind(manifests, kind) if m["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def by_component(manifests: list[Manifest], kind: str, name: str) -> list[Manifest]:
    """Resources of one component (app.kubernetes.io/component label), e.g. "user"."""
    return [
        m
        for m in by_kind(manifests, kind)
        if m["metadata"].get("labels", {}).get("app.kubernetes.io/component") == name
    ]


def pod_container(pod_spec: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The container (or init container) `name` of a pod spec."""
    for c in [*pod_spec.get("initContainers", []), *pod_spec["containers"]]:
        if c["name"] == name:
            return dict(c)
    raise AssertionError(f"no container {name!r} in the pod spec")
