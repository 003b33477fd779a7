"""Checks of Parley's deployment files: Dockerfiles, docker compose, the Helm chart, kind and CI.

The tools they need, and what a missing one does, are in tools.py; the helpers the checks
share are beside it (helm.py, dockerfile.py, redis_command.py, env_reads.py).
"""

from __future__ import annotations

import pytest

from .helm import CI_VALUES, HELM_MAJORS, helm_binary, supported_kube_versions


@pytest.fixture(params=sorted(HELM_MAJORS))
def helm(request: pytest.FixtureRequest) -> str:
    """Each test that takes `helm` runs once with Helm 3 and once with Helm 4."""
    return helm_binary(request.param)


@pytest.fixture(scope="session")
def helm4() -> str:
    return helm_binary("helm4")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Tests taking `ci_values` run once per deploy/helm/parley/ci/*-values.yaml, tests taking
    # `kube_version` once per Kubernetes version the chart supports (see Chart.yaml).
    if "ci_values" in metafunc.fixturenames:
        metafunc.parametrize("ci_values", CI_VALUES, ids=[p.name for p in CI_VALUES])
    if "kube_version" in metafunc.fixturenames:
        metafunc.parametrize("kube_version", supported_kube_versions())
