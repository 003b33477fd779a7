"""Property-based fuzzing of ChatService's three RPCs against a real server.

Every call must end OK or with a code the README documents for it, never UNKNOWN or
INTERNAL; what is stored must be exactly what the model of the call says, byte for byte;
and what ListMessages returns must be the stored messages the request asked for.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parley.proto import chat_pb2
from parley.testing import bearer

MAX_TEXT_BYTES = 4096
MAX_CLIENT_MESSAGE_ID = 64
ROOM = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


# Protobuf strings must be valid UTF-8, so no lone surrogates; NUL and other controls stay in.
any_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
long_text = st.integers(MAX_TEXT_BYTES - 2, MAX_TEXT_BYTES + 2).map(lambda n: "é" * (n // 2))
# Metadata values: printable ASCII (gRPC refuses anything else on the client side).
ascii_junk = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=80)


@dataclass
class Stored:
    sequence: int
    user_id: int
    user_name: str
    text: str
    client_message_id: str


def stored(stack, room: str) -> list[Stored]:  # type: ignore[no-untyped-def]
    rows = stack.sql(
        "SELECT sequence, user_id, user_name, text, client_message_id FROM chat_messages"
        " WHERE room = %s ORDER BY sequence",
        room,
    )
    return [Stored(*row) for row in rows]


def text_ok(text: str) -> bool:
    return bool(text.strip()) and len(text.encode()) <= MAX_TEXT_BYTES and "\x00" not in text


def fresh_room() -> str:
    return f"fz-{uuid.uuid4().hex[:16]}"


chat_messages = st.lists(
    st.builds(
        chat_pb2.ChatMessage,
        user=any_text,
        text=st.one_of(
            any_text, long_text, st.sampled_from(["hi", " ", "\n\t", "ok 👍", "a\x00b"])
        ),
        room=any_text,
        sequence=st.integers(-(2**63), 2**63 - 1),
        user_id=st.integers(-(2**31), 2**31 - 1),
        client_message_id=st.one_of(
            st.just(""),
            st.sampled_from(["a", "b", "n\x00"]),  # repeats: stored and delivered once
            st.text(max_size=MAX_CLIENT_MESSAGE_ID + 3),
        ),
    ),
    max_size=6,
)
room_header = st.one_of(st.none(), st.just("fresh"), ascii_junk)
resume_header = st.one_of(
    st.none(),
    st.integers(0, 3).map(str),
    st.integers(0, 2**64).map(str),
    ascii_junk,
)


@fuzz(60)
@given(messages=chat_messages, room=room_header, resume=resume_header)
def test_stream_chat_fuzz(stack, messages, room, resume) -> None:  # type: ignore[no-untyped-def]
    metadata: list[tuple[str, str]] = []
    target = fresh_room()
    room_valid = True
    if room == "fresh" or room is None:
        metadata.append(("x-chat-room", target))
    else:
        metadata.append(("x-chat-room", room))
        room_valid = room == "" or ROOM.fullmatch(room) is not None
        target = room or "general"
    resume_point: int | None = None
    resume_valid = True
    if resume is not None:
        metadata.append(("x-chat-resume-after", resume))
        resume_valid = resume == "" or (resume.isdigit() and int(resume) <= 2**63 - 1)
        resume_point = int(resume) if resume_valid and resume else None
    before = stored(stack, target)

    # The model: messages are handled in order; the first bad one ends the stream.
    expected: list[tuple[str, str]] = []
    seen_ids: set[str] = set()
    bad = False
    for message in messages:
        cmid = message.client_message_id
        if not text_ok(message.text) or len(cmid) > MAX_CLIENT_MESSAGE_ID or "\x00" in cmid:
            bad = True
            break
        if message.client_message_id and message.client_message_id in seen_ids:
            continue
        seen_ids.add(message.client_message_id)
        expected.append((message.text, message.client_message_id))

    if not (room_valid and resume_valid):
        received, code = stack.stream_chat(
            messages, expect=1, token=stack.chatter_token, metadata=metadata
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT, code
        assert received == []
        assert stored(stack, target) == before
        return

    assume_fresh = target.startswith("fz-")
    if not assume_fresh:  # a junk header that is a valid room: history is shared
        return
    skip = resume_point or 0
    echoes = max(0, len(expected) - skip)
    received, code = stack.stream_chat(
        messages,
        expect=echoes + (1 if bad else 0),
        token=stack.chatter_token,
        metadata=metadata,
        settled=lambda: len(stored(stack, target)) >= len(expected),
    )
    if bad:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, code
    else:
        assert code is None, code
    rows = stored(stack, target)
    assert [(r.text, r.client_message_id) for r in rows] == expected
    assert [r.sequence for r in rows] == list(range(1, len(rows) + 1))
    assert {(r.user_id, r.user_name) for r in rows} <= {(stack.chatter_id, stack.chatter_name)}
    delivered = [(m.sequence, m.text, m.client_message_id, m.user_id, m.room) for m in received]
    truth = [
        (r.sequence, r.text, r.client_message_id, r.user_id, target)
        for r in rows
        if r.sequence > skip
    ]
    if bad:
        assert delivered == truth[: len(delivered)]
    else:
        assert delivered == truth


@pytest.fixture(scope="module")
def history(stack) -> tuple[str, list[Stored]]:  # type: ignore[no-untyped-def]
    room = fresh_room()
    texts = [f"message {i} ✓" for i in range(1, 13)]
    messages = [
        chat_pb2.ChatMessage(text=t, client_message_id=f"h{i}") for i, t in enumerate(texts)
    ]
    received, code = stack.stream_chat(
        messages, expect=len(texts), token=stack.chatter_token, metadata=[("x-chat-room", room)]
    )
    assert code is None and len(received) == len(texts)
    rows = stored(stack, room)
    assert len(rows) == len(texts)
    return room, rows


sequence_values = st.one_of(
    st.integers(-3, 16), st.integers(-(2**63), 2**63 - 1), st.sampled_from([2**63 - 1])
)


@fuzz(150)
@given(
    room=st.one_of(st.just("history"), st.just("empty"), ascii_junk, any_text),
    after=sequence_values,
    before=sequence_values,
    page_size=st.one_of(st.integers(-2, 14), st.integers(-(2**31), 2**31 - 1)),
)
def test_list_messages_fuzz(stack, history, room, after, before, page_size) -> None:  # type: ignore[no-untyped-def]
    history_room, rows = history
    name = {"history": history_room, "empty": fresh_room()}.get(room, room)
    request = chat_pb2.ListMessagesRequest(
        room=name, after_sequence=after, before_sequence=before, page_size=page_size
    )
    try:
        reply = stack.chats().ListMessages(
            request, metadata=bearer(stack.chatter_token), timeout=10
        )
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
        assert (
            (name and ROOM.fullmatch(name) is None) or after < 0 or before < 0 or page_size < 0
        ), "a valid request was refused"
        return
    assert name == "" or ROOM.fullmatch(name), "an invalid room was accepted"
    assert after >= 0 and before >= 0 and page_size >= 0
    if name == "":
        return  # the default room, shared with whoever else uses it
    history_rows = rows if name == history_room else []
    got = [(m.sequence, m.text, m.client_message_id, m.user_id, m.user) for m in reply.messages]
    truth = [
        (r.sequence, r.text, r.client_message_id, r.user_id, r.user_name) for r in history_rows
    ]
    size = 50 if page_size == 0 else min(page_size, 500)
    if before > 0:
        older = [t for t in truth if t[0] < before]
        assert got == older[-size:]
        assert reply.has_more == (len(older) > size)
    else:
        newer = [t for t in truth if t[0] > after]
        assert got == newer[:size]
        assert reply.has_more == (len(newer) > size)
    assert reply.last_sequence == len(history_rows)
    assert all(m.room == name for m in reply.messages)
    assert stored(stack, history_room) == rows, "stored history changed"


@fuzz(100)
@given(room=st.one_of(st.just("fresh"), ascii_junk, any_text))
def test_list_presence_fuzz(stack, room) -> None:  # type: ignore[no-untyped-def]
    name = fresh_room() if room == "fresh" else room
    try:
        reply = stack.chats().ListPresence(
            chat_pb2.ListPresenceRequest(room=name),
            metadata=bearer(stack.chatter_token),
            timeout=10,
        )
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
        assert name and ROOM.fullmatch(name) is None
        return
    assert name == "" or ROOM.fullmatch(name)
    if name.startswith("fz-"):
        assert list(reply.members) == []
