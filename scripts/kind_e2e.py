"""Run tests/e2e against a Parley release in a Kubernetes cluster, through kubectl port-forward.

It finds the release's user Service and chat pods, forwards each to a free local port, waits
until each answers grpc.health.v1 with SERVING, mints tokens with the release's JWT secret
(the SDK's mint_token, as `parley token` does), runs pytest on tests/e2e with the variables
tests/e2e/conftest.py reads, and stops the port-forwards when it ends, whatever the outcome.

Usage (see `make kind-e2e`):
  python scripts/kind_e2e.py --context kind-parley --namespace parley --release parley \
      [--kubectl kubectl] [-- extra pytest arguments]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import selectors
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import grpc

from parley.client.tokens import mint_token
from parley.devstack.errors import DevstackError
from parley.devstack.processes import wait_until
from parley.devstack.services import grpc_serving

ROOT = Path(__file__).resolve().parent.parent
FORWARD_TIMEOUT = 60.0
READY_TIMEOUT = 120.0
# The tokens the e2e suite uses live as long as a whole run may take.
TOKEN_TTL = 3600
_FORWARDING = re.compile(r"^Forwarding from 127\.0\.0\.1:(\d+) -> (\d+)")


class E2EError(Exception):
    pass


class Kubectl:
    def __init__(self, binary: str, context: str, namespace: str) -> None:
        self.base = [binary, "--context", context, "--namespace", namespace]

    def json(self, *args: str) -> Any:
        result = subprocess.run(
            [*self.base, "get", *args, "-o", "json"], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise E2EError(f"kubectl get {' '.join(args)} failed: {result.stderr.strip()}")
        return json.loads(result.stdout)

    def items(self, kind: str, release: str, component: str) -> list[dict[str, Any]]:
        selector = f"app.kubernetes.io/instance={release},app.kubernetes.io/component={component}"
        items: list[dict[str, Any]] = self.json(kind, "-l", selector)["items"]
        return items

    @contextmanager
    def port_forward(self, target: str, remote_ports: list[int]) -> Iterator[dict[int, int]]:
        """Forwards free local ports to `remote_ports` of `target`; yields remote -> local."""
        command = [
            *self.base, "port-forward", "--address", "127.0.0.1", target,
            *(f":{port}" for port in remote_ports),
        ]  # fmt: skip
        # stderr goes to ours, so kubectl's own errors show up in the log.
        process = subprocess.Popen(command, stdout=subprocess.PIPE)
        try:
            ports = _forwarded_ports(process, target, remote_ports)
            # kubectl prints a line per connection: keep reading, or a full pipe stalls it.
            assert process.stdout is not None
            threading.Thread(target=process.stdout.read, daemon=True).start()
            yield ports
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _forwarded_ports(
    process: subprocess.Popen[bytes], target: str, remote_ports: list[int]
) -> dict[int, int]:
    """Reads kubectl's "Forwarding from 127.0.0.1:L -> R" lines until every port is there."""
    assert process.stdout is not None
    local: dict[int, int] = {}
    pending = b""
    deadline = time.monotonic() + FORWARD_TIMEOUT
    fd = process.stdout.fileno()
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while len(local) < len(remote_ports):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(timeout=remaining):
                raise E2EError(f"kubectl port-forward {target}: no forwarding within the timeout")
            chunk = os.read(fd, 4096)  # unbuffered: a line never waits in a reader's buffer
            if not chunk:
                raise E2EError(f"kubectl port-forward {target} exited (its error is above)")
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                match = _FORWARDING.match(line.decode(errors="replace"))
                if match:
                    local[int(match.group(2))] = int(match.group(1))
    return local


def _wait_serving(addr: str, service: str) -> None:
    """Waits, as `make run` waits for its services (parley.devstack), until `service` at
    `addr` reports SERVING on grpc.health.v1."""
    with grpc.insecure_channel(addr) as channel:
        try:
            wait_until(
                lambda: grpc_serving(channel, service),
                timeout=READY_TIMEOUT,
                what=f"{service} at {addr} (port-forward) to report SERVING",
            )
        except DevstackError as exc:
            raise E2EError(str(exc)) from None
    print(f"{service} at {addr}: SERVING", flush=True)


def _container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    for container in pod_spec["containers"]:
        if container["name"] == name:
            return dict(container)
    raise E2EError(f"no container {name!r} in {[c['name'] for c in pod_spec['containers']]}")


def _port(container: dict[str, Any], name: str) -> int:
    for port in container.get("ports", []):
        if port.get("name") == name:
            return int(port["containerPort"])
    raise E2EError(f"container {container['name']} has no port named {name!r}")


