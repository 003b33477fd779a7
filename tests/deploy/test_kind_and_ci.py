"""The kind path (deploy/kind, the kind-* Make targets, scripts/kind_e2e.py) and its GitHub
workflow are well-formed and wired to each other; none of it can run without Docker, so this
is what can be checked here."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .helm import CHART, helm_binary, render
from .tools import REPO, venv_tool

KIND_DIR = REPO / "deploy" / "kind"
WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.y*ml"))
KIND_PATH = ["kind-up", "kind-load", "kind-deploy", "kind-e2e"]


def _make(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}
    return subprocess.run(
        ["make", "--no-print-directory", *args], cwd=REPO, capture_output=True, text=True,
        env=env, timeout=60,
    )  # fmt: skip


def test_kind_cluster_configs_parse() -> None:
    configs = sorted(KIND_DIR.glob("*.yaml"))
    assert configs
    kind_values = yaml.safe_load((CHART / "ci" / "kind-values.yaml").read_text())
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
def test_workflow_matches_the_github_workflow_schema(workflow: Path) -> None:
    tool = venv_tool("check-jsonschema")
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
    assert env["KUBECTL"].endswith("/.tools/kubectl/kubectl")
    # Once with each Helm major, both from scripts/fetch_helm.py.
    assert job["strategy"]["matrix"]["helm"] == ["helm3", "helm4"]
    assert job["env"]["HELM"].endswith("/.tools/${{ matrix.helm }}/helm")
    assert "fetch_helm.py" in " ".join(s.get("run", "") for s in steps)


# Settings the workflow may give: which kind, Helm and kubectl to run. Anything else (pytest
# arguments, image tags, the cluster's name...) would test something `make kind-e2e` does not.
WORKFLOW_TOOL_SETTINGS = {"KIND_VERSION", "HELM", "KUBECTL"}


def test_the_kind_workflow_runs_the_targets_as_a_developer_does() -> None:
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "kind-e2e.yml").read_text())
    (job,) = workflow["jobs"].values()
    assert set(workflow.get("env", {})) | set(job.get("env", {})) <= WORKFLOW_TOOL_SETTINGS
    makes = []
    for step in job["steps"]:
        run = step.get("run", "")
        if re.search(r"\bmake\b", run):
            assert "env" not in step, step
            makes += [line.strip() for line in run.splitlines() if re.search(r"\bmake\b", line)]
    # Each a bare `make <target>`: no VAR=value, no -e, no MAKEFLAGS.
    assert makes == [f"make {target}" for target in [*KIND_PATH, "kind-down"]], makes
    assert "KIND_E2E_ARGS" not in (REPO / ".github" / "workflows" / "kind-e2e.yml").read_text()
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^KIND_E2E_ARGS \?=\s*$", makefile, re.M), (
        "kind-e2e must run all of tests/e2e"
    )


# The first major of each action that runs on Node 24 (`runs.using: node24`); the majors
# before it run on Node 20, which GitHub retires. upload-artifact v5 only *supported* Node 24
# and still ran on Node 20 by default; v6 switched. An action missing here fails the test:
# look its runtime up and add it.
NODE24_MAJORS = {
    "actions/checkout": 5,
    "actions/setup-python": 6,
    "actions/setup-go": 6,
    "actions/upload-artifact": 6,
    "actions/download-artifact": 5,
    "actions/cache": 5,
    "actions/setup-node": 5,
}


def _uses(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["uses"]] if isinstance(node.get("uses"), str) else []
        return found + [u for value in node.values() for u in _uses(value)]
    if isinstance(node, list):
        return [u for item in node for u in _uses(item)]
    return []


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_actions_run_on_node_24(workflow: Path) -> None:
    uses = _uses(yaml.safe_load(workflow.read_text(encoding="utf-8")))
    assert uses, "no actions: is this still a workflow?"
    for use in uses:
        # Pinned the repository's way: a major (or fuller) version tag.
        match = re.fullmatch(r"([a-z0-9-]+/[a-z0-9-]+)@v(\d+)(\.\d+)*", use)
        assert match, f"{use}: pin actions to a version tag, e.g. actions/checkout@v7"
        action, major = match.group(1), int(match.group(2))
        assert action in NODE24_MAJORS, f"{action}: add its first Node 24 major to NODE24_MAJORS"
        assert major >= NODE24_MAJORS[action], (
            f"{use} runs on Node 20: use v{NODE24_MAJORS[action]} or later"
        )


def _joined(output: str) -> str:
    return re.sub(r"\s*\\\n\s*", " ", output)  # continuation lines joined


def test_kind_targets_use_the_given_tools_and_the_kind_values(tmp_path: Path) -> None:
    tools = ["KIND=/opt/kind", "KUBECTL=/opt/kubectl", "DOCKER=/opt/docker", "HELM=/opt/helm"]
    (tmp_path / "image-tags").write_text("user=kind-0123456789ab chat=kind-ba9876543210\n")
    result = _make("-n", *KIND_PATH, "kind-down", *tools, "KIND_CLUSTER=ci",
                   f"KIND_TAG_FILE={tmp_path / 'image-tags'}")  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = _joined(result.stdout)
    assert "/opt/kind create cluster --name ci --config deploy/kind/cluster.yaml" in out
    for image in ("user", "chat"):
        assert (f"/opt/docker build -f Dockerfile --build-arg SERVICE={image} "
                f"--iidfile .parley/kind/{image}.iid .") in out  # fmt: skip
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


# --- The kind targets with Helm 3 and Helm 4, docker and podman --------------------------

# Stand-ins for docker/podman, kind, helm and kubectl: each logs its arguments (and kind's
# KIND_EXPERIMENTAL_PROVIDER) as a JSON line to $FAKE_LOG. The engine answers --version with
# $FAKE_VERSION and "builds" an image whose ID is a hash of $FAKE_CONTENT, the Dockerfile and
# its build argument.
FAKE_TOOL = """\
import hashlib, json, os, sys

