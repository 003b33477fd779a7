"""A live chat session: one room, every message once and in order, across reconnects.

    async with chat.session("general", history=20, on_state=print) as session:
        await session.send("hello")              # returns the client message id
        async for message in session:            # history first, then live; own ones too
            ...

What the session does so that its caller does not have to:

- Reconnects after UNAVAILABLE or a dropped connection (grpcio reports a replica killed
  mid-stream as UNAVAILABLE "Stream removed (... Connection reset by peer)"; an UNKNOWN
  "Stream removed" is treated the same), with exponential back-off and jitter, and gives up
  after `ReconnectPolicy.give_up_after` seconds without a connection. With several targets
  it moves on to the next one; with a `dns:///` name round_robin picks a live replica.
- Resumes after the last sequence number it received (`x-chat-resume-after`), so the server
  replays what was missed, and drops anything at or below it: no gap, no duplicate. It sends
  that message's `room_id` too (`x-chat-room-id`): a room deleted and made again under its
  name while the session was away ends it with OUT_OF_RANGE (reason
  RESUME_POINT_NOT_IN_ROOM) instead of skipping the new room's first messages.
- Resends every message it sent whose echo (the server's acknowledgement, carrying the same
  `client_message_id`) has not come back, with its original id; the server stores and
  delivers a resent message once.
- RESOURCE_EXHAUSTED with reason RATE_LIMITED (the user sent faster than the server's rate
  limit): the server ends the stream and drops the message over the limit. By default the
  session waits `rate_limited_delay` (at least), reconnects and resends what was not
  acknowledged, so sending slows down instead of losing messages. With
  `retry_rate_limited=False` the iterator raises `ResourceExhausted` instead. A replica that
  holds all the streams it may (limit `streams_per_replica`) is left for the next address;
  any other limit (the user's streams on a replica, calls on a connection) ends the session.
- An open stream whose token expired is ended by the server with UNAUTHENTICATED (reason
  TOKEN_EXPIRED): when the token provider then gives another token (a `RefreshingToken` is
  made to ask its own provider again), the session reconnects with it and resumes; when it
  gives the same one (a fixed token), the session ends with that error.
- OUT_OF_RANGE with reason RESUME_POINT_EXPIRED: the server no longer keeps the messages
  after the session's resume point (the deployment's history retention deleted them, e.g.
  after a long time away, or while the caller read far behind). The session reports the gap
  as a `HistoryGap` (to the `on_gap` callback, and in `gaps`) in its place among the
  messages, after the last one delivered before it, then continues from `first_sequence` in
  the error (the first message kept, or the count limit's horizon): nothing is skipped
  silently, nothing comes twice. Refusals in a row with no message between them (a sweep
  still deleting the room's front) widen one gap rather than make another, and the second
  one in a row waits a first reconnect delay before the next stream; the gap goes to the
  caller before the next message, or once a stream has stayed open for `settle` seconds (a
  room where nothing follows).
- Any other error (UNAUTHENTICATED, PERMISSION_DENIED, INVALID_ARGUMENT, FAILED_PRECONDITION,
  ...) ends the session: the iterator raises it as the typed `ParleyError` after the messages
  already received, and `send()` raises it too. In particular PERMISSION_DENIED (a private
  room the caller is not, or is no longer, a member of; a deleted room) is never retried,
  whether the server refuses the stream at once or ends an open one later.

Writes racing a rejection: when grpcio's asyncio stream is written to just after the server
ended it, grpcio replaces the server's status with INTERNAL "Internal error from Core"
(measured with grpcio 1.85). So the session writes nothing on a new stream that has messages
to resend until it has stayed open for `ReconnectPolicy.settle` seconds (a server that refuses
the stream does so at once), and on that INTERNAL it opens a new stream, without reporting a
reconnect, lets it settle, and a refusal then shows its real status.

Backpressure: received messages wait in a buffer of `buffer_size`; when it is full the session
stops reading the stream, and the server, after its own per-stream limit, lets the stream
catch up from Postgres later. Nothing is lost either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self

import grpc
import grpc.aio

from parley.client._channel import CHAT_SERVICE
from parley.client._history import MessagePages, last_messages
from parley.client.errors import (
    CallContext,
    Cancelled,
    DeadlineExceeded,
    OutOfRange,
    ParleyError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    UnknownError,
    error_from_rpc,
)
from parley.client.tokens import TokenProvider
from parley.proto import chat_pb2, chat_pb2_grpc, contract
from parley.proto.contract import RESUME_EXPIRED, RESUME_KEY, ROOM_ID_KEY, ROOM_KEY

__all__ = [
    "MAX_TEXT_BYTES",
    "ChatSession",
    "ConnectionEvent",
    "ConnectionState",
    "GapCallback",
    "HistoryGap",
    "ReconnectPolicy",
    "SessionClient",
    "StateCallback",
    "check_text",
]

_log = logging.getLogger("parley.client")

MAX_TEXT_BYTES = contract.MAX_TEXT_BYTES
"""The longest message text the server accepts, in UTF-8 bytes."""

_ACK_MEMORY = 1024
_STREAM_METHOD = f"/{CHAT_SERVICE.name}/StreamChat"
_MASKED_STATUS = "internal error from core"

# Errors a session reconnects after; the rest end it. CANCELLED and DEADLINE_EXCEEDED can only
# come from the server side here (the session's stream has no deadline, and it cancels its
# calls only when it is closed).
# The ErrorInfo reason of the chat send rate, and the `limit` of a replica that is full.
_RATE_LIMITED = "RATE_LIMITED"
# The reason of an open stream ended because its token expired.
_TOKEN_EXPIRED = "TOKEN_EXPIRED"
_REPLICA_FULL = "streams_per_replica"
_RECONNECT_AFTER = (Unavailable, Cancelled, DeadlineExceeded)


def check_text(text: str) -> None:
    """Raise ValueError for a text the server would refuse (and end the stream over)."""
    if not text.strip():
        raise ValueError("a chat message must not be empty")
    size = len(text.encode())
    if size > MAX_TEXT_BYTES:
        raise ValueError(f"a chat message must be at most {MAX_TEXT_BYTES} bytes, got {size}")
    for position, char in enumerate(text):
        if (char < " " and char not in "\t\n") or "\x7f" <= char <= "\x9f":
            raise ValueError(
                "a chat message must not contain control characters other than tab and "
                f"newline (U+{ord(char):04X} at character {position})"
            )


def _masked(error: ParleyError) -> bool:
    """True for the INTERNAL status grpcio puts in place of the server's after a failed write."""
    return (
        error.reported_code is grpc.StatusCode.INTERNAL and error.message.lower() == _MASKED_STATUS
    )


