"""A chat client for tests, on raw gRPC: streams that record everything they receive across
reconnects, resend what was not acknowledged, and presence checks that tell when a stream
has joined its room.

`Chat` makes the clients of one test (`await chat(person, served, room=...)`) and closes them
afterwards; `Channels` shares client channels by target.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import pytest

from parley.proto import chat_pb2, chat_pb2_grpc
from parley.proto.contract import RESUME_KEY, ROOM_KEY
from parley.testing.launcher import Served
from parley.testing.stack import Person, StoredMessage, check_conversation
from parley.testing.tokens import bearer
from parley.testing.waiting import wait_until

__all__ = [
    "WRITE_ERRORS",
    "Channels",
    "Chat",
    "ChatClient",
    "check_clients",
    "expected_counts",
    "everyone_has",
    "presence",
    "send_round",
    "wait_for_streams",
]


async def send_round(senders: Sequence[ChatClient], label: str, each: int) -> None:
    """Every sender sends `each` messages (`label k from NAME`), all senders at once."""

    async def talk(sender: ChatClient) -> None:
        for k in range(each):
            await sender.send(f"{label} {k} from {sender.person.name}")

    await asyncio.gather(*(talk(sender) for sender in senders))


def everyone_has(clients: Sequence[ChatClient], count: int) -> Callable[[], bool]:
    """A condition: every client has received at least `count` messages."""
    return lambda: all(len(c.received) >= count for c in clients)


# What writing to a stream that has ended raises.
WRITE_ERRORS = (grpc.aio.AioRpcError, asyncio.InvalidStateError)


class Channels:
    """Client channels by target (and optional key), closed together."""

    def __init__(self) -> None:
        self._channels: dict[tuple[str, Any], grpc.aio.Channel] = {}

    def get(
        self, target: str, key: Any = None, options: Sequence[tuple[str, Any]] = ()
    ) -> grpc.aio.Channel:
        if (target, key) not in self._channels:
            self._channels[(target, key)] = grpc.aio.insecure_channel(target, options=options)
        return self._channels[(target, key)]

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels.values()))
        self._channels.clear()


class ChatClient:
    """One chat user in one room: a StreamChat call at a time, everything it received across
    reconnects, and an outbox of messages with client ids for resending until acknowledged."""

    _ids = itertools.count(1)

    def __init__(self, channels: Channels, person: Person, room: str | None) -> None:
        self.person = person
        self.room = room
        self.name = f"{person.name}#{next(self._ids)}"
        self._channels = channels
        self.received: list[chat_pb2.ChatMessage] = []
        self.outbox: dict[str, str] = {}
        self.call: Any = None
        self.service: Served | None = None
        self.error: grpc.aio.AioRpcError | None = None
        self.ended = True
        self.connections = 0
        self._reader: asyncio.Task[None] | None = None

    def metadata(self, resume_after: int | str | None) -> list[tuple[str, str]]:
        metadata = bearer(self.person.token)
        if self.room is not None:
            metadata.append((ROOM_KEY, self.room))
        if resume_after is not None:
            metadata.append((RESUME_KEY, str(resume_after)))
        return metadata

    async def connect(
        self,
        service: Served,
        *,
        resume_after: int | str | None = None,
        channel_key: Any = None,
        channel_options: Sequence[tuple[str, Any]] = (),
        read: bool = True,
    ) -> ChatClient:
        """Opens a stream on `service` (the previous one must have ended); with `read` false
        nothing is read from it until `start_reading()`."""
        assert self.ended, f"{self.name} is still connected"
        channel = self._channels.get(service.target, channel_key, channel_options)
        self.service = service
        self.error = None
        self.ended = False
        self.connections += 1
        stub: Any = chat_pb2_grpc.ChatServiceStub(channel)  # the stubs' types are the sync ones
        self.call = stub.StreamChat(metadata=self.metadata(resume_after))
        self._reader = None
        if read:
            self.start_reading()
        return self

    def start_reading(self) -> None:
        assert self._reader is None, f"{self.name} is already reading"
        self._reader = asyncio.create_task(self._read(self.call), name=f"read-{self.name}")

    async def resume(self, service: Served) -> ChatClient:
        """Reconnects to `service`, resuming after the last sequence received."""
        return await self.connect(service, resume_after=self.last_sequence)

    async def _read(self, call: Any) -> None:
        try:
            while True:
                message = await call.read()
                if message is grpc.aio.EOF:
                    break
                self.received.append(message)
        except grpc.aio.AioRpcError as error:
            self.error = error
        finally:
            self.ended = True

    @property
    def code(self) -> grpc.StatusCode | None:
        return None if self.error is None else self.error.code()

    @property
    def sequences(self) -> list[int]:
        return [m.sequence for m in self.received]

    @property
    def last_sequence(self) -> int:
        return self.received[-1].sequence if self.received else 0

    @property
    def acknowledged(self) -> set[str]:
        return {
            m.client_message_id
            for m in self.received
            if m.user_id == self.person.id and m.client_message_id
        }

    async def send(self, text: str, client_message_id: str | None = None) -> str:
        """Writes one message; a client id is made up unless given ('' sends none)."""
        if client_message_id is None:
            client_message_id = f"{self.name}-{len(self.outbox) + 1}"
        if client_message_id:
            self.outbox.setdefault(client_message_id, text)
        await self.call.write(chat_pb2.ChatMessage(text=text, client_message_id=client_message_id))
        return client_message_id

    def queue(self, texts: Sequence[str]) -> None:
        """Adds messages to the outbox without sending them (see `send_pending`)."""
        for text in texts:
            self.outbox[f"{self.name}-{len(self.outbox) + 1}"] = text

    async def send_pending(self) -> int:
        """Writes every outbox message not yet acknowledged, in order, until the stream fails;
        returns how many were written."""
        acknowledged = self.acknowledged
        written = 0
        for client_message_id, text in list(self.outbox.items()):
            if client_message_id in acknowledged:
                continue
            try:
                await self.call.write(
                    chat_pb2.ChatMessage(text=text, client_message_id=client_message_id)
                )
            except WRITE_ERRORS:
                return written
            written += 1
        return written

    async def wait_until_ended(self, timeout: float = 10) -> grpc.StatusCode | None:
        await wait_until(lambda: self.ended, timeout, f"the stream of {self.name} to end")
        if self._reader is not None:
            await self._reader
        return self.code

    async def close(self) -> None:
        if self.call is not None and not self.ended:
            self.call.cancel()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        self.ended = True


class Chat:
    """Makes the chat clients of a test and closes them together."""

    def __init__(self, channels: Channels) -> None:
        self.channels = channels
        self.clients: list[ChatClient] = []

    async def __call__(
        self,
        person: Person,
        service: Served | None = None,
        *,
        room: str | None = "general",
        resume_after: int | str | None = None,
        channel_key: Any = None,
        **options: Any,
    ) -> ChatClient:
        """A client for `person` in `room`, connected to `service` when one is given (see
        `ChatClient.connect` for the options)."""
        client = ChatClient(self.channels, person, room)
        self.clients.append(client)
        if service is not None:
            await client.connect(
                service, resume_after=resume_after, channel_key=channel_key, **options
            )
        return client

    async def close(self) -> None:
        await asyncio.gather(*(client.close() for client in self.clients))


async def presence(
    channels: Channels, service: Served, person: Person, room: str
) -> dict[int, tuple[str, int]]:
    """ListPresence of a room as {user_id: (name, stream_count)}."""
    stub: Any = chat_pb2_grpc.ChatServiceStub(channels.get(service.target))
    reply = await stub.ListPresence(
        chat_pb2.ListPresenceRequest(room=room), metadata=bearer(person.token), timeout=5
    )
    return {m.user_id: (m.user, m.stream_count) for m in reply.members}


async def wait_for_streams(
    channels: Channels,
    service: Served,
    person: Person,
    room: str,
    expected: dict[int, int],
    timeout: float = 15,
) -> None:
    """Waits until ListPresence shows exactly `expected` ({user_id: stream_count}).

    A stream is listed once it has joined its room and chosen its starting point, so after
    this every new message of the room must reach it."""
    last: dict[int, int] = {}

    async def matches() -> bool:
        found = await presence(channels, service, person, room)
        last.clear()
        last.update({uid: count for uid, (_, count) in found.items()})
        return last == expected

    try:
        await wait_until(matches, timeout, f"presence in {room} to be {expected}")
    except pytest.fail.Exception:
        pytest.fail(f"presence in {room}: expected {expected}, last saw {last}")


def expected_counts(clients: Sequence[ChatClient]) -> dict[int, int]:
    """{user_id: number of clients}, as presence should list them."""
    counts: dict[int, int] = {}
    for client in clients:
        counts[client.person.id] = counts.get(client.person.id, 0) + 1
    return counts


def check_clients(clients: Sequence[ChatClient], rows: Sequence[StoredMessage]) -> None:
    """Every client received every stored message exactly once, in sequence order, as stored;
    and every outbox message is stored exactly once (`check_conversation`)."""
    sent: dict[int, Sequence[str]] = {}
    for client in clients:
        sent[client.person.id] = [*sent.get(client.person.id, ()), *client.outbox]
    received: dict[str, Sequence[tuple[int, int, str, str]]] = {
        client.name: [(m.sequence, m.user_id, m.text, m.client_message_id) for m in client.received]
        for client in clients
    }
    check_conversation(rows, sent, received)
