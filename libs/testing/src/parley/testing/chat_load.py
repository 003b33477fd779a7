"""Chat load through the SDK, for tests that break things while people chat: `Chatter` (one
SDK session that sends paced messages and records everything it receives), `settle_room`
(everyone acknowledged and caught up, then zero lost, zero duplicated) and `Tally` (what a
load of calls came to)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from parley.client import AsyncChatClient, ChatSession, ReconnectPolicy
from parley.testing.stack import Person, StoredMessage, check_conversation, stored_messages
from parley.testing.waiting import wait_until

__all__ = ["FAST_RECONNECT", "Chatter", "Tally", "settle_room"]

# Reconnects quickly, and keeps trying for as long as a fault test may take to recover.
FAST_RECONNECT = ReconnectPolicy(initial_delay=0.05, max_delay=0.5, settle=0.3, give_up_after=60)


@dataclass
class Tally:
    """Outcomes of a load of calls: how many succeeded, and the errors by type."""

    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def fail(self, error: BaseException) -> None:
        name = type(error).__name__
        self.errors[name] += 1
        if len(self.examples) < 5:
            self.examples.append(f"{name}: {error}")

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    def __str__(self) -> str:
        return f"ok={self.ok} failed={self.failed} {dict(self.errors)} {self.examples}"


class Chatter:
    """One SDK chat session in `room` from the room's start, over `targets` (the first one
    first): sends paced messages on demand and records everything it receives, as
    (sequence, user_id, text, client_message_id)."""

    def __init__(self, name: str, person: Person, targets: Sequence[str], room: str) -> None:
        self.name = name
        self.person = person
        self.targets = list(targets)
        self.client = AsyncChatClient(",".join(targets), token=person.token, timeout=10)
        self.room = room
        self.sent: dict[str, str] = {}  # client message id -> text
        self.received: list[tuple[int, int, str, str]] = []
        self.session: ChatSession | None = None
        self._reader: asyncio.Task[None] | None = None

    async def open(self) -> None:
        self.session = self.client.session(self.room, resume_after=0, policy=FAST_RECONNECT)
        await self.session.open()
        self._reader = asyncio.create_task(self._read(), name=f"read-{self.name}")

    async def _read(self) -> None:
        assert self.session is not None
        async for message in self.session:
            self.received.append(
                (message.sequence, message.user_id, message.text, message.client_message_id)
            )

    async def chat(self, stop: asyncio.Event, interval: float) -> None:
        """Sends a message every `interval` seconds (pacing, not synchronization) until `stop`."""
        assert self.session is not None
        while not stop.is_set():
            text = f"{self.name}-{len(self.sent) + 1}"
            self.sent[await self.session.send(text)] = text
            await asyncio.sleep(interval)

    async def settle(self, last_sequence: int, timeout: float = 30) -> None:
        """Waits until everything it sent is acknowledged and it received up to the sequence."""
        assert self.session is not None
        await self.session.wait_acknowledged(timeout=timeout)
        await wait_until(
            lambda: bool(self.received) and self.received[-1][0] >= last_sequence,
            timeout,
            f"{self.name} to receive up to sequence {last_sequence}",
        )

    @property
    def reconnects(self) -> int:
        return self.session.reconnects if self.session else 0

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        await self.client.close()


async def settle_room(
    chatters: Sequence[Chatter], database: str, room: str, timeout: float = 30
) -> list[StoredMessage]:
    """Waits for every chatter to be acknowledged and caught up; checks zero lost, zero
    duplicated, in order (`check_conversation`); returns the stored messages."""
    for chatter in chatters:
        assert chatter.session is not None
        await chatter.session.wait_acknowledged(timeout=timeout)
    rows = await stored_messages(database, room)
    await asyncio.gather(*(c.settle(len(rows), timeout) for c in chatters))
    sent: dict[int, Sequence[str]] = {}
    received: dict[str, Sequence[tuple[int, int, str, str]]] = {}
    for chatter in chatters:
        sent[chatter.person.id] = [*sent.get(chatter.person.id, ()), *chatter.sent]
        received[chatter.name] = chatter.received
    check_conversation(rows, sent, received)
    return rows
