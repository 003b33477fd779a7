"""ChatService: StreamChat, ListMessages and ListPresence, plus the room RPCs of room_rpcs.

Every call needs a token whose subject is a user that exists in UserService, and every read
of a room checks that the caller may read it (see room_rpcs for the rules).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from redis.exceptions import RedisError

from parley.chassis import (
    FieldViolation,
    Internal,
    InvalidArgument,
    OutOfRange,
    PermissionDenied,
    ServiceError,
    Unavailable,
    current_identity,
    tracing,
)
from parley.chassis.errors import LimitExceeded
from parley.chassis.limits import Quota
from parley.chassis.tasks import cancel_and_wait
from parley.proto import chat_pb2
from parley.proto.contract import (
    CHAT_SERVICE,
    FIRST_SEQUENCE_KEY,
    RESUME_EXPIRED,
    RESUME_KEY,
    ROOM_ID_KEY,
    ROOM_KEY,
)

from .bus import RedisBus
from .hub import RoomHub, Subscriber, denied, outgoing
from .metrics import ChatMetrics
from .presence import Presence
from .room_rpcs import MEMBERS_PER_ROOM, ROOMS_PER_USER, RoomRpcs
from .room_store import DIRECT_PREFIX, RoomStore
from .rooms import check_client_message_id, check_room, check_text
from .store import Appended, MessageStore
from .users import UserDirectory

__all__ = [
    "CHAT_LIMITS",
    "SEND_RATE",
    "STREAMS_PER_USER",
    "ChatServicer",
    "RateLimited",
    "resume_expired",
]

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
# A ListMessages page also ends after the message that brings its text to this many bytes.
MAX_PAGE_BYTES = 256 * 1024
# Catch-up reads from Postgres go in pages of at most this many messages, cut after the one
# that brings the page's text to _CATCH_UP_BYTES: what a stream that does not read holds.
_CATCH_UP_PAGE = 200
_CATCH_UP_BYTES = 64 * 1024
# The `limit` label of each refusal ChatService makes (parley_limit_refusals_total).
STREAMS_PER_USER = "chat_streams_per_user"
SEND_RATE = "chat_send_rate"
CHAT_LIMITS = (STREAMS_PER_USER, SEND_RATE, ROOMS_PER_USER, MEMBERS_PER_ROOM)
# How often a send is retried after the room's access changed under it (then checked again).
_STALE_RETRIES = 3
_SEQUENCE = re.compile(r"[0-9]+")
_MAX_SEQUENCE = 2**63 - 1

_log = logging.getLogger("parley.chat")
_tracer = tracing.tracer("parley.chat")


def _sending(room: str) -> contextlib.AbstractContextManager[trace.Span]:
    """The span of one message sent on a stream: the user lookup, the store and the publish
    are its children, and the replicas that deliver the message link their spans to it.

    It starts a trace of its own, linked to the stream's server span: a stream lives for hours,
    and its messages as children would make one trace that grows without end, exported only
    when the stream closes. Each message is sampled on its own."""
    stream = trace.get_current_span().get_span_context()
    return _tracer.start_as_current_span(
        "chat send",
        context=otel_context.Context(),
        kind=trace.SpanKind.PRODUCER,
        links=[trace.Link(stream)] if stream.is_valid else None,
        attributes={"chat.room": room, "messaging.system": "redis"},
        # A refused message is the caller's mistake, recorded as an event, not an error.
        set_status_on_exception=False,
    )


Context = grpc.aio.ServicerContext[Any, Any]


def _metadata(context: Context) -> dict[str, str]:
    return {
        key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)
    }


def _resume_point(
    value: str | None, key: str = RESUME_KEY, what: str = "sequence number"
) -> int | None:
    """A non-negative int64 from metadata `key` (None when absent or empty)."""
    if value is None or value == "":
        return None
    if not _SEQUENCE.fullmatch(value):
        raise InvalidArgument([FieldViolation(key, f"must be a {what} (a non-negative integer)")])
    # Leading zeros aside, more than 19 digits is out of range: never int() a long string
    # (Python refuses over 4,300 digits, and the work grows with the length).
    digits = value.lstrip("0")
    if len(digits) > len(str(_MAX_SEQUENCE)) or int(digits or "0") > _MAX_SEQUENCE:
        raise InvalidArgument([FieldViolation(key, f"must be a {what} of at most {_MAX_SEQUENCE}")])
    return int(digits or "0")


def resume_expired(room: str, after: int, first: int, *, behind: bool = False) -> OutOfRange:
    """The refusal of a stream that would have to go on after `after`, when history retention
    has deleted the message after it: `first` is where it may go on (the first kept message,
    or the count limit's horizon when that is later: see MessageStore.horizon)."""
    gone = (
        f"message {after + 1} is" if after + 2 == first else f"messages {after + 1}-{first - 1} are"
    )
    why = (
        "this stream fell behind the history the room keeps"
        if behind
        else f"{RESUME_KEY} {after} is older than the history the room keeps"
    )
    return OutOfRange(
        f"{why}: {gone} no longer kept in room {room!r}, the first kept message is "
        f"{first}; resume after {first - 1} to go on from there (a gap), or read what is kept "
        "with ListMessages",
        reason=RESUME_EXPIRED,
        metadata={FIRST_SEQUENCE_KEY: str(first)},
    )


def _token(context: Context) -> str:
    """The bearer token the call was let in with (the chassis refuses a second one)."""
    return current_identity().token


def _sender_id() -> int:
    user_id = current_identity().user_id
    if user_id is None or not 0 < user_id < 2**31:
        raise PermissionDenied(
            "chat needs a token whose subject is a user id", reason="SUBJECT_NOT_A_USER"
        )
    return user_id


class RateLimited(LimitExceeded):
    """The sender's budget (PARLEY_CHAT_RATE_LIMIT, shared by all their streams) is spent."""

    default_reason = "RATE_LIMITED"


class ChatServicer:
    """The ChatService methods; `add_to_server` registers them.

    StreamChat yields each message already serialized: a message for a room is serialized
    once, not once for every stream it goes to.
    """

    def __init__(
        self,
        store: MessageStore,
        rooms: RoomStore,
        hub: RoomHub,
        bus: RedisBus,
        presence: Presence,
        users: UserDirectory,
        metrics: ChatMetrics,
        *,
        rate_limit: float,
        rate_burst: int,
        max_streams_per_user: int,
        auto_create_rooms: bool,
        max_rooms_per_user: int,
        max_members: int,
    ) -> None:
        self._store = store
        self._rooms = rooms
        self._hub = hub
        self._bus = bus
        self._presence = presence
        self._users = users
        self._metrics = metrics
        self._rate_limit = rate_limit
        self._rate_burst = rate_burst
        self._auto_create = auto_create_rooms
        # Per replica: each replica bounds what one user holds of its own memory and tasks.
        self._streams = Quota(max_streams_per_user)
        self._room_rpcs = RoomRpcs(
            rooms,
            self._caller,
            self._user_exists,
            self._announce,
            max_rooms_per_user=max_rooms_per_user,
            max_members=max_members,
        )

    async def _caller(self, context: Context) -> int:
        """The caller's user id, once UserService has confirmed the user exists."""
        user_id = _sender_id()
        await self._users.display_name(user_id, _token(context))
        return user_id

    def _made_on_first_use(self, room: str) -> bool:
        """Whether a missing `room` would be made by the first stream that names it (so a
        read of it is a read of an empty public room, not a refusal)."""
        return self._auto_create and not room.startswith(DIRECT_PREFIX)

    async def _user_exists(self, user_id: int, context: Context) -> None:
        await self._users.require(user_id, _token(context))

    async def _announce(self, room: str) -> None:
        """Who may read `room` changed: this replica's streams and every other's are checked."""
        self._hub.recheck(room)
        await self._bus.announce(room)

    async def StreamChat(
        self, request_iterator: AsyncIterator[chat_pb2.ChatMessage], context: Context
    ) -> AsyncIterator[bytes]:
        user_id = _sender_id()
        metadata = _metadata(context)
        room = check_room(metadata.get(ROOM_KEY, ""), field=ROOM_KEY)
        resume_after = _resume_point(metadata.get(RESUME_KEY))
        # 0 is no room: what a message from a server without room ids carried.
        resume_room = _resume_point(metadata.get(ROOM_ID_KEY), ROOM_ID_KEY, "room id") or None
        identity = current_identity()
        token = identity.token
        if not self._streams.take(user_id):
            raise LimitExceeded(
                STREAMS_PER_USER,
                "PARLEY_CHAT_MAX_STREAMS_PER_USER",
                self._streams.limit,
                "this user already holds as many chat streams on this replica as allowed; "
                "close one first",
            )
        # Join first, then read the starting point: nothing published in between is missed.
        subscriber = self._hub.join(room, user_id)
        subscriber.token, subscriber.valid_until = token, identity.valid_until
        reader: asyncio.Task[None] | None = None
        delivered = self._metrics.delivered
        latency = self._metrics.latency
        try:
            subscriber.user_name = await self._users.display_name(user_id, token)
            # After joining: a change of access from now on reaches this stream through the
            # hub's checks, so this one read is enough.
            # A resume point of a room id is never a reason to make the room: that room is gone.
            access = await self._rooms.access(
                room,
                user_id,
                create=self._auto_create and resume_room is None,
                timeout=context.time_remaining(),
            )
            if access.quota_spent:
                raise self._room_rpcs.too_many_rooms()  # not made: the user's quota is spent
            if not access.readable:
                raise denied(room)
            subscriber.room_id, subscriber.version = access.room_id, access.version
            self._hub.note_access(room, access.room_id, access.version)
            if resume_room is not None and resume_room != access.room_id:
                raise OutOfRange(
                    f"{ROOM_ID_KEY} {resume_room} is not room {room!r} (id {access.room_id}):"
                    " the room was deleted and made again since; resume from 0",
                    reason="RESUME_POINT_NOT_IN_ROOM",
                )
            if resume_after is None:
                last = access.last_sequence
            elif resume_after > access.last_sequence:
                # Not a point of this room: the room was deleted and made again under its
                # name (or the client is confused). Going on would skip its messages.
                raise OutOfRange(
                    f"{RESUME_KEY} {resume_after} is past the last message of room {room!r} "
                    f"({access.last_sequence}): the room was made again since; resume from 0",
                    reason="RESUME_POINT_NOT_IN_ROOM",
                )
            else:
                # History retention deletes from the front of a room: refuse a point whose
                # next message is gone rather than skip what was deleted.
                first, horizon = await self._store.kept(room, timeout=context.time_remaining())
                if resume_after + 1 < first:
                    raise resume_expired(room, resume_after, horizon)
                last = resume_after
                subscriber.catch_up()
            await self._presence.announce(room, subscriber.id, user_id, subscriber.user_name)
            reader = asyncio.create_task(self._read(request_iterator, subscriber, token))
            while True:
                item = await subscriber.next()
                if item is None:
                    async for stored in self._catch_up(subscriber, last):
                        last = stored.sequence
                        delivered.inc()
                        yield stored.SerializeToString()
                    continue
                sequence = item.message.sequence
                if sequence <= last:
                    continue  # already delivered
                if sequence > last + 1:
                    async for stored in self._catch_up(subscriber, last, sequence - 1):
                        last = stored.sequence
                        delivered.inc()
                        yield stored.SerializeToString()
                last = sequence
                delivered.inc()
                # Live deliveries only: a replay would measure its age, not the delivery path.
                latency.observe(max(0.0, time.time() - item.stored_at))
                yield item.payload
        finally:
            self._streams.give_back(user_id)  # first: an await below may be cancelled
            if reader is not None:
                # Cancelled until it stops (see cancel_and_wait): a reader that shrugged off
                # one cancellation kept its stream, and a draining replica, waiting for the
                # client's next message, up to the whole grace period.
                with contextlib.suppress(asyncio.CancelledError):
                    await cancel_and_wait(reader)
            self._hub.leave(subscriber)
            await self._presence.withdraw(room, subscriber.id, user_id, subscriber.user_name)

    async def _catch_up(
        self, subscriber: Subscriber, after: int, until: int | None = None
    ) -> AsyncIterator[chat_pb2.ChatMessage]:
        """Stored messages after `after` (up to `until`, else to the end), oldest first.

        One bounded page at a time (see _CATCH_UP_BYTES), read before anything is sent: no
        pooled connection waits on the client, and a client that stops reading pins a page.
        """
        room = subscriber.room
        more = True
        while more and (until is None or after < until):
            subscriber.raise_if_closed()  # e.g. its token expired: not one page more
            page = await self._store.page(
                room,
                reader=subscriber.user_id,
                after=after,
                size=_CATCH_UP_PAGE,
                max_bytes=_CATCH_UP_BYTES,
            )
            if not page.allowed or page.room_id != subscriber.room_id:
                raise denied(room)  # removed, or the room deleted (and made again)
            if after + 1 < page.first_sequence:
                # The next message was deleted by history retention while the stream was
                # behind: it ends, never skipping a gap silently.
                horizon = self._store.horizon(page.first_sequence, page.last_sequence)
                raise resume_expired(room, after, horizon, behind=True)
            more = page.more
            for message in page.messages:
                if until is not None and message.sequence > until:
                    return
                subscriber.raise_if_closed()
                self._metrics.backfilled.inc()
                after = message.sequence
                yield message

    async def _read(
        self,
        requests: AsyncIterator[chat_pb2.ChatMessage],
        subscriber: Subscriber,
        token: str,
    ) -> None:
        """Stores and publishes what the client sends; an error ends the whole stream."""
        try:
            async for request in requests:
                if tracing.active():
                    with _sending(subscriber.room):
                        await self._send(request, subscriber, token)
                else:
                    await self._send(request, subscriber, token)
        except ServiceError as error:
            subscriber.close(error)
        except asyncio.CancelledError:
            raise
        except Exception:
            _log.exception("reading a chat stream failed")
            subscriber.close(Internal("internal error while reading the stream"))

    async def _send(
        self, request: chat_pb2.ChatMessage, subscriber: Subscriber, token: str
    ) -> None:
        """Stores one message the client sent and hands it to every replica's streams."""
        check_text(request.text)
        check_client_message_id(request.client_message_id)
        name = await self._users.display_name(subscriber.user_id, token)
        appended = await self._append(subscriber, name, request)
        assert appended.message is not None
        self._metrics.received.inc()
        item = outgoing(appended.message, version=appended.version, room_id=subscriber.room_id)
        # A resend is not delivered again: every stream had the message when it was
        # stored, or reads it from Postgres (with its access checked) as it resumes.
        if tracing.active():
            span = trace.get_current_span()
            span.set_attribute("chat.sequence", appended.message.sequence)
            span.set_attribute("chat.outcome", appended.outcome)
        if appended.outcome != "new":
            return
        # Publish before the local fan-out: the streams it wakes would otherwise run
        # first, and the other replicas would wait for this one's delivery work.
        await self._bus.publish(item)
        self._hub.deliver(item)

    async def _append(
        self, subscriber: Subscriber, name: str, request: chat_pb2.ChatMessage
    ) -> Appended:
        """Stores what the client sent, as long as it may still write to the room."""
        for _ in range(_STALE_RETRIES):
            appended = await self._store.append(
                subscriber.room,
                subscriber.user_id,
                name,
                request.text,
                request.client_message_id,
                version=subscriber.version,
                timeout=None,
            )
            if appended.outcome == "rate":
                raise RateLimited(
                    SEND_RATE,
                    "PARLEY_CHAT_RATE_LIMIT",
                    self._rate_limit,
                    f"more than {self._rate_limit:g} messages a second (bursts of "
                    f"{self._rate_burst}) from this user, counting all of their streams; "
                    "slow down",
                )
            if appended.outcome != "stale":
                return appended
            # The room's access changed since this stream was checked: check it again.
            access = await self._rooms.access(subscriber.room, subscriber.user_id, create=False)
            if not access.readable or access.room_id != subscriber.room_id:
                raise denied(subscriber.room)  # removed, or the room deleted (and made again)
            subscriber.version = max(subscriber.version, access.version)
            self._hub.note_access(subscriber.room, access.room_id, access.version)
        raise Unavailable("postgres", "the room's access kept changing; send again")

    async def ListMessages(
        self, request: chat_pb2.ListMessagesRequest, context: Context
    ) -> chat_pb2.ListMessagesResponse:
        room = check_room(request.room)
        problems = []
        if request.page_size < 0:
            problems.append(FieldViolation("page_size", "must not be negative"))
        if request.after_sequence < 0:
            problems.append(FieldViolation("after_sequence", "must not be negative"))
        if request.before_sequence < 0:
            problems.append(FieldViolation("before_sequence", "must not be negative"))
        if problems:
            raise InvalidArgument(problems)
        size = (
            DEFAULT_PAGE_SIZE if request.page_size == 0 else min(request.page_size, MAX_PAGE_SIZE)
        )
        reader = await self._caller(context)
        # Cut by size too: a reply waits in memory until its client reads it.
        page = await self._store.page(
            room,
            reader=reader,
            after=request.after_sequence,
            before=request.before_sequence,
            size=size,
            max_bytes=MAX_PAGE_BYTES,
            timeout=context.time_remaining(),
        )
        if not page.exists and self._made_on_first_use(room):
            # Made on first use: empty until then.
            return chat_pb2.ListMessagesResponse(first_sequence=1)
        if not page.allowed:
            raise denied(room)
        return chat_pb2.ListMessagesResponse(
            messages=page.messages,
            has_more=page.more,
            last_sequence=page.last_sequence,
            first_sequence=page.first_sequence,
        )

    def _counted(
        self, rpc: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """The handler, counting each refusal it answers with by RPC and reason
        (parley_chat_refusals_total)."""
        refusals = self._metrics.refusals

        if handler.unary_unary is not None:
            method: Any = handler.unary_unary

            async def unary(request: Any, context: Context) -> Any:
                try:
                    return await method(request, context)
                except ServiceError as error:
                    refusals.labels(rpc, error.reason).inc()
                    raise

            return handler._replace(unary_unary=unary)  # type: ignore[attr-defined,no-any-return]
        stream: Any = handler.stream_stream
        assert stream is not None

        async def streaming(requests: Any, context: Context) -> AsyncIterator[Any]:
            try:
                async for reply in stream(requests, context):
                    yield reply
            except ServiceError as error:
                refusals.labels(rpc, error.reason).inc()
                raise

        return handler._replace(stream_stream=streaming)  # type: ignore[attr-defined,no-any-return]

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Registers the service like the generated add_ChatServiceServicer_to_server, but
        with StreamChat's replies passed through as the bytes it yields."""
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            "StreamChat": grpc.stream_stream_rpc_method_handler(
                self.StreamChat,
                request_deserializer=chat_pb2.ChatMessage.FromString,
                response_serializer=None,
            ),
            "ListMessages": grpc.unary_unary_rpc_method_handler(
                self.ListMessages,
                request_deserializer=chat_pb2.ListMessagesRequest.FromString,
                response_serializer=chat_pb2.ListMessagesResponse.SerializeToString,
            ),
            "ListPresence": grpc.unary_unary_rpc_method_handler(
                self.ListPresence,
                request_deserializer=chat_pb2.ListPresenceRequest.FromString,
                response_serializer=chat_pb2.ListPresenceResponse.SerializeToString,
            ),
            **self._room_rpcs.handlers(),
        }
        handlers = {name: self._counted(name, handler) for name, handler in handlers.items()}
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(CHAT_SERVICE, handlers),)
        )
        server.add_registered_method_handlers(CHAT_SERVICE, handlers)

    async def ListPresence(
        self, request: chat_pb2.ListPresenceRequest, context: Context
    ) -> chat_pb2.ListPresenceResponse:
        room = check_room(request.room)
        user_id = await self._caller(context)
        access = await self._rooms.access(room, user_id, create=False)
        if not access.exists and self._made_on_first_use(room):
            return chat_pb2.ListPresenceResponse()  # made on first use: nobody there yet
        if not access.readable:
            raise denied(room)
        try:
            members = await self._presence.members(room)
        except (RedisError, OSError) as exc:
            raise Unavailable("redis", str(exc)) from None
        return chat_pb2.ListPresenceResponse(members=members)
