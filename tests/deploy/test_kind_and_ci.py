"""The kind path (deploy/kind, the kind-* Make targets, scripts/kind_e2e.py) and its GitHub
workflow are well-formed and wired to each other; none of it can run without Docker, so this
is what can be checked here."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
KIND_DIR = REPO / "deploy" / "kind"
WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.y*ml"))
KIND_PATH = ["kind-up", "kind-load", "kind-deploy", "kind-e2e"]


def _make(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}
    return subprocess.run(
        ["make", "--no-print-directory", *args], cwd=REPO, capture_output=True, text=True,
        env=env, timeout=60,
    )  # fmt: skip


def test_kind_cluster_configs_parse(deploy: Any) -> None:
    configs = sorted(KIND_DIR.glob("*.yaml"))
    assert configs
    kind_values = yaml.safe_load((deploy.chart_dir / "ci" / "kind-values.yaml").read_text())
    for path in configs:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert config["kind"] == "Cluster", path.name
        assert config["apiVersion"] == "kind.x-k8s.io/v1alpha4", path.name
        roles = [node["role"] for node in config["nodes"]]
        assert set(roles) <= {"control-plane", "worker"}, path.name
        assert roles.count("control-plane") == 1, path.name
        # kind taints the control plane when there are workers: one worker per replica lets
        # the pod anti-affinity spread them.
        replicas = max(kind_values[c]["replicaCount"] for c in ("user", "chat"))
        assert roles.count("worker") >= replicas, path.name


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_matches_the_github_workflow_schema(deploy: Any, workflow: Path) -> None:
    tool = deploy.venv_tool("check-jsonschema")
    result = subprocess.run(
        [tool, "--builtin-schema", "vendor.github-workflows", str(workflow)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_kind_workflow_runs_the_make_targets_and_cleans_up() -> None:
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "kind-e2e.yml").read_text())
    (job,) = workflow["jobs"].values()
    steps = job["steps"]
    assert "timeout-minutes" in job
    targets = [
        t for step in steps for t in re.findall(r"\bmake ([a-z0-9 -]+)", step.get("run", ""))
    ]
    ran = [word for t in targets for word in t.split()]
    assert [t for t in ran if t in KIND_PATH] == KIND_PATH
    diagnostics = [s for s in steps if s.get("if") == "failure()" and "run" in s]
    assert diagnostics, "no step dumps the cluster's state when a step fails"
    dump = diagnostics[0]["run"]
    assert "describe pods" in dump and " logs " in dump and "--previous" in dump
    assert steps[-1].get("if") == "always()" and "make kind-down" in steps[-1]["run"]
    for step in steps:
        if "uses" in step:
            assert re.fullmatch(r"actions/[a-z-]+@v\d+(\.\d+)*", step["uses"]), step["uses"]
    env = workflow["env"]
    assert re.fullmatch(r"v\d+\.\d+\.\d+", env["KIND_VERSION"]), "kind must be pinned"
    assert "sigs.k8s.io/kind@${KIND_VERSION}" in " ".join(s.get("run", "") for s in steps)
    assert env["HELM"].endswith("/.tools/helm4/helm")
    assert env["KUBECTL"].endswith("/.tools/kubectl/kubectl")


def test_kind_targets_use_the_given_tools_and_the_kind_values() -> None:
    tools = ["KIND=/opt/kind", "KUBECTL=/opt/kubectl", "DOCKER=/opt/docker", "HELM=/opt/helm"]
    result = _make("-n", *KIND_PATH, "kind-down", *tools, "KIND_CLUSTER=ci")
    assert result.returncode == 0, result.stderr
    out = re.sub(r"\s*\\\n\s*", " ", result.stdout)  # continuation lines joined
    assert "/opt/kind create cluster --name ci --config deploy/kind/cluster.yaml" in out
    assert "/opt/docker build -f services/user/Dockerfile -t parley-user:dev ." in out
    assert "/opt/docker build -f services/chat/Dockerfile -t parley-chat:dev ." in out
    assert "/opt/kind load docker-image --name ci" in out
    assert re.search(r"/opt/helm upgrade --install parley deploy/helm/parley .*"
                     r"-f deploy/helm/parley/ci/kind-values.yaml .*--wait", out)  # fmt: skip
    assert "--kube-context kind-ci" in out
    assert "rollout status" in out
    assert "/opt/helm test parley --kube-context kind-ci" in out
    assert 'scripts/kind_e2e.py --kubectl "/opt/kubectl" --context kind-ci' in out
    assert "/opt/kind delete cluster --name ci" in out
    assert not re.search(r"(^|\s)(kind|kubectl|docker|helm) ", out.replace("/opt/", "X")), (
        "a kind target calls a tool without its variable"
    )


def test_make_help_lists_every_target_with_a_description() -> None:
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([a-z0-9-]+):(?!=)", makefile, re.M))
    described = set(re.findall(r"^([a-z0-9-]+):[^=\n]*## \S", makefile, re.M))
    assert targets - described == set(), "targets without a `## description`"
    result = _make("help")
    assert result.returncode == 0
    listed = {line.split()[0] for line in result.stdout.splitlines() if line.strip()}
    assert targets <= listed
    assert {"deploy-check", "helm-tools", *KIND_PATH, "kind-down"} <= listed
    test_prerequisites = re.search(r"^test:([^#\n]*)", makefile, re.M)
    assert test_prerequisites and "deploy-check" in test_prerequisites.group(1).split()


# --- scripts/kind_e2e.py against a stand-in kubectl ---------------------------------------

FAKE_KUBECTL = """\
import json, os, signal, sys