class ConnectionState(enum.Enum):
    """Where a session's connection stands."""

    CONNECTING = "connecting"
    """Opening its first stream."""
    CONNECTED = "connected"
    """A stream is open; unacknowledged messages have been resent on it."""
    RECONNECTING = "reconnecting"
    """The stream was lost; the next attempt follows after `ConnectionEvent.delay`."""
    CLOSED = "closed"
    """Closed by its owner."""
    FAILED = "failed"
    """Ended by an error that reconnecting cannot fix; `ConnectionEvent.error` says which."""


@dataclass(frozen=True)
class ConnectionEvent:
    """A change of a session's connection, as given to the `on_state` callback."""

    state: ConnectionState
    target: str
    """The address of the (last) stream."""
    attempt: int = 0
    """Failed attempts in a row so far (RECONNECTING), else 0."""
    delay: float = 0.0
    """Seconds until the next attempt (RECONNECTING), else 0."""
    error: ParleyError | None = None
    """Why the stream was lost (RECONNECTING) or the session ended (FAILED)."""
    resent: int = 0
    """Unacknowledged messages sent again on the new stream (CONNECTED)."""

    def describe(self) -> str:
        """One short line for a status bar, e.g. `reconnecting in 0.4s (UNAVAILABLE ...)`."""
        if self.state is ConnectionState.RECONNECTING:
            why = f" ({self.error.code.name}: {self.error.message})" if self.error else ""
            return f"reconnecting in {self.delay:.1f}s{why}"
        if self.state is ConnectionState.CONNECTED:
            return f"connected to {self.target}"
        if self.state is ConnectionState.FAILED and self.error is not None:
            return f"disconnected: {self.error}"
        return self.state.name.lower()


StateCallback = Callable[[ConnectionEvent], None]
"""Called in the event loop at each change of a session's connection; must not block."""


