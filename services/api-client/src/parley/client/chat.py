"""Clients for ChatService: `ChatClient` (sync) and `AsyncChatClient` (asyncio).

    async with AsyncChatClient("127.0.0.1:50052,127.0.0.1:50053", token=token) as chat:
        async with chat.session("general", history=20) as session:
            await session.send("hello")
            async for message in session:
                print(message.sequence, message.user, message.text)

`session()` (asyncio only) joins a room and stays joined across dropped connections and
replica restarts: see `parley.client.session.ChatSession`. The other methods read history
and presence, and `post()` sends messages without staying in the room. Methods return the
generated messages (`parley.proto.chat_pb2.ChatMessage`, ...). Every call except a session's
stream has a deadline (the client's `timeout` or the call's `timeout=`); ListMessages and
ListPresence are retried on UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence

import grpc
import grpc.aio

from parley.client._base import AsyncClientBase, SyncClientBase
from parley.client._channel import CHAT_SERVICE
from parley.client.errors import (
    CallContext,
    DeadlineExceeded,
    ParleyError,
    Unavailable,
    error_from_rpc,
)
from parley.client.session import (
    MAX_TEXT_BYTES,
    ChatSession,
    ReconnectPolicy,
    StateCallback,
    check_text,
)
from parley.proto import chat_pb2, chat_pb2_grpc

__all__ = [
    "DEFAULT_ROOM",
    "MAX_TEXT_BYTES",
    "AsyncChatClient",
    "ChatClient",
    "check_text",
]

DEFAULT_ROOM = "general"
ROOM_KEY = "x-chat-room"
RESUME_KEY = "x-chat-resume-after"
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 500
# "After the highest possible sequence": an empty page that still reports the room's last one.
_INT64_MAX = 2**63 - 1


def _check_page_size(page_size: int) -> None:
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise ValueError(f"page_size must be 1 to {MAX_PAGE_SIZE}, got {page_size}")


def _history_request(
    room: str, after: int, before: int, page_size: int
) -> chat_pb2.ListMessagesRequest:
    _check_page_size(page_size)
    return chat_pb2.ListMessagesRequest(
        room=room, after_sequence=after, before_sequence=before, page_size=page_size
    )


def _posts(texts: Sequence[str]) -> list[chat_pb2.ChatMessage]:
    for text in texts:
        check_text(text)
    return [chat_pb2.ChatMessage(text=t, client_message_id=uuid.uuid4().hex) for t in texts]


class ChatClient(SyncClientBase):
    """A sync client of ChatService.

    `target` is `host:port`, `dns:///host:port`, several addresses separated by commas (tried
    in turn, e.g. both replicas `127.0.0.1:50052,127.0.0.1:50053`), or None for
    `$PARLEY_CHAT_ADDR`, else `localhost:50052`. The other arguments are those of
    `parley.client.UserClient`. Chat needs a token whose subject is the id of an existing user.
    For a live conversation use `AsyncChatClient.session()`.
    """

    _service = CHAT_SERVICE

    def _stub(self, channel: grpc.Channel) -> chat_pb2_grpc.ChatServiceStub:
        return chat_pb2_grpc.ChatServiceStub(channel)

    def list_messages_page(
        self,
        room: str = DEFAULT_ROOM,
        *,
        after: int = 0,
        before: int = 0,
        page_size: int = DEFAULT_PAGE_SIZE,
        timeout: float | None = None,
    ) -> chat_pb2.ListMessagesResponse:
        """One page of a room's stored messages, oldest first: those after sequence `after`,
        or, when `before` is positive, the newest ones before sequence `before`.

        The reply's `has_more` says whether more exist in that direction, and `last_sequence`
        is the room's highest sequence.
        """
        deadline = self._deadline(timeout)
        request = _history_request(room, after, before, page_size)
        return self._call(
            "ListMessages",
            deadline,
            lambda ch: self._stub(ch).ListMessages(request, timeout=deadline),
            idempotent=True,
        )

    def list_messages(
        self,
        room: str = DEFAULT_ROOM,
        *,
        after: int = 0,
        page_size: int = DEFAULT_PAGE_SIZE,
        timeout: float | None = None,
    ) -> Iterator[chat_pb2.ChatMessage]:
        """Every stored message of a room with a sequence above `after`, oldest first, fetched
        a page at a time (each page one call with its own deadline)."""
        while True:
            page = self.list_messages_page(room, after=after, page_size=page_size, timeout=timeout)
            yield from page.messages
            if not page.has_more or not page.messages:
                return
            after = page.messages[-1].sequence

    def recent_messages(
        self, room: str = DEFAULT_ROOM, count: int = 20, *, timeout: float | None = None
    ) -> list[chat_pb2.ChatMessage]:
        """The last `count` messages of a room, oldest first."""
        messages: list[chat_pb2.ChatMessage] = []
        before = _INT64_MAX
        while len(messages) < count:
            page = self.list_messages_page(
                room,
                before=before,
                page_size=min(count - len(messages), MAX_PAGE_SIZE),
                timeout=timeout,
            )
            messages[:0] = page.messages
            if not page.has_more or not page.messages:
                break
            before = page.messages[0].sequence
        return messages

    def presence(
        self, room: str = DEFAULT_ROOM, *, timeout: float | None = None
    ) -> list[chat_pb2.RoomMember]:
        """Who is connected to a room now, on any replica, by user id."""
        deadline = self._deadline(timeout)
        request = chat_pb2.ListPresenceRequest(room=room)
        reply = self._call(
            "ListPresence",
            deadline,
            lambda ch: self._stub(ch).ListPresence(request, timeout=deadline),
            idempotent=True,
        )
        return list(reply.members)

    def post(
        self, room: str, *texts: str, timeout: float | None = None
    ) -> list[chat_pb2.ChatMessage]:
        """Send messages to a room without staying in it; returns them as stored (with their
        sequence numbers), in the order given.

        Opens a StreamChat call, sends the texts, and waits (up to the deadline) for the
        server's echo of each. Keep to the rate limit (a burst of 40 by default): beyond it
        the call fails with `ResourceExhausted`. Raises ValueError for an empty or over-long
        text before sending anything.
        """
        requests = _posts(texts)
        if not requests:
            return []
        deadline = self._deadline(timeout)
        wanted = {r.client_message_id for r in requests}
        stored: dict[str, chat_pb2.ChatMessage] = {}
        with self._errors("StreamChat", deadline):
            call = self._stub(self._targets.channel()).StreamChat(
                iter(requests), timeout=deadline, metadata=((ROOM_KEY, room),)
            )
            try:
                for message in call:
                    if message.client_message_id in wanted:
                        stored[message.client_message_id] = message
                    if len(stored) == len(wanted):
                        break
            finally:
                call.cancel()
        if len(stored) < len(wanted):
            raise Unavailable(
                "the stream ended before every message was acknowledged",
                target=self.target,
                method="/chat.ChatService/StreamChat",
                hint="retry: messages already stored are not stored twice",
            )
        return [stored[r.client_message_id] for r in requests]


class AsyncChatClient(AsyncClientBase):
    """The asyncio client of ChatService: history, presence, posting, and live sessions.

    See `ChatClient` for the arguments and `session()` for staying in a room. Create it inside
    the event loop that uses it; use `async with` or `await close()`.
    """

    _service = CHAT_SERVICE

    def _stub(self, channel: grpc.aio.Channel) -> chat_pb2_grpc.ChatServiceAsyncStub:
        return chat_pb2_grpc.ChatServiceStub(channel)

    async def list_messages_page(
        self,
        room: str = DEFAULT_ROOM,
        *,
        after: int = 0,
        before: int = 0,
        page_size: int = DEFAULT_PAGE_SIZE,
        timeout: float | None = None,
    ) -> chat_pb2.ListMessagesResponse:
        """One page of a room's stored messages; see `ChatClient.list_messages_page`."""
        deadline = self._deadline(timeout)
        request = _history_request(room, after, before, page_size)

        async def invoke(channel: grpc.aio.Channel) -> chat_pb2.ListMessagesResponse:
            return await self._stub(channel).ListMessages(request, timeout=deadline)

        return await self._call("ListMessages", deadline, invoke, idempotent=True)

    async def list_messages(
        self,
        room: str = DEFAULT_ROOM,
        *,
        after: int = 0,
        page_size: int = DEFAULT_PAGE_SIZE,
        timeout: float | None = None,
    ) -> AsyncIterator[chat_pb2.ChatMessage]:
        """Every stored message of a room with a sequence above `after`, oldest first."""
        while True:
            page = await self.list_messages_page(
                room, after=after, page_size=page_size, timeout=timeout
            )
            for message in page.messages:
                yield message
            if not page.has_more or not page.messages:
                return
            after = page.messages[-1].sequence

    async def recent_messages(
        self, room: str = DEFAULT_ROOM, count: int = 20, *, timeout: float | None = None
    ) -> list[chat_pb2.ChatMessage]:
        """The last `count` messages of a room, oldest first."""
        messages, _ = await self._recent(room, count, timeout)
        return messages

    async def _recent(
        self, room: str, count: int, timeout: float | None
    ) -> tuple[list[chat_pb2.ChatMessage], int]:
        """The last `count` messages, and the room's last sequence when the first page was read."""
        messages: list[chat_pb2.ChatMessage] = []
        last: int | None = None
        before = _INT64_MAX
        while True:
            page = await self.list_messages_page(
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

    async def last_sequence(self, room: str = DEFAULT_ROOM, *, timeout: float | None = None) -> int:
        """The highest sequence stored in a room (0 for a room without messages)."""
        page = await self.list_messages_page(room, after=_INT64_MAX, page_size=1, timeout=timeout)
        return page.last_sequence

    async def presence(
        self, room: str = DEFAULT_ROOM, *, timeout: float | None = None
    ) -> list[chat_pb2.RoomMember]:
        """Who is connected to a room now, on any replica, by user id."""
        deadline = self._deadline(timeout)
        request = chat_pb2.ListPresenceRequest(room=room)

        async def invoke(channel: grpc.aio.Channel) -> chat_pb2.ListPresenceResponse:
            return await self._stub(channel).ListPresence(request, timeout=deadline)

        return list((await self._call("ListPresence", deadline, invoke, idempotent=True)).members)

    async def post(
        self, room: str, *texts: str, timeout: float | None = None
    ) -> list[chat_pb2.ChatMessage]:
        """Send messages to a room without staying in it; returns them as stored (with their
        sequence numbers), in the order given.

        A short `session()`: it reconnects and resends like one, so each message is stored
        once. Keep to the rate limit (a burst of 40 by default): beyond it the call raises
        `ResourceExhausted`. The whole call has one deadline, and raises `DeadlineExceeded`
        when it passes.
        """
        for text in texts:
            check_text(text)
        if not texts:
            return []
        deadline = self._deadline(timeout)
        policy = ReconnectPolicy(give_up_after=deadline, retry_rate_limited=False)
        try:
            async with asyncio.timeout(deadline):
                async with self.session(room, policy=policy, flush_timeout=0) as session:
                    sent = [await session.send(text) for text in texts]
                    return [await session.wait_stored(client_id) for client_id in sent]
        except TimeoutError:
            raise DeadlineExceeded(
                "the messages were not all acknowledged before the deadline",
                target=self.target,
                method="/chat.ChatService/StreamChat",
                hint=f"raise the timeout (it was {deadline:g}s) or check the server's load",
            ) from None

    def session(
        self,
        room: str = DEFAULT_ROOM,
        *,
        resume_after: int | None = None,
        history: int = 0,
        policy: ReconnectPolicy | None = None,
        on_state: StateCallback | None = None,
        buffer_size: int = 1024,
        flush_timeout: float = 5.0,
    ) -> ChatSession:
        """A live session in `room`, joined by `async with` (or `await session.open()`).

        - `history=N` first delivers the room's last N messages, then live ones.
        - `resume_after=S` delivers every message after sequence S, then live ones (use the
          `last_sequence` of an earlier session to continue it). Not together with `history`.
        - Neither: the messages stored after joining.

        The session reconnects by itself (see `ReconnectPolicy`); `on_state` is called with a
        `ConnectionEvent` at each change of its connection. See `ChatSession`.
        """
        return ChatSession(
            self,
            room,
            resume_after=resume_after,
            history=history,
            policy=policy or ReconnectPolicy(),
            on_state=on_state,
            buffer_size=buffer_size,
            flush_timeout=flush_timeout,
        )

    # What a ChatSession needs from its client, kept narrow on purpose.

    def _stream_target(self) -> tuple[str, grpc.aio.Channel]:
        return self._targets.current, self._targets.channel()

    def _next_target(self) -> None:
        self._targets.advance()

    def _stream_error(self, error: grpc.RpcError) -> ParleyError:
        return error_from_rpc(
            error,
            CallContext(
                target=self._targets.text,
                method="/chat.ChatService/StreamChat",
                address_env=self._service.address_env,
                timeout=None,
                token_sent=self._token is not None,
            ),
        )
