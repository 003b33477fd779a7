# syntax=docker/dockerfile:1
# Parley's service images, one per value of SERVICE. Build from the repository root:
#   docker build --build-arg SERVICE=user -t parley-user .
#   docker build --build-arg SERVICE=chat -t parley-chat .
# SERVICE picks the workspace member services/<SERVICE> (package parley-<SERVICE>), and the
# stage service-<SERVICE> below, which gives the image its ports and its command. Only that
# member, libs/proto and libs/chassis are copied as sources, so a change anywhere else (the
# SDK, the tools, the other service) leaves every layer of the image cached.
# BASE_IMAGE must be the same in every stage: the virtualenv links to its interpreter.
ARG BASE_IMAGE=docker.io/library/python:3.11.14-slim-bookworm
ARG SERVICE

FROM ${BASE_IMAGE} AS build
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv UV_NATIVE_TLS=1
RUN python3 -m venv /opt/uv && /opt/uv/bin/pip install --no-cache-dir uv==0.13.9
WORKDIR /src
# Dependencies first, in their own layer: it changes only when the lock does. uv sync
# --locked reads every workspace member's pyproject.toml to check the lock, so all are here.
COPY uv.lock pyproject.toml ./
COPY libs/proto/pyproject.toml libs/proto/
COPY libs/chassis/pyproject.toml libs/chassis/
COPY libs/testing/pyproject.toml libs/testing/
COPY services/user/pyproject.toml services/user/
COPY services/chat/pyproject.toml services/chat/
COPY services/api-client/pyproject.toml services/api-client/
COPY tools/devstack/pyproject.toml tools/devstack/
COPY tools/bench/pyproject.toml tools/bench/
# Declared here, not above: every RUN after it depends on its value, and the steps before
# it are shared by both images.
ARG SERVICE
RUN /opt/uv/bin/uv sync --locked --no-dev --no-install-workspace --package "parley-${SERVICE}"
# The sources of the service's own members only, least often changed first.
COPY libs/proto libs/proto
COPY libs/chassis libs/chassis
COPY services/${SERVICE} services/${SERVICE}
RUN /opt/uv/bin/uv sync --locked --no-dev --no-editable --package "parley-${SERVICE}"

FROM ${BASE_IMAGE} AS runtime
COPY --from=build /app/.venv /app/.venv
ENV PATH=/app/.venv/bin:$PATH PYTHONUNBUFFERED=1
USER 10001:10001
STOPSIGNAL SIGTERM

# What differs between the services. CMD comes after ENTRYPOINT, which would reset it.
FROM runtime AS service-user
EXPOSE 50051 9101
ENTRYPOINT ["parley-user"]
CMD ["serve"]

FROM runtime AS service-chat
EXPOSE 50052 9102
ENTRYPOINT ["parley-chat"]
CMD ["serve"]

# A stage of this file, not an image to pull (hadolint cannot tell).
# hadolint ignore=DL3006
FROM service-${SERVICE}