@dataclass(frozen=True)
class HistoryGap:
    """Messages of the room a session cannot deliver: the server no longer keeps them (its
    history retention deleted them while the session was away or behind).

    Given to the `on_gap` callback when the session's iterator reaches it: after the last
    message before the gap was returned, before the first one after it. The session then goes
    on from `first_sequence`.
    """

    room: str
    resume_after: int
    """The last sequence the session had: the messages after it are missing."""
    first_sequence: int
    """The first message the room still keeps: the session continues with it."""

    @property
    def first_missing(self) -> int:
        """The first sequence that will never be delivered."""
        return self.resume_after + 1

    @property
    def last_missing(self) -> int:
        """The last sequence that will never be delivered."""
        return self.first_sequence - 1

    @property
    def missing(self) -> int:
        """How many messages are missing."""
        return self.first_sequence - self.resume_after - 1

    def describe(self) -> str:
        """One line, e.g. `history gap: messages 41-99 of room general are no longer kept;
        continuing from 100`."""
        if self.missing == 1:
            span = f"message {self.first_missing} of room {self.room} is"
        else:
            span = f"messages {self.first_missing}-{self.last_missing} of room {self.room} are"
        return f"history gap: {span} no longer kept; continuing from {self.first_sequence}"


GapCallback = Callable[[HistoryGap], None]
"""Called in the event loop, from the session's iterator, at each `HistoryGap`; must not
block."""


@dataclass(frozen=True)
class ReconnectPolicy:
    """How a session reconnects.

    The n-th attempt in a row waits `min(max_delay, initial_delay * multiplier**(n-1))`
    seconds, of which a random half is dropped (jitter, so that clients of a failed replica do
    not all come back at once). A stream that stayed up for `max_delay` seconds, or delivered a
    message, resets the count.
    """

    initial_delay: float = 0.1
    max_delay: float = 5.0
    multiplier: float = 2.0
    give_up_after: float | None = 120.0
    """Seconds without a working stream before the session fails with the last error; None
    keeps trying for ever."""
    retry_rate_limited: bool = True
    """Reconnect after RESOURCE_EXHAUSTED (and resend) rather than raise it."""
    rate_limited_delay: float = 1.0
    """The least wait after RESOURCE_EXHAUSTED, so the server's rate limit refills."""
    settle: float = 1.0
    """Seconds a new stream must stay open before unacknowledged messages are resent on it
    (see "Writes racing a rejection" in the module documentation)."""

    def __post_init__(self) -> None:
        if self.initial_delay <= 0 or self.max_delay < self.initial_delay:
            raise ValueError("need 0 < initial_delay <= max_delay")
        if self.multiplier < 1:
            raise ValueError("multiplier must be at least 1")

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """The wait before attempt number `attempt` (1 for the first retry)."""
        ceiling = min(self.max_delay, self.initial_delay * self.multiplier ** max(0, attempt - 1))
        return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)


class SessionClient(MessagePages, Protocol):
    """What a `ChatSession` needs from the client that opened it; `AsyncChatClient` is one.

    Defined here, on the session's side, so that the session never imports the client: the
    client's module imports this one, and nothing runs the other way.
    """

    @property
    def target(self) -> str:
        """Every address of the client, as given (errors name them)."""
        ...

    @property
    def token_provider(self) -> TokenProvider | None:
        """What gives the token of each stream (None: streams carry no token)."""
        ...

    def stream_channel(self) -> tuple[str, grpc.aio.Channel]:
        """The address a new stream goes to, and the client's channel to it."""
        ...

    def advance_target(self) -> None:
        """Move on to the client's next address (nothing changes when it has one)."""
        ...