def _one(items: list[dict[str, Any]], what: str) -> dict[str, Any]:
    if len(items) != 1:
        raise E2EError(f"expected one {what}, found {len(items)}")
    return items[0]


def _ready(pod: dict[str, Any]) -> bool:
    if pod["metadata"].get("deletionTimestamp"):
        return False
    conditions = pod.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def _readiness(container: dict[str, Any]) -> str:
    """The health service name the readiness probe asks for: what the test waits on too."""
    return str(container["readinessProbe"]["grpc"]["service"])


def _tokens(secret: str, issuer: str, audience: str, claims: dict[str, list[str]]) -> list[str]:
    """One token per subject in `claims` (subject -> scopes), minted as `parley token` does."""
    return [
        mint_token(secret, subject, scopes, ttl=TOKEN_TTL, issuer=issuer, audience=audience)
        for subject, scopes in claims.items()
    ]


def run(args: argparse.Namespace) -> int:
    kubectl = Kubectl(args.kubectl, args.context, args.namespace)
    user = _one(kubectl.items("deployment", args.release, "user"), "user Deployment")
    user_container = _container(user["spec"]["template"]["spec"], "user")

    # The JWT secret and the iss/aud the services check, as the user Deployment reads them.
    env = {e["name"]: e for e in user_container.get("env", [])}
    secret_ref = env["PARLEY_JWT_SECRET"]["valueFrom"]["secretKeyRef"]
    secret_data = kubectl.json("secret", secret_ref["name"])["data"]
    jwt_secret = base64.b64decode(secret_data[secret_ref["key"]]).decode()
    config: dict[str, str] = {}
    for source in user_container.get("envFrom", []):
        if "configMapRef" in source:
            config.update(kubectl.json("configmap", source["configMapRef"]["name"])["data"])
    issuer = config.get("PARLEY_JWT_ISSUER", "parley")
    audience = config.get("PARLEY_JWT_AUDIENCE", "parley")

    services = kubectl.items("service", args.release, "user")
    user_service = _one(
        [s for s in services if s["spec"].get("clusterIP") != "None"], "user Service"
    )
    ports = {p["name"]: int(p["port"]) for p in user_service["spec"]["ports"]}
    chat_pods = sorted(
        (p for p in kubectl.items("pod", args.release, "chat") if _ready(p)),
        key=lambda p: str(p["metadata"]["name"]),
    )[:2]
    if not chat_pods:
        raise E2EError("no ready chat pod")

    with ExitStack() as stack:
        user_ports = stack.enter_context(
            kubectl.port_forward(
                f"service/{user_service['metadata']['name']}", [ports["grpc"], ports["metrics"]]
            )
        )
        user_addr = f"127.0.0.1:{user_ports[ports['grpc']]}"
        test_env = {
            "PARLEY_USER_ADDR": user_addr,
            "PARLEY_USER_METRICS_ADDR": f"127.0.0.1:{user_ports[ports['metrics']]}",
        }
        _wait_serving(user_addr, _readiness(user_container))
        for variable, pod in zip(
            ("PARLEY_CHAT_ADDR", "PARLEY_CHAT2_ADDR"), chat_pods, strict=False
        ):
            chat_container = _container(pod["spec"], "chat")
            grpc_port = _port(chat_container, "grpc")
            forwarded = stack.enter_context(
                kubectl.port_forward(f"pod/{pod['metadata']['name']}", [grpc_port])
            )
            test_env[variable] = f"127.0.0.1:{forwarded[grpc_port]}"
            _wait_serving(test_env[variable], _readiness(chat_container))

        token, readonly = _tokens(jwt_secret, issuer, audience, {"1": ["users:write"], "2": []})
        test_env |= {
            "PARLEY_JWT_SECRET": jwt_secret,
            "PARLEY_JWT_ISSUER": issuer,
            "PARLEY_JWT_AUDIENCE": audience,
            "PARLEY_TOKEN": token,
            "PARLEY_TOKEN_READONLY": readonly,
        }
        print("running tests/e2e with", ", ".join(sorted(test_env)), flush=True)
        command = [sys.executable, "-m", "pytest", "tests/e2e", *args.pytest_args]
        return subprocess.run(command, cwd=ROOT, env={**os.environ, **test_env}).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--kubectl", default="kubectl")
    parser.add_argument("--context", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--release", required=True)
    parser.add_argument("pytest_args", nargs="*", help="after --: extra pytest arguments")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except E2EError as error:
        print(f"kind_e2e: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