name, args = os.path.basename(sys.argv[0]), sys.argv[1:]
record = {"tool": name, "args": args, "provider": os.environ.get("KIND_EXPERIMENTAL_PROVIDER")}
def option(flag):
    return args[args.index(flag) + 1]
if name in ("docker", "podman"):
    if args == ["--version"]:
        print(os.environ["FAKE_VERSION"])
        sys.exit(0)
    if args[0] == "build":
        content = os.environ["FAKE_CONTENT"] + option("-f") + option("--build-arg")
        with open(option("--iidfile"), "w") as iid:
            iid.write("sha256:" + hashlib.sha256(content.encode()).hexdigest())
    elif args[0] == "save":
        with open(option("-o"), "w") as archive:
            archive.write("archive of " + args[-1])
elif name == "kind" and args[:2] == ["load", "image-archive"]:
    record["archives"] = [open(path).read() for path in args[4:]]
elif name == "helm" and args[0] == "test":
    status = int(os.environ.get("FAKE_HELM_TEST_STATUS", "0"))
elif name == "kubectl" and "logs" in args:
    status = int(os.environ.get("FAKE_LOGS_STATUS", "0"))
    print("log of the test pod" if status == 0 else "", end="")
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(record) + "\\n")
sys.exit(locals().get("status", 0))
"""

ENGINE_VERSIONS = {
    "docker": "Docker version 28.2.2, build e6534b4",
    "podman": "podman version 5.4.0",
    # podman-docker: a `docker` command that is podman.
    "podman-docker": "podman version 5.4.0",
}


def _fake_tools(directory: Path) -> dict[str, str]:
    import sys

    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in ("docker", "podman", "kind", "helm", "kubectl"):
        path = directory / name
        path.write_text(f"#!{sys.executable}\n{FAKE_TOOL}")
        path.chmod(0o755)
        paths[name] = str(path)
    return paths


def _engine_settings(engine: str, tools: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """DOCKER= for `engine`, and the environment its stand-in answers --version with."""
    docker = tools["podman"] if engine == "podman" else tools["docker"]
    return [f"DOCKER={docker}"], {"FAKE_VERSION": ENGINE_VERSIONS[engine]}


def _make_env(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS", "KIND"))}
    return subprocess.run(
        ["make", "--no-print-directory", *args], cwd=REPO, capture_output=True, text=True,
        env={**clean, **env}, timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize("engine", ["docker", "podman", "podman-docker"])
@pytest.mark.parametrize("helm_major", ["helm3", "helm4"])
def test_kind_dry_run_with_each_helm_and_engine(
    helm_major: str, engine: str, tmp_path: Path
) -> None:
    helm = helm_binary(helm_major)  # the real binary: HELM may name either major
    tools = _fake_tools(tmp_path / "bin")
    engine_args, env = _engine_settings(engine, tools)
    engine_command = engine_args[0].removeprefix("DOCKER=")
    (tmp_path / "image-tags").write_text("user=kind-0123456789ab chat=kind-ba9876543210\n")
    result = _make_env(
        "-n", *KIND_PATH, "kind-down", *engine_args, f"HELM={helm}", "KIND=kind",
        "KUBECTL=kubectl", f"KIND_TAG_FILE={tmp_path / 'image-tags'}",
        env={**env, "FAKE_LOG": str(tmp_path / "log")},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = _joined(result.stdout)
    # -n runs nothing but `$(DOCKER) --version` (which needs no engine running).
    log = (tmp_path / "log").read_text().splitlines() if (tmp_path / "log").exists() else []
    assert all(json.loads(line)["args"] == ["--version"] for line in log), log

    # Built, tagged by image ID, recorded for kind-deploy; loaded the engine's way.
    user = "docker.io/library/parley-user"
    for image in ("user", "chat"):
        assert (f"{engine_command} build -f Dockerfile --build-arg SERVICE={image} "
                f"--iidfile .parley/kind/{image}.iid .") in out  # fmt: skip
    assert f"user={user}:kind-${{user_id:0:12}}" in out
    assert f'{engine_command} tag "$user_id" "$user"' in out
    assert 'echo "user=${user##*:} chat=${chat##*:}" > ' + str(tmp_path / "image-tags") in out
    if engine == "docker":
        assert 'kind load docker-image --name parley "$user" "$chat"' in out
        assert "image-archive" not in out and " save " not in out
        assert "KIND_EXPERIMENTAL_PROVIDER" not in out
    else:
        assert (
            f'{engine_command} save --format docker-archive -o "$archives/user.tar" "$user"' in out
        )
        # One archive per load: kind before v0.24 loads only the first one it is given.
        for image in ("user", "chat"):
            assert ('KIND_EXPERIMENTAL_PROVIDER=podman kind load image-archive --name parley '
                    f'"$archives/{image}.tar";') in out  # fmt: skip
        assert "load docker-image" not in out
        for command in ("create cluster", "get clusters", "delete cluster"):
            assert f"KIND_EXPERIMENTAL_PROVIDER=podman kind {command}" in out

    # kind-deploy: the tags its shell reads from the file kind-load wrote (not make's $(file),
    # which GNU make 3.81 lacks), and the names kind loaded.
    assert f"for pair in $(cat '{tmp_path / 'image-tags'}')" in out
    assert (f"--set-string user.image.repository={user} "
            '--set-string user.image.tag="$user_tag" '
            "--set-string chat.image.repository=docker.io/library/parley-chat "
            '--set-string chat.image.tag="$chat_tag"') in out  # fmt: skip
    assert "$(file " not in (REPO / "Makefile").read_text()

    # kind-e2e: no --logs (Helm 3 fails it after a passed test pod is deleted); kubectl prints
    # the log, and the status is helm test's. No pytest arguments: all of tests/e2e runs.
    helm_test = re.search(rf"{re.escape(helm)} test parley [^;|]*", out)
    assert helm_test and "--logs" not in helm_test.group(0), out
    assert "|| status=$?;" in out and "exit $status" in out
    assert re.search(r"kubectl --context kind-parley --namespace parley logs --selector "
                     r"app.kubernetes.io/instance=parley,app.kubernetes.io/component=test "
                     r".*--tail=-1 \|\| true", out)  # fmt: skip
    assert out.index(" test parley ") < out.index(" logs --selector ") < out.index("kind_e2e.py")
    assert "--ignore" not in out
    assert re.search(r"scripts/kind_e2e.py .* --release parley -- *(\n|$)", out), out


@pytest.mark.parametrize("engine", ["docker", "podman"])
def test_kind_load_tags_each_build_by_content_and_kind_deploy_rolls_to_it(
    engine: str, tmp_path: Path
) -> None:
    tools = _fake_tools(tmp_path / "bin")
    engine_args, env = _engine_settings(engine, tools)
    state = tmp_path / "state"
    (tmp_path / "tmp").mkdir()
    settings = [*engine_args, f"KIND={tools['kind']}", f"HELM={tools['helm']}",
                f"KUBECTL={tools['kubectl']}", f"KIND_STATE={state}"]  # fmt: skip
    env |= {"FAKE_LOG": str(tmp_path / "log"), "TMPDIR": str(tmp_path / "tmp")}

    def load_and_deploy(content: str, *extra: str) -> tuple[dict[str, str], list[dict[str, Any]]]:
        (tmp_path / "log").write_text("")
        result = _make_env("kind-load", "kind-deploy", *settings, *extra,
                           env={**env, "FAKE_CONTENT": content})  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        calls = [json.loads(line) for line in (tmp_path / "log").read_text().splitlines()]
        recorded = dict(pair.split("=") for pair in (state / "image-tags").read_text().split())
        return recorded, calls

    def image_id(content: str, image: str) -> str:
        return hashlib.sha256(f"{content}DockerfileSERVICE={image}".encode()).hexdigest()

    first, calls = load_and_deploy("code v1")
    assert first == {image: f"kind-{image_id('code v1', image)[:12]}" for image in ("user", "chat")}
    tags = [c["args"] for c in calls if c["tool"] == engine and c["args"][0] == "tag"]
    assert tags == [
        ["tag", image_id("code v1", "user"), f"docker.io/library/parley-user:{first['user']}"],
        ["tag", image_id("code v1", "chat"), f"docker.io/library/parley-chat:{first['chat']}"],
    ]
    (upgrade,) = [c["args"] for c in calls if c["tool"] == "helm"]
    assert f"user.image.tag={first['user']}" in upgrade
    assert f"chat.image.tag={first['chat']}" in upgrade
    assert "user.image.repository=docker.io/library/parley-user" in upgrade
    loads = [c for c in calls if c["tool"] == "kind"]
    if engine == "docker":
        (load,) = loads
        assert load["args"][:2] == ["load", "docker-image"] and load["provider"] is None
    else:
        assert all(load["provider"] == "podman" for load in loads)
        assert all(load["args"][:2] == ["load", "image-archive"] for load in loads)
        assert [load["archives"] for load in loads] == [
            [f"archive of docker.io/library/parley-user:{first['user']}"],
            [f"archive of docker.io/library/parley-chat:{first['chat']}"],
        ]
        assert list((tmp_path / "tmp").iterdir()) == []  # the archives were removed

    # The same build again: the same tags, nothing rolls. Changed code: new tags, pods roll.
    assert load_and_deploy("code v1")[0] == first
    second, calls = load_and_deploy("code v2")
    assert second["user"] != first["user"] and second["chat"] != first["chat"]
    (upgrade,) = [c["args"] for c in calls if c["tool"] == "helm"]
    assert f"user.image.tag={second['user']}" in upgrade

    # KIND_IMAGE_TAG still names the tag of both.
    fixed, calls = load_and_deploy("code v3", "KIND_IMAGE_TAG=mine")
    assert fixed == {"user": "mine", "chat": "mine"}
    (upgrade,) = [c["args"] for c in calls if c["tool"] == "helm"]
    assert "user.image.tag=mine" in upgrade and "chat.image.tag=mine" in upgrade


def test_kind_deploy_without_kind_load_says_what_to_do(tmp_path: Path) -> None:
    tools = _fake_tools(tmp_path / "bin")
    result = _make_env("kind-deploy", f"HELM={tools['helm']}", f"KIND_STATE={tmp_path}",
                       env={"FAKE_LOG": str(tmp_path / "log")})  # fmt: skip
    assert result.returncode != 0
    assert "run make kind-load" in result.stdout + result.stderr
    assert not (tmp_path / "log").exists()  # helm never ran


@pytest.mark.parametrize(
    ("helm_test_status", "logs_status"),
    [(0, 1), (0, 0), (1, 0)],
    ids=["passed-pod-deleted", "passed-pod-kept", "failed"],
)
def test_kind_e2e_prints_the_test_log_and_keeps_helm_tests_status(
    helm_test_status: int, logs_status: int, tmp_path: Path
) -> None:
    tools = _fake_tools(tmp_path / "bin")
    # UV=/bin/true: the e2e step itself (scripts/kind_e2e.py) is tested on its own below.
    result = _make_env(
        "kind-e2e", f"HELM={tools['helm']}", f"KUBECTL={tools['kubectl']}", "UV=/bin/true",
        env={"FAKE_LOG": str(tmp_path / "log"), "FAKE_HELM_TEST_STATUS": str(helm_test_status),
             "FAKE_LOGS_STATUS": str(logs_status)},
    )  # fmt: skip
    calls = [json.loads(line) for line in (tmp_path / "log").read_text().splitlines()]
    assert [c["tool"] for c in calls] == ["helm", "kubectl"]
    assert calls[0]["args"][0] == "test" and "--logs" not in calls[0]["args"]
    if logs_status == 0:
        assert "log of the test pod" in result.stdout
    if helm_test_status == 0:
        assert result.returncode == 0, result.stdout + result.stderr
        assert "kind_e2e.py" in result.stdout  # went on to the e2e suite
    else:
        assert result.returncode != 0
        assert "kind_e2e.py" not in result.stdout


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
    helm4: str, tmp_path: Path
) -> None:
    import sys
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    manifests = render(helm4, CHART / "ci" / "kind-values.yaml")
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
