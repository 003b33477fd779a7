"""A room's last messages, read backwards a page at a time: for clients and chat sessions alike."""

from __future__ import annotations

from typing import Protocol

from parley.proto import chat_pb2

__all__ = ["INT64_MAX", "MAX_PAGE_SIZE", "MessagePages", "last_messages"]

MAX_PAGE_SIZE = 500
"""The largest ListMessages page a client asks for."""

INT64_MAX = 2**63 - 1
"""A sequence above every stored one: `before` it reads from the newest message, and `after` it
gives an empty page that still reports the room's last sequence."""


class MessagePages(Protocol):
    """Reads one page of a room's stored messages; `AsyncChatClient` is one."""

    async def list_messages_page(
        self, room: str, *, before: int, page_size: int, timeout: float | None
    ) -> chat_pb2.ListMessagesResponse: ...


async def last_messages(
    pages: MessagePages, room: str, count: int, timeout: float | None
) -> tuple[list[chat_pb2.ChatMessage], int]:
    """The last `count` messages of `room`, oldest first, and the room's last sequence as the
    first page reported it (read even when `count` is 0: it is where a session starts)."""
    messages: list[chat_pb2.ChatMessage] = []
    last: int | None = None
    before = INT64_MAX
    while True:
        page = await pages.list_messages_page(
            room,
            before=before,
            page_size=max(1, min(count - len(messages), MAX_PAGE_SIZE)),
            timeout=timeout,
        )
        if last is None:
            last = page.last_sequence
        if count <= 0:
            return [], last
        messages[:0] = page.messages
        if len(messages) >= count or not page.has_more or not page.messages:
            return messages, last
        before = page.messages[0].sequence
