"""How the chat commands reach ChatService: the run's clients, and notices of reconnects.

Shared by `parley chat` (its script commands), the interactive chat and `parley rooms`, which
import this module and never each other.
"""

from __future__ import annotations

from collections.abc import Callable

from parley.client import (
    AsyncChatClient,
    ChatClient,
    ConnectionEvent,
    ConnectionState,
    HistoryGap,
)
from parley.client.cli.context import Settings, address_errors

__all__ = [
    "CHAT_ADDRESS_FLAG",
    "async_chat_client",
    "chat_client",
    "gap_notices",
    "reconnect_notices",
]

CHAT_ADDRESS_FLAG = "--chat-addr / PARLEY_CHAT_ADDR"


def chat_client(settings: Settings) -> ChatClient:
    """A sync ChatService client for the run's addresses, token and timeout."""
    with address_errors(CHAT_ADDRESS_FLAG):
        return ChatClient(
            settings.chat_addr,
            token=settings.token,
            timeout=settings.call_timeout,
            tracer_provider=settings.tracer_provider,
        )


def async_chat_client(settings: Settings) -> AsyncChatClient:
    """An asyncio ChatService client for the run's addresses, token and timeout."""
    with address_errors(CHAT_ADDRESS_FLAG):
        return AsyncChatClient(
            settings.chat_addr,
            token=settings.token,
            timeout=settings.call_timeout,
            tracer_provider=settings.tracer_provider,
        )


def reconnect_notices(print_notice: Callable[[str], None]) -> Callable[[ConnectionEvent], None]:
    """An `on_state` callback printing one line when the stream is lost and one when it is
    back, however many attempts it takes in between."""
    lost = False

    def on_state(event: ConnectionEvent) -> None:
        nonlocal lost
        if event.state is ConnectionState.RECONNECTING and not lost:
            lost = True
            why = f" ({event.error.code.name})" if event.error is not None else ""
            print_notice(f"connection to {event.target} lost{why}; reconnecting")
        elif event.state is ConnectionState.CONNECTED and lost:
            lost = False
            resent = f", resent {event.resent} unacknowledged" if event.resent else ""
            print_notice(f"reconnected to {event.target}{resent}")

    return on_state


def gap_notices(print_notice: Callable[[str], None]) -> Callable[[HistoryGap], None]:
    """An `on_gap` callback printing one line for each history gap, in its place among the
    messages: `history gap: messages 41-99 of room general are no longer kept; continuing
    from 100`."""

    def on_gap(gap: HistoryGap) -> None:
        print_notice(gap.describe())

    return on_gap
