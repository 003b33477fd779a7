"""`parley health`: the grpc.health.v1 status of UserService and every ChatService replica."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import typer
from rich.table import Table

from parley.client import AsyncChatClient, AsyncUserClient, HealthStatus, NotFound, ParleyError
from parley.client._base import AsyncClientBase
from parley.client._channel import CHAT_SERVICE, USER_SERVICE, parse_targets, resolve_target
from parley.client.cli.context import Settings, address_errors, command, examples
from parley.client.cli.errors import EXIT_PARTIAL
from parley.client.cli.output import emit_json, print_table, safe_text

__all__ = ["Check", "health", "health_table"]

# What each service reports: the server as a whole (liveness, ""), the service itself
# (readiness), and for chat the UserService it depends on.
USER_CHECKS = ("", USER_SERVICE.name)
CHAT_CHECKS = ("", CHAT_SERVICE.name, "dependency/user-service")

HEALTH_EXAMPLES = examples(
    "parley health",
    "parley health --chat-addr 127.0.0.1:50052,127.0.0.1:50053 -o json",
    "until parley health > /dev/null; do sleep 1; done",
    note="Exit code 0 when every check is SERVING, 3 when any is not (or cannot be reached).",
)


@dataclass(frozen=True)
class Check:
    """One health check's outcome."""

    service: str
    address: str
    check: str
    status: str
    """SERVING, NOT_SERVING, SERVICE_UNKNOWN, UNKNOWN, or the status code of a failed call."""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == HealthStatus.SERVING.name

    def as_json(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "address": self.address,
            "check": self.check,
            "status": self.status,
            "error": self.error,
        }


async def _check(client: AsyncClientBase, service: str, address: str, name: str) -> Check:
    try:
        status = await client.health(name)
    except NotFound:
        return Check(service, address, name, HealthStatus.SERVICE_UNKNOWN.name)
    except ParleyError as error:
        return Check(service, address, name, error.code.name, error.message)
    return Check(service, address, name, status.name)


async def _all_checks(settings: Settings) -> list[Check]:
    user_address = resolve_target(settings.user_addr, USER_SERVICE)
    with address_errors("--user-addr / PARLEY_USER_ADDR"):
        parse_targets(user_address)
    with address_errors("--chat-addr / PARLEY_CHAT_ADDR"):
        chat_addresses = parse_targets(resolve_target(settings.chat_addr, CHAT_SERVICE))
    timeout, provider = settings.call_timeout, settings.tracer_provider
    async with contextlib.AsyncExitStack() as stack:
        user = await stack.enter_async_context(
            AsyncUserClient(user_address, timeout=timeout, tracer_provider=provider)
        )
        pending = [_check(user, "UserService", user_address, name) for name in USER_CHECKS]
        for address in chat_addresses:
            chat = await stack.enter_async_context(
                AsyncChatClient(address, timeout=timeout, tracer_provider=provider)
            )
            pending += [_check(chat, "ChatService", address, name) for name in CHAT_CHECKS]
        return list(await asyncio.gather(*pending))


@command(user=True, chat=True)
def health(settings: Settings) -> None:
    """Check that UserService and every ChatService replica are alive and ready.

    Asks each one's grpc.health.v1 service: liveness (the empty name), readiness
    (user.UserService, chat.ChatService) and, on chat replicas, dependency/user-service.
    Needs no token.
    """
    checks = asyncio.run(_all_checks(settings))
    if settings.json:
        for check in checks:
            emit_json(check.as_json())
    else:
        print_table(health_table(checks))
    if not all(check.ok for check in checks):
        raise typer.Exit(EXIT_PARTIAL)


def health_table(checks: list[Check]) -> Table:
    """The checks as a table; the detail is the server's message of a failed call."""
    table = Table()
    table.add_column("Service", no_wrap=True)
    table.add_column("Address", no_wrap=True)
    table.add_column("Check", no_wrap=True)
    table.add_column("Status", no_wrap=True)
    table.add_column("Detail", overflow="fold")
    for check in checks:
        name = check.check or '"" (liveness)'
        status = safe_text(check.status, style="green" if check.ok else "bold red")
        table.add_row(
            safe_text(check.service),
            safe_text(check.address),
            safe_text(name),
            status,
            safe_text(check.error or ""),
        )
    return table
