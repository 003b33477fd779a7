# Parley's commands. `make help` lists them; `make run` and `make test` are the two that matter.

SHELL := /bin/bash
.DEFAULT_GOAL := help

UV_VERSION := 0.13.9
TOOLS := $(CURDIR)/.tools
# A pinned uv, installed into .tools/ on first use, so a machine needs only python3 and make.
UV := $(TOOLS)/uv/bin/uv
export UV_PYTHON_DOWNLOADS := never

PACKAGES := libs/proto/src libs/chassis/src services/user/src services/chat/src \
	services/api-client/src tools/devstack/src
# pytest exits 5 when it collects no tests; that is not a failure here.
PYTEST_OK := || [ $$? -eq 5 ]

.PHONY: help run test sync proto proto-check fmt lint typecheck test-unit test-e2e bench clean

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
	$(UV) run --locked pytest libs services tools tests/contract $(PYTEST_OK)

test-e2e: $(UV) ## The e2e suite against a freshly started local stack
	$(UV) run --locked parley-devstack run --ephemeral -- pytest tests/e2e $(PYTEST_OK)

test: sync proto-check lint typecheck test-unit test-e2e ## Everything CI runs

bench: sync ## Benchmarks, each a ratio against a baseline in the same run
	$(UV) run --locked python benchmarks/paging.py

clean: ## Remove caches and the local stack's data (.parley/)
	rm -rf .parley .pytest_cache .mypy_cache .ruff_cache .hypothesis
