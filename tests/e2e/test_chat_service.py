"""The ChatService as a client sees it: health, reflection, auth, and chat across two replicas.

The chat tests need PARLEY_CHAT_ADDR and, for what crosses replicas, PARLEY_CHAT2_ADDR (a
second replica sharing the first one's Postgres and Redis). Chat senders must be users that
UserService knows, so each test creates its users with PARLEY_TOKEN and signs a token for each
with PARLEY_JWT_SECRET (HS256; PARLEY_JWT_ISSUER and PARLEY_JWT_AUDIENCE default to `parley`).
`parley-devstack run` exports the secret; without it these tests are skipped. Every test talks
in a room of its own, so neither other tests nor other runs can show up in it.

No test sleeps to synchronise: a stream is known to be in its room once it has received a
message, and every call and every read has a deadline.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from parley.proto import chat_pb2, chat_pb2_grpc, user_pb2, user_pb2_grpc
from parley.proto.contract import RESUME_KEY, ROOM_KEY

CALL_TIMEOUT = 10.0
# The whole life of one StreamChat call; each read and write on it has CALL_TIMEOUT.
STREAM_DEADLINE = 60.0

Metadata = tuple[tuple[str, str], ...]


@pytest.fixture
def chat_channel(chat_addr: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(chat_addr) as channel:
        yield channel


@pytest.mark.parametrize("service", ["", "chat.ChatService"])
def test_health_check_is_serving_without_a_token(chat_channel: grpc.Channel, service: str) -> None:
    response = health_pb2_grpc.HealthStub(chat_channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT
    )
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_chat_service_without_a_token(chat_channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(chat_channel)
    responses = list(
        stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
            timeout=CALL_TIMEOUT,
        )
    )
    assert len(responses) == 1
    names = {s.name for s in responses[0].list_services_response.service}
    assert "chat.ChatService" in names


@pytest.mark.parametrize(
    "metadata",
    [
        pytest.param((), id="no-token"),
        pytest.param((("authorization", "Bearer not-a-jwt"),), id="garbage-token"),
    ],
)
def test_stream_chat_without_a_valid_token_is_unauthenticated(
    chat_channel: grpc.Channel, metadata: tuple[tuple[str, str], ...]
) -> None:
    stream = chat_pb2_grpc.ChatServiceStub(chat_channel).StreamChat(
        iter([chat_pb2.ChatMessage(user="e2e", text="hello")]),
        metadata=metadata,
        timeout=CALL_TIMEOUT,
    )
    with pytest.raises(grpc.RpcError) as info:
        list(stream)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


# Chatting: users of UserService, each with a token of its own.


@dataclass(frozen=True)
class Chatter:
    """A user of UserService and a token whose subject is that user."""

    id: int
    name: str
    token: str

    @property
    def auth(self) -> Metadata:
        return (("authorization", f"Bearer {self.token}"),)


@pytest.fixture
def chatter(
    sign_token: Callable[[str], str], create_user: Callable[..., user_pb2.User]
) -> Callable[[str], Chatter]:
    """A factory: a new user (deleted after the test) named `<first name> <random>`."""

    def make(first_name: str) -> Chatter:
        user = create_user(name=f"{first_name} {uuid.uuid4().hex[:8]}")
        return Chatter(user.id, user.name, sign_token(str(user.id)))

    return make


@pytest.fixture
def room() -> str:
    return f"e2e-{uuid.uuid4().hex}"


@pytest.fixture
async def chat1(chat_addr: str) -> AsyncIterator[chat_pb2_grpc.ChatServiceAsyncStub]:
    """The first replica (PARLEY_CHAT_ADDR)."""
    async with grpc.aio.insecure_channel(chat_addr) as channel:
        yield chat_pb2_grpc.ChatServiceStub(channel)


@pytest.fixture
async def chat2(chat2_addr: str) -> AsyncIterator[chat_pb2_grpc.ChatServiceAsyncStub]:
    """The second replica (PARLEY_CHAT2_ADDR)."""
    async with grpc.aio.insecure_channel(chat2_addr) as channel:
        yield chat_pb2_grpc.ChatServiceStub(channel)


class ChatStream:
    """One StreamChat call in a room, cancelled on leaving the `async with` block."""

    def __init__(
        self,
        stub: chat_pb2_grpc.ChatServiceAsyncStub,
        chatter: Chatter,
        room: str,
        resume_after: int | str | None = None,
    ) -> None:
        metadata = [*chatter.auth, (ROOM_KEY, room)]
        if resume_after is not None:
            metadata.append((RESUME_KEY, str(resume_after)))
        self.call = stub.StreamChat(metadata=tuple(metadata), timeout=STREAM_DEADLINE)

    async def __aenter__(self) -> ChatStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.call.cancel()

    async def send(self, text: str, *, client_message_id: str = "") -> None:
        # `user` is the server's to set: whatever a client claims there is ignored.
        message = chat_pb2.ChatMessage(
            user="an impostor", text=text, client_message_id=client_message_id
        )
        await asyncio.wait_for(self.call.write(message), CALL_TIMEOUT)

    async def receive(self) -> chat_pb2.ChatMessage:
        message = await asyncio.wait_for(self.call.read(), CALL_TIMEOUT)
        assert message is not grpc.aio.EOF, "the server ended the stream"
        assert isinstance(message, chat_pb2.ChatMessage)
        return message

    async def receive_many(self, count: int) -> list[chat_pb2.ChatMessage]:
        return [await self.receive() for _ in range(count)]

    async def say(self, text: str, *, client_message_id: str = "") -> chat_pb2.ChatMessage:
        """Sends `text` and returns its echo, which must be the next message of the stream."""
        await self.send(text, client_message_id=client_message_id)
        echo = await self.receive()
        assert echo.text == text, f"expected the echo of {text!r}, got {echo}"
        return echo

    async def error(self) -> grpc.aio.AioRpcError:
        """The status the stream ends with; it must end with an error, not a message."""
        with pytest.raises(grpc.aio.AioRpcError) as info:
            message = await asyncio.wait_for(self.call.read(), CALL_TIMEOUT)
            pytest.fail(f"the stream went on with {message} instead of failing")
        return info.value


def _check_sent(
    message: chat_pb2.ChatMessage, room: str, sender: Chatter, text: str, sequence: int
) -> None:
    """The fields the server sets: the room, the sequence, and the sender from the token."""
    assert (message.room, message.sequence, message.text) == (room, sequence, text), message
    assert (message.user_id, message.user) == (sender.id, sender.name), message
    assert message.create_time.seconds > 0, message


async def _list_messages(
    stub: chat_pb2_grpc.ChatServiceAsyncStub, auth: Metadata, **request: Any
) -> chat_pb2.ListMessagesResponse:
    return await stub.ListMessages(
        chat_pb2.ListMessagesRequest(**request), metadata=auth, timeout=CALL_TIMEOUT
    )


async def test_streams_on_two_replicas_see_each_others_messages_once_in_order(
    chat1: chat_pb2_grpc.ChatServiceAsyncStub,
    chat2: chat_pb2_grpc.ChatServiceAsyncStub,
    chatter: Callable[[str], Chatter],
    room: str,
) -> None:
    ada, bob = chatter("Ada"), chatter("Bob")
    async with ChatStream(chat1, ada, room) as a:
        first = await a.say("hello, is anyone here?")
        _check_sent(first, room, ada, "hello, is anyone here?", 1)

        async with ChatStream(chat2, bob, room) as b:
            # Bob joined after the first message: a stream without a resume point is live only.
            second = await b.say("hi Ada, Bob here")
            _check_sent(second, room, bob, "hi Ada, Bob here", 2)
            assert await a.receive() == second
            third = await a.say("hi Bob")
            assert await b.receive() == third

            # Both talk at once: each stream sees every message once, both in the same order.
            ada_texts = [f"ada {i}" for i in range(5)]
            bob_texts = [f"bob {i}" for i in range(5)]

            async def send_all(stream: ChatStream, texts: list[str]) -> None:
                for text in texts:
                    await stream.send(text)

            await asyncio.gather(send_all(a, ada_texts), send_all(b, bob_texts))
            seen_by_a, seen_by_b = await asyncio.gather(a.receive_many(10), b.receive_many(10))
            assert seen_by_a == seen_by_b
            assert [m.sequence for m in seen_by_a] == list(range(4, 14))
            assert [m.text for m in seen_by_a if m.user_id == ada.id] == ada_texts
            assert [m.text for m in seen_by_a if m.user_id == bob.id] == bob_texts
            for message in seen_by_a:
                sender = ada if message.user_id == ada.id else bob
                _check_sent(message, room, sender, message.text, message.sequence)

            # Nothing else is on the way: the next message of each stream is the next one sent.
            last = await b.say("bye")
            _check_sent(last, room, bob, "bye", 14)
            assert await a.receive() == last


async def test_resuming_replays_exactly_the_missed_messages(
    chat1: chat_pb2_grpc.ChatServiceAsyncStub,
    chat2: chat_pb2_grpc.ChatServiceAsyncStub,
    chatter: Callable[[str], Chatter],
    room: str,
) -> None:
    ada, bob = chatter("Ada"), chatter("Bob")
    async with ChatStream(chat1, ada, room) as a:
        seen = await a.say("brb")

    # Ada is gone; Bob talks on the other replica.
    async with ChatStream(chat2, bob, room) as b:
        missed = [await b.say(f"missed {i}") for i in range(3)]
        assert [m.sequence for m in missed] == [seen.sequence + 1 + i for i in range(3)]

        async with (
            ChatStream(chat1, ada, room, resume_after=seen.sequence) as resumed,
            ChatStream(chat2, ada, room, resume_after=missed[-1].sequence) as up_to_date,
        ):
            assert await resumed.receive_many(3) == missed
            # Then the streams go on live, without a gap or a duplicate; the one that
            # resumed at the newest message has nothing to replay.
            live = await b.say("welcome back")
            assert live.sequence == missed[-1].sequence + 1
            assert await resumed.receive() == live
            assert await up_to_date.receive() == live

        # A resume point of 0 replays the room from its first message.
        async with ChatStream(chat2, bob, room, resume_after=0) as replay:
            assert await replay.receive_many(5) == [seen, *missed, live]


async def test_a_message_resent_after_a_reconnect_is_stored_and_delivered_once(
    chat1: chat_pb2_grpc.ChatServiceAsyncStub,
    chat2: chat_pb2_grpc.ChatServiceAsyncStub,
    chatter: Callable[[str], Chatter],
    room: str,
) -> None:
    ada = chatter("Ada")
    async with ChatStream(chat1, ada, room) as a:
        sent = await a.say("only once, please", client_message_id="ada-1")

    async with ChatStream(chat2, ada, room, resume_after=sent.sequence) as again:
        await again.send("only once, please", client_message_id="ada-1")
        # The stream handles what it is sent in order: the next message proves the resent
        # one was handled, and it was neither stored again nor delivered again.
        following = await again.say("and this one is new", client_message_id="ada-2")
        assert following.sequence == sent.sequence + 1

    page = await _list_messages(chat1, ada.auth, room=room)
    assert list(page.messages) == [sent, following]


async def test_list_messages_pages_through_the_history(
    chat1: chat_pb2_grpc.ChatServiceAsyncStub,
    chat2: chat_pb2_grpc.ChatServiceAsyncStub,
    chatter: Callable[[str], Chatter],
    room: str,
) -> None:
    ada = chatter("Ada")
    async with ChatStream(chat1, ada, room) as a:
        history = [await a.say(f"line {i}") for i in range(5)]
    assert [m.sequence for m in history] == [1, 2, 3, 4, 5]

    # Forwards from the start, on the other replica: the same stored messages.
    pages = []
    after = 0
    while True:
        page = await _list_messages(chat2, ada.auth, room=room, after_sequence=after, page_size=2)
        assert page.last_sequence == 5
        pages.append(list(page.messages))
        if not page.has_more:
            break
        after = page.messages[-1].sequence
    assert pages == [history[0:2], history[2:4], history[4:5]]

    # Backwards from the newest: each page is the one just before, still oldest first.
    newest = await _list_messages(chat1, ada.auth, room=room, before_sequence=5, page_size=2)
    assert (list(newest.messages), newest.has_more) == (history[2:4], True)
    oldest = await _list_messages(chat1, ada.auth, room=room, before_sequence=3, page_size=2)
    assert (list(oldest.messages), oldest.has_more) == (history[0:2], False)

    everything = await _list_messages(chat1, ada.auth, room=room)
    assert (list(everything.messages), everything.has_more) == (history, False)
    empty = await _list_messages(chat1, ada.auth, room=f"{room}-unused")
    assert (list(empty.messages), empty.has_more, empty.last_sequence) == ([], False, 0)


async def _presence_of_three_streams(
    chat1: chat_pb2_grpc.ChatServiceAsyncStub,
    chat2: chat_pb2_grpc.ChatServiceAsyncStub,
    ada: Chatter,
    bob: Chatter,
    room: str,
) -> list[list[chat_pb2.RoomMember]]:
    """ListPresence, asked of each replica, while Ada has a stream on each replica and Bob
    one on the second."""
    async with (
        ChatStream(chat1, ada, room, resume_after=0) as ada_here,
        ChatStream(chat2, ada, room, resume_after=0) as ada_there,
        ChatStream(chat2, bob, room, resume_after=0) as bob_there,
    ):
        # A stream has announced itself once its own message comes back. Each replays the
        # room from the start, so each sees the messages of the streams before it first.
        texts: list[str] = []
        for stream, text in ((ada_here, "one"), (ada_there, "two"), (bob_there, "three")):
            await stream.send(text)
            texts.append(text)
            assert [m.text for m in await stream.receive_many(len(texts))] == texts
        answers = []
        for stub in (chat1, chat2):
            presence = await stub.ListPresence(
                chat_pb2.ListPresenceRequest(room=room), metadata=bob.auth, timeout=CALL_TIMEOUT
            )
            answers.append(list(presence.members))
        return answers


async def test_presence_lists_the_users_connected_on_any_replica(
    chat1: chat_pb2_grpc.ChatServiceAsyncStub,
    chat2: chat_pb2_grpc.ChatServiceAsyncStub,
    chatter: Callable[[str], Chatter],
    room: str,
) -> None:
    ada, bob = chatter("Ada"), chatter("Bob")
    expected = sorted([(ada.id, ada.name, 2), (bob.id, bob.name, 1)])
    for members in await _presence_of_three_streams(chat1, chat2, ada, bob, room):
        assert [(m.user_id, m.user) for m in members] == [(i, name) for i, name, _ in expected]
        # At least: the exact count is the test below.
        for member, (_, _, streams) in zip(members, expected, strict=True):
            assert member.stream_count >= streams, members


async def test_presence_counts_each_stream_once(
    chat1: chat_pb2_grpc.ChatServiceAsyncStub,
    chat2: chat_pb2_grpc.ChatServiceAsyncStub,
    chatter: Callable[[str], Chatter],
    room: str,
) -> None:
    ada, bob = chatter("Ada"), chatter("Bob")
    expected = sorted(
        [
            chat_pb2.RoomMember(user_id=ada.id, user=ada.name, stream_count=2),
            chat_pb2.RoomMember(user_id=bob.id, user=bob.name, stream_count=1),
        ],
        key=lambda member: member.user_id,
    )
    for members in await _presence_of_three_streams(chat1, chat2, ada, bob, room):
        assert members == expected


# Requests the service refuses.


@pytest.mark.parametrize("text", ["", " \t\n "], ids=["empty", "white-space"])
async def test_a_message_without_text_is_invalid_and_not_stored(
    chat1: chat_pb2_grpc.ChatServiceAsyncStub,
    chatter: Callable[[str], Chatter],
    room: str,
    text: str,
) -> None:
    ada = chatter("Ada")
    async with ChatStream(chat1, ada, room) as stream:
        await stream.send(text)
        error = await stream.error()
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert "text" in (error.details() or "")
    page = await _list_messages(chat1, ada.auth, room=room)
    assert (list(page.messages), page.last_sequence) == ([], 0)


@pytest.mark.parametrize(
    "bad_room",
    ["General", "two words", "-dash-first", "_underscore-first", "dot.ted", "r" * 65],
)
async def test_a_bad_room_name_is_invalid(
    chat1: chat_pb2_grpc.ChatServiceAsyncStub, chatter: Callable[[str], Chatter], bad_room: str
) -> None:
    ada = chatter("Ada")
    async with ChatStream(chat1, ada, bad_room) as stream:
        error = await stream.error()
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert ROOM_KEY in (error.details() or "")

    with pytest.raises(grpc.aio.AioRpcError) as listing:
        await _list_messages(chat1, ada.auth, room=bad_room)
    assert listing.value.code() == grpc.StatusCode.INVALID_ARGUMENT, listing.value
    with pytest.raises(grpc.aio.AioRpcError) as presence:
        await chat1.ListPresence(
            chat_pb2.ListPresenceRequest(room=bad_room), metadata=ada.auth, timeout=CALL_TIMEOUT
        )
    assert presence.value.code() == grpc.StatusCode.INVALID_ARGUMENT, presence.value


@pytest.mark.parametrize("resume_after", ["-1", "soon", "1.5"])
async def test_a_bad_resume_point_is_invalid(
    chat1: chat_pb2_grpc.ChatServiceAsyncStub,
    chatter: Callable[[str], Chatter],
    room: str,
    resume_after: str,
) -> None:
    async with ChatStream(chat1, chatter("Ada"), room, resume_after=resume_after) as stream:
        error = await stream.error()
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert RESUME_KEY in (error.details() or "")


async def test_a_sender_unknown_to_the_user_service_is_refused(
    chat1: chat_pb2_grpc.ChatServiceAsyncStub,
    chatter: Callable[[str], Chatter],
    users: user_pb2_grpc.UserServiceStub,
    auth: Metadata,
    room: str,
) -> None:
    gone = chatter("Gone")
    users.DeleteUser(user_pb2.DeleteUserRequest(id=gone.id), metadata=auth, timeout=CALL_TIMEOUT)
    async with ChatStream(chat1, gone, room) as stream:
        error = await stream.error()
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error


async def test_a_token_whose_subject_is_not_a_user_id_is_refused(
    chat1: chat_pb2_grpc.ChatServiceAsyncStub, sign_token: Callable[[str], str], room: str
) -> None:
    robot = Chatter(0, "robot", sign_token("build-robot"))
    async with ChatStream(chat1, robot, room) as stream:
        error = await stream.error()
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error


class NodeChat:
    """tests/e2e/node/chat.js in a child process: lines in on stdin, messages out on stdout,
    as a person would run it in a terminal."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []

    @classmethod
    async def start(cls, script: Path, addr: str, person: Chatter, room: str) -> NodeChat:
        node = shutil.which("node")
        assert node is not None
        process = await asyncio.create_subprocess_exec(
            node,
            str(script),
            room,
            cwd=script.parent,
            env={**os.environ, "PARLEY_CHAT_ADDR": addr, "PARLEY_TOKEN": person.token},
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        return cls(process)

    async def type(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{text}\n".encode())
        await self.process.stdin.drain()

    async def wait_for_line(self, line: str) -> None:
        """Reads the output until `line` shows up, within CALL_TIMEOUT."""
        assert self.process.stdout is not None
        async with asyncio.timeout(CALL_TIMEOUT):
            while line not in self.lines:
                raw = await self.process.stdout.readline()
                assert raw, f"the chat ended before printing {line!r}; it printed {self.lines}"
                self.lines.append(raw.decode().rstrip("\n"))

    async def close(self) -> int:
        if self.process.returncode is None and self.process.stdin is not None:
            self.process.stdin.close()  # end of input ends the chat
        async with asyncio.timeout(CALL_TIMEOUT):
            return await self.process.wait()


async def test_two_node_terminals_chat_through_different_replicas(
    node_dir: Path,
    chat_addr: str,
    chat2_addr: str,
    chatter: Callable[[str], Chatter],
    room: str,
) -> None:
    ada, bob = chatter("Ada"), chatter("Bob")
    script = node_dir / "chat.js"
    first = await NodeChat.start(script, chat_addr, ada, room)
    second: NodeChat | None = None
    try:
        # Seeing its own message back means a terminal's stream is in the room.
        await first.type("hello from replica one")
        await first.wait_for_line(f"#1 {ada.name}: hello from replica one")
        # The second terminal joins later: without a resume point it gets live messages only.
        second = await NodeChat.start(script, chat2_addr, bob, room)
        await second.type("hello from replica two")
        await second.wait_for_line(f"#2 {bob.name}: hello from replica two")
        await first.wait_for_line(f"#2 {bob.name}: hello from replica two")
        await first.type("see you")
        await second.wait_for_line(f"#3 {ada.name}: see you")
        await first.wait_for_line(f"#3 {ada.name}: see you")
    finally:
        codes = [await first.close()] + ([await second.close()] if second else [])
    assert first.lines == [
        f"#1 {ada.name}: hello from replica one",
        f"#2 {bob.name}: hello from replica two",
        f"#3 {ada.name}: see you",
    ]
    assert second is not None
    assert second.lines == first.lines[1:]
    assert codes == [0, 0]