args = sys.argv[1:]
assert args[:4] == ["--context", "kind-ci", "--namespace", "parley"], args
args = args[4:]
manifests = json.load(open(os.environ["FAKE_MANIFESTS"]))
if args[0] == "port-forward":
    with open(os.environ["FAKE_PIDS"], "a") as pids:
        pids.write(f"{os.getpid()}\\n")
    assert args[1:3] == ["--address", "127.0.0.1"], args
    for remote in args[4:]:
        print(f"Forwarding from 127.0.0.1:{os.environ['FAKE_LOCAL_PORT']} -> {remote[1:]}")
    sys.stdout.flush()
    signal.pause()
assert args[0] == "get" and args[-2:] == ["-o", "json"], args
kind = args[1]
if args[2] == "-l":
    wanted = dict(pair.split("=") for pair in args[3].split(","))
    if kind == "pod":
        (chat,) = [m for m in manifests if m["kind"] == "Deployment"
                   and m["metadata"]["labels"]["app.kubernetes.io/component"] == "chat"]
        template = chat["spec"]["template"]
        labels = template["metadata"]["labels"]
        items = [{"metadata": {"name": f"parley-chat-{i}", "labels": labels},
                  "spec": template["spec"],
                  "status": {"conditions": [{"type": "Ready", "status": "True"}]}}
                 for i in range(3)]
    else:
        items = [m for m in manifests if m["kind"].lower() == kind]
    items = [i for i in items if wanted.items() <= i["metadata"].get("labels", {}).items()]
    print(json.dumps({"items": items}))
else:
    (item,) = [m for m in manifests if m["kind"].lower() == kind
               and m["metadata"]["name"] == args[2]]
    print(json.dumps(item))
"""


def test_kind_e2e_script_forwards_waits_mints_tokens_and_cleans_up(
    deploy: Any, helm4: str, tmp_path: Path
) -> None:
    import json
    import sys
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    manifests = deploy.render(helm4, deploy.chart_dir / "ci" / "kind-values.yaml")
    (tmp_path / "manifests.json").write_text(json.dumps(manifests))
    kubectl = tmp_path / "kubectl"
    kubectl.write_text(f"#!{sys.executable}\n{FAKE_KUBECTL}")
    kubectl.chmod(0o755)

    # Every port-forward lands on one health server where both services are SERVING.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = health.HealthServicer()
    for name in ("user.UserService", "chat.ChatService"):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        result = subprocess.run(
            [sys.executable, "scripts/kind_e2e.py", "--kubectl", str(kubectl),
             "--context", "kind-ci", "--namespace", "parley", "--release", "parley",
             "--", "--version"],
            cwd=REPO, capture_output=True, text=True, timeout=120,
            env={**os.environ, "FAKE_MANIFESTS": str(tmp_path / "manifests.json"),
                 "FAKE_LOCAL_PORT": str(port), "FAKE_PIDS": str(tmp_path / "pids")},
        )  # fmt: skip
    finally:
        server.stop(None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"user.UserService at 127.0.0.1:{port}: SERVING" in result.stdout
    assert result.stdout.count("chat.ChatService at") == 2  # two replicas, two forwards
    variables = ("PARLEY_CHAT2_ADDR, PARLEY_CHAT_ADDR, PARLEY_JWT_AUDIENCE, PARLEY_JWT_ISSUER, "
                 "PARLEY_JWT_SECRET, PARLEY_TOKEN, PARLEY_TOKEN_READONLY, PARLEY_USER_ADDR, "
                 "PARLEY_USER_METRICS_ADDR")  # fmt: skip
    assert f"running tests/e2e with {variables}" in result.stdout
    assert "pytest" in result.stdout + result.stderr  # it ran pytest, with --version here
    pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
    assert len(pids) == 3
    for pid in pids:  # every port-forward was stopped
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_the_audit_workflow_runs_make_audit_strictly() -> None:
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "audit.yml").read_text())
    (job,) = workflow["jobs"].values()
    runs = [step.get("run", "") for step in job["steps"]]
    assert "make audit" in runs, runs
    makefile = (REPO / "Makefile").read_text()
    assert "AUDIT_FLAGS ?= --strict" in makefile, "make audit must fail on packages it skipped"
    # PyYAML reads the bare key `on` as True.
    triggers = workflow.get("on", workflow.get(True))
    assert "schedule" in triggers and "pull_request" in triggers, triggers