class ChatSession:
    """A room joined for as long as the session is open. Create it with
    `AsyncChatClient.session()`; join with `async with` (or `open()` and `close()`).

    Iterate it (`async for message in session`) for every message of the room exactly once, in
    sequence order, the caller's own included (their echo is how the server acknowledges
    them). `send()` queues a message and returns its client message id at once; `pending` lists
    the ids not yet acknowledged and `wait_acknowledged()` waits for them. Leaving the
    `async with` block normally first waits up to `flush_timeout` seconds for acknowledgements.
    """

    def __init__(
        self,
        client: SessionClient,
        room: str,
        *,
        resume_after: int | None,
        history: int,
        policy: ReconnectPolicy,
        resume_room_id: int = 0,
        on_state: StateCallback | None,
        buffer_size: int,
        flush_timeout: float,
        on_gap: GapCallback | None = None,
    ) -> None:
        if resume_after is not None and history:
            raise ValueError("give history or resume_after, not both")
        if resume_after is not None and resume_after < 0:
            raise ValueError(f"resume_after must not be negative, got {resume_after}")
        if history < 0:
            raise ValueError(f"history must not be negative, got {history}")
        if resume_room_id < 0:
            raise ValueError(f"resume_room_id must not be negative, got {resume_room_id}")
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be positive, got {buffer_size}")
        self._client = client
        self._room = room
        self._resume_after = resume_after
        self._history = history
        self._policy = policy
        self._on_state = on_state
        self._on_gap = on_gap
        self._buffer_size = buffer_size
        self._flush_timeout = flush_timeout

        # Messages taken off the stream, and the gaps among them, in the caller's order.
        self._buffer: deque[chat_pb2.ChatMessage | HistoryGap] = deque()
        self._gaps: list[HistoryGap] = []
        # A gap not in the buffer yet: a refusal right after it (a sweep still deleting) widens
        # it, so one gap is reported once. It goes in before the next message received, or
        # once a stream has stayed open for `settle` seconds, or when the session fails.
        self._held_gap: HistoryGap | None = None
        self._pending: OrderedDict[str, str] = OrderedDict()  # client id -> text, in send order
        # The stored form of recently acknowledged messages, for wait_stored().
        self._acknowledged: OrderedDict[str, chat_pb2.ChatMessage] = OrderedDict()
        self._received = 0  # last sequence taken off the stream: the resume point
        # The room_id of the message it was taken from (0: none yet), sent with the resume
        # point so that a room deleted and made again under its name refuses it.
        self._room_id = resume_room_id
        self._delivered_room_id = resume_room_id  # of the last message handed to the caller
        # The token the latest stream was opened with (None: the client's provider has none).
        self._stream_token: str | None = None
        self._delivered = 0  # last sequence handed to the caller
        self._state = ConnectionState.CONNECTING
        self._target = client.target
        self._reconnects = 0
        self._failure: ParleyError | None = None
        self._closed = False
        self._opened = False
        self._call: grpc.aio.StreamStreamCall[chat_pb2.ChatMessage, chat_pb2.ChatMessage] | None
        self._call = None
        self._send_lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # --- Public state --------------------------------------------------------------------

    @property
    def room(self) -> str:
        """The room of the session."""
        return self._room

    @property
    def state(self) -> ConnectionState:
        """The connection's state now."""
        return self._state

    @property
    def target(self) -> str:
        """The address of the current (or last) stream."""
        return self._target

    @property
    def last_sequence(self) -> int:
        """The sequence of the last message the iterator returned; before the first, the
        point the session started after. Pass it as `resume_after` to continue later."""
        return self._delivered

    @property
    def room_id(self) -> int:
        """The `room_id` of the last message the iterator returned (0 before the first, unless
        given as `resume_room_id`). Pass it as `resume_room_id` with `resume_after`: a room
        deleted and made again meanwhile then refuses the resume point (OUT_OF_RANGE)
        instead of the session skipping the new room's first messages."""
        return self._delivered_room_id

    @property
    def reconnects(self) -> int:
        """How many times the session has connected again after losing its stream."""
        return self._reconnects

    @property
    def pending(self) -> tuple[str, ...]:
        """Client message ids sent but not yet acknowledged, oldest first."""
        return tuple(self._pending)

    @property
    def gaps(self) -> tuple[HistoryGap, ...]:
        """The history gaps the iterator has reached so far, oldest first."""
        return tuple(self._gaps)

    @property
    def error(self) -> ParleyError | None:
        """The error that ended the session, if one did."""
        return self._failure

    # --- Life cycle ----------------------------------------------------------------------

    async def open(self) -> Self:
        """Join the room: read the starting point (and history), then open the stream.

        Raises what the first ListMessages call raises (`Unavailable` when no server answers,
        `Unauthenticated`, `InvalidArgument` for a bad room name), or the error that ended the
        first stream when it cannot be retried. Returns once the first stream is open or being
        retried.
        """
        if self._opened:
            raise RuntimeError("a session can be opened once")
        self._opened = True
        if self._resume_after is not None:
            start = self._resume_after
        else:
            try:
                history, start = await last_messages(self._client, self._room, self._history, None)
            except ParleyError as error:
                # E.g. PERMISSION_DENIED for a private room: the session has failed like it
                # would on its stream (state FAILED, `error` set, `send()` raises it).
                self._fail(error)
                raise
            if history:
                start = max(start, history[-1].sequence)
                self._room_id = history[-1].room_id
                self._delivered = history[0].sequence - 1
                self._buffer.extend(history)
        self._received = start
        if not self._buffer:
            self._delivered = start
        self._task = asyncio.create_task(self._run(), name=f"parley-chat-session-{self._room}")
        while self._state is ConnectionState.CONNECTING and self._failure is None:
            await self._wait_change()
        if self._failure is not None:
            raise self._failure
        return self

    async def close(self) -> None:
        """Leave the room. Messages still pending are not sent; the iterator stops."""
        if self._closed:
            return
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._failure is None:
            self._set_state(ConnectionEvent(ConnectionState.CLOSED, self._target))
        self._notify()

    async def __aenter__(self) -> Self:
        try:
            return await self.open()
        except BaseException:
            await self.close()
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None and self._pending and self._failure is None:
                with contextlib.suppress(TimeoutError):
                    await self.wait_acknowledged(timeout=self._flush_timeout)
        finally:
            await self.close()

    # --- Sending -------------------------------------------------------------------------

    async def send(self, text: str) -> str:
        """Send a message; returns its client message id (a new uuid4 hex).

        Returns once the message is written to the stream, or queued while the session
        reconnects; it is resent until its echo arrives. Raises ValueError for an empty or
        over-long text (which the server would end the stream for), the session's error when
        it has failed, and RuntimeError when it is closed.
        """
        check_text(text)
        self._check_usable()
        client_message_id = uuid.uuid4().hex
        async with self._send_lock:
            self._pending[client_message_id] = text
            call = self._call
            if call is not None:
                await self._write(call, client_message_id, text)
        return client_message_id

    async def wait_acknowledged(
        self, client_message_ids: Iterable[str] | None = None, *, timeout: float | None = None
    ) -> None:
        """Wait until the server acknowledged the given messages (default: all pending now).

        Raises TimeoutError after `timeout` seconds, and the session's error if it fails first.
        """
        wanted = set(self._pending if client_message_ids is None else client_message_ids)
        async with asyncio.timeout(timeout):
            while wanted & self._pending.keys():
                if self._failure is not None:
                    raise self._failure
                if self._closed:
                    raise RuntimeError("the session was closed before its messages were acked")
                await self._wait_change()

    async def wait_stored(
        self, client_message_id: str, *, timeout: float | None = None
    ) -> chat_pb2.ChatMessage:
        """Wait for the acknowledgement of a message sent by this session and return the
        message as stored (with its `sequence`, `user` and `create_time`).

        Works for the last 1024 acknowledged messages. Raises TimeoutError after
        `timeout` seconds, and the session's error if it fails first.
        """
        await self.wait_acknowledged((client_message_id,), timeout=timeout)
        try:
            return self._acknowledged[client_message_id]
        except KeyError:
            raise KeyError(f"{client_message_id!r} was not sent by this session") from None

    # --- Receiving -----------------------------------------------------------------------

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> chat_pb2.ChatMessage:
        """The next message of the room (history first, when asked for)."""
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._buffer:
                item = self._buffer.popleft()
                self._notify()  # room in the buffer again
                if isinstance(item, HistoryGap):
                    # What the server no longer keeps counts as seen: a later session that
                    # resumes from `last_sequence` goes on after the gap.
                    self._delivered = item.last_missing
                    self._report_gap(item)
                    continue
                self._delivered = item.sequence
                self._delivered_room_id = item.room_id or self._delivered_room_id
                return item
            if self._failure is not None:
                raise self._failure
            await self._wait_change()

    # --- The connection loop -------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._reconnect_loop()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must end the session visibly, not hang its iterator
            _log.exception("the chat session stopped unexpectedly")
            self._fail(UnknownError(f"the chat session stopped unexpectedly: {exc!r}"))

    async def _reconnect_loop(self) -> None:
        attempt = 0
        lost_since: float | None = None
        settle = False
        gaps_in_row = 0
        while True:
            target, channel = self._client.stream_channel()
            self._target = target
            opened_at = time.monotonic()
            error: ParleyError | None = None
            delivered = False
            try:
                delivered = await self._stream(channel, settle=settle)
            except grpc.RpcError as rpc_error:
                error = self._stream_error(rpc_error)
            if error is not None and self._skip_gap(error):
                attempt, lost_since, settle = 0, None, False
                gaps_in_row = 1 if delivered else gaps_in_row + 1
                if gaps_in_row > 1:
                    # Refused again at once: a sweep is deleting this room's front as we go.
                    await asyncio.sleep(self._policy.delay(gaps_in_row - 1))
                continue  # from the first message kept
            gaps_in_row = 0
            settle = error is not None and _masked(error)
            if delivered or time.monotonic() - opened_at >= self._policy.max_delay:
                attempt, lost_since = 0, None
            if error is not None and not self._reconnects_after(error):
                self._fail(error)
                return
            now = time.monotonic()
            lost_since = now if lost_since is None else lost_since
            give_up = self._policy.give_up_after
            if give_up is not None and now - lost_since > give_up:
                self._fail(error or Unavailable("the stream kept ending", target=target))
                return
            attempt += 1
            delay = self._policy.delay(attempt)
            if isinstance(error, ResourceExhausted):
                delay = max(delay, self._policy.rate_limited_delay)
            if isinstance(error, Unavailable) or (
                isinstance(error, ResourceExhausted)
                and error.metadata.get("limit") == _REPLICA_FULL
            ):
                self._client.advance_target()
            if not settle:
                # A masked INTERNAL is no lost connection, only grpcio hiding the server's
                # status: the next stream reads it, and nobody is told of a reconnect.
                self._set_state(
                    ConnectionEvent(
                        ConnectionState.RECONNECTING,
                        target,
                        attempt=attempt,
                        delay=delay,
                        error=error,
                    )
                )
            await asyncio.sleep(delay)  # back-off between attempts

    async def _stream(self, channel: grpc.aio.Channel, *, settle: bool) -> bool:
        """One stream, until it ends; True when it delivered any message. Raises RpcError."""
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        metadata: tuple[tuple[str, str], ...] = (
            (ROOM_KEY, self._room),
            (RESUME_KEY, str(self._received)),
        )
        if self._room_id:
            metadata += ((ROOM_ID_KEY, str(self._room_id)),)
        provider = self._client.token_provider
        self._stream_token = None if provider is None else provider()
        if self._stream_token is not None:
            # Sent explicitly (it wins over the client's own), so the session knows which
            # token a refusal or an end was about.
            metadata += (("authorization", f"Bearer {self._stream_token}"),)
        # No deadline: the stream lasts as long as the session. wait_for_ready stays off so an
        # unreachable replica fails at once and the loop can move on to another target.
        call = stub.StreamChat(metadata=metadata, wait_for_ready=False)
        ended = asyncio.Event()
        call.add_done_callback(lambda _call: ended.set())
        delivered = False
        gap_flush: asyncio.Task[None] | None = None
        try:
            await call.initial_metadata()
            if settle or self._pending:
                # Nothing is written until the server has had time to refuse the stream, so a
                # refusal keeps its status (see "Writes racing a rejection").
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ended.wait(), self._policy.settle)
            if call.done():  # refused, or never connected: read() raises the status
                await call.read()
                return False
            async with self._send_lock:
                resent = 0
                for client_message_id, text in list(self._pending.items()):
                    if not await self._write(call, client_message_id, text):
                        break
                    resent += 1
                self._call = call
            if self._state is not ConnectionState.CONNECTING:
                self._reconnects += 1
            self._set_state(ConnectionEvent(ConnectionState.CONNECTED, self._target, resent=resent))
            if self._held_gap is not None:
                gap_flush = asyncio.create_task(self._flush_gap_when_settled(ended))
            while True:
                message = await call.read()
                if not isinstance(message, chat_pb2.ChatMessage):  # grpc.aio.EOF
                    return delivered
                delivered = True
                await self._receive(message)
        finally:
            if gap_flush is not None:
                gap_flush.cancel()
            self._call = None
            call.cancel()

    async def _write(
        self,
        call: grpc.aio.StreamStreamCall[chat_pb2.ChatMessage, chat_pb2.ChatMessage],
        client_message_id: str,
        text: str,
    ) -> bool:
        """Write one message; False when the stream is gone (the message stays pending)."""
        try:
            await call.write(chat_pb2.ChatMessage(text=text, client_message_id=client_message_id))
        except (grpc.RpcError, asyncio.InvalidStateError):
            return False
        return True

    async def _receive(self, message: chat_pb2.ChatMessage) -> None:
        if message.client_message_id in self._pending:
            del self._pending[message.client_message_id]
            self._acknowledged[message.client_message_id] = message
            if len(self._acknowledged) > _ACK_MEMORY:
                self._acknowledged.popitem(last=False)
            self._notify()
        if message.sequence <= self._received:
            return  # seen before this reconnect
        await self._flush_gap()  # its place: just before the first message after it
        while len(self._buffer) >= self._buffer_size:
            await self._wait_change()  # the caller is behind: stop reading the stream
        self._received = message.sequence
        self._room_id = message.room_id
        self._buffer.append(message)
        self._notify()

    def _skip_gap(self, error: ParleyError) -> bool:
        """For RESUME_POINT_EXPIRED, holds a HistoryGap after what was received (widening the
        one held, when no message came since) and moves the resume point to just before the
        first message kept; False for any other error (and for a first_sequence that would not
        move the session forward)."""
        if not isinstance(error, OutOfRange) or error.reason != RESUME_EXPIRED:
            return False
        first = error.first_sequence
        if first is None or first <= self._received + 1:
            return False
        held = self._held_gap
        after = self._received if held is None else held.resume_after
        self._held_gap = HistoryGap(self._room, after, first)
        self._received = first - 1
        return True

    async def _flush_gap(self) -> None:
        """Puts the held gap in the buffer, in its place after what was received."""
        while self._held_gap is not None and len(self._buffer) >= self._buffer_size:
            await self._wait_change()  # the caller is behind: the gap waits its turn
        if self._held_gap is not None:
            self._buffer.append(self._held_gap)
            self._held_gap = None
            self._notify()

    async def _flush_gap_when_settled(self, ended: asyncio.Event) -> None:
        """A stream that stays open `settle` seconds was let in: the gap before it is whole
        (in a room where nothing new comes, no message would report it)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ended.wait(), self._policy.settle)
        if not ended.is_set():
            await self._flush_gap()

    def _report_gap(self, gap: HistoryGap) -> None:
        self._gaps.append(gap)
        if self._on_gap is None:
            return
        try:
            self._on_gap(gap)
        except Exception:  # a faulty callback must not take the session down
            _log.exception("the chat session's on_gap callback failed")

    def _stream_error(self, error: grpc.RpcError) -> ParleyError:
        return error_from_rpc(
            error,
            CallContext(
                target=self._client.target,
                method=_STREAM_METHOD,
                address_env=CHAT_SERVICE.address_env,
                timeout=None,
                token_sent=self._client.token_provider is not None,
            ),
        )

    def _reconnects_after(self, error: ParleyError) -> bool:
        if _masked(error):
            return True
        if isinstance(error, ResourceExhausted):
            if error.metadata.get("limit") == _REPLICA_FULL:
                return True  # another replica may have room: reconnect to the next address
            # The send rate refills; any other limit (this user's streams, the connection's
            # calls) stays exhausted however often the session retries.
            return error.reason == _RATE_LIMITED and self._policy.retry_rate_limited
        if isinstance(error, Unauthenticated):
            return error.reason == _TOKEN_EXPIRED and self._fresh_token()
        return isinstance(error, _RECONNECT_AFTER)

    def _fresh_token(self) -> bool:
        """Whether the token provider now gives another token than the one the latest
        stream was refused or ended for (a RefreshingToken is made to ask again first)."""
        provider = self._client.token_provider
        if provider is None or self._stream_token is None:
            return False
        invalidate = getattr(provider, "invalidate", None)
        if callable(invalidate):
            invalidate()
        return provider() != self._stream_token

    # --- Bookkeeping ---------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._closed:
            raise RuntimeError("the chat session is closed")
        if not self._opened:
            raise RuntimeError("open the chat session first (async with ... or await open())")

    def _fail(self, error: ParleyError) -> None:
        if self._held_gap is not None:  # reported before the error, in its place
            self._buffer.append(self._held_gap)
            self._held_gap = None
        self._failure = error
        self._set_state(ConnectionEvent(ConnectionState.FAILED, self._target, error=error))

    def _set_state(self, event: ConnectionEvent) -> None:
        self._state = event.state
        self._notify()
        if self._on_state is None:
            return
        try:
            self._on_state(event)
        except Exception:  # a faulty callback must not take the session down
            _log.exception("the chat session's on_state callback failed")

    def _notify(self) -> None:
        # Wakes every waiter; each one re-checks what it waits for.
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_change(self) -> None:
        await self._changed.wait()

    def __repr__(self) -> str:
        return (
            f"ChatSession(room={self._room!r}, state={self._state.name.lower()}, "
            f"last_sequence={self._delivered})"
        )
