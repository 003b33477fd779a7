"""Property-based fuzzing of ChatService's three RPCs against a real server.

Every call must end OK or with a code the README documents for it, never UNKNOWN or
INTERNAL; what is stored must be exactly what the model of the call says, byte for byte;
and what ListMessages returns must be the stored messages the request asked for. Texts carry
any character, control characters included; metadata values (the room, the resume point, the
request id, the token) are printable ASCII of any length; request bytes may hold invalid UTF-8.
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
from parley.proto.contract import MAX_CLIENT_MESSAGE_ID, MAX_TEXT_BYTES, RESUME_KEY, ROOM_KEY
from parley.testing import bearer, rich_error, wait_until_sync

MAX_SEQUENCE = 2**63 - 1
ROOM = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
DIGITS = re.compile(r"[0-9]+")
# C0 and C1 controls and DEL, but tab and newline: a text holding one is INVALID_ARGUMENT.
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# grpc's default metadata limits: over 8 KiB in all it refuses a call now and then, over 16 KiB
# always, with RESOURCE_EXHAUSTED before any handler runs. A value up to this size never is.
METADATA_ALWAYS_ACCEPTED = 7 * 1024


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


# Protobuf strings must be valid UTF-8, so no lone surrogates; NUL and other controls stay in.
any_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
long_text = st.integers(MAX_TEXT_BYTES - 2, MAX_TEXT_BYTES + 2).map(lambda n: "é" * (n // 2))
# Texts dense with C0/C1 controls, DEL, tab and newline among other characters.
controls = st.sampled_from([chr(c) for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]])
control_text = st.text(
    st.one_of(controls, st.characters(exclude_categories=["Cs"])), min_size=1, max_size=12
)
# Metadata values: printable ASCII (gRPC refuses anything else on the client side).
ascii_junk = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=80)
printable = st.characters(min_codepoint=0x20, max_codepoint=0x7E)


def _repeated(unit: str, length: int) -> str:
    return (unit * (length // len(unit) + 1))[:length]


# Printable ASCII of any length, from empty to well past grpc's 16 KiB metadata limit.
any_length = st.builds(
    _repeated,
    st.text(printable, min_size=1, max_size=12),
    st.one_of(st.integers(0, 80), st.integers(0, 70_000)),
)
# Resume points: numbers of any length (4,400 digits once gave INTERNAL), leading zeros.
digit_strings = st.builds(
    lambda zeros, digits: "0" * zeros + digits,
    st.integers(0, 30),
    st.one_of(
        st.integers(0, 2**64).map(str),
        st.integers(1, 7000).map(lambda n: _repeated("9", n)),
        st.text(st.sampled_from("0123456789"), min_size=1, max_size=25),
    ),
)


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
    return (
        bool(text.strip()) and len(text.encode()) <= MAX_TEXT_BYTES and CONTROL.search(text) is None
    )


def resume_ok(value: str) -> bool:
    """Whether the server must accept `value` as x-chat-resume-after."""
    if value == "":
        return True
    if DIGITS.fullmatch(value) is None:
        return False
    digits = value.lstrip("0") or "0"
    return len(digits) <= len(str(MAX_SEQUENCE)) and int(digits) <= MAX_SEQUENCE


def resume_value(value: str) -> int:
    return int(value.lstrip("0") or "0")


def fresh_room() -> str:
    return f"fz-{uuid.uuid4().hex[:16]}"


chat_messages = st.lists(
    st.builds(
        chat_pb2.ChatMessage,
        user=any_text,
        text=st.one_of(
            any_text,
            long_text,
            control_text,
            st.sampled_from(["hi", " ", "\n\t", "ok 👍", "a\x00b", "a\tb\nc", "x\r\n", "\x1b[2J"]),
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
    digit_strings,
    ascii_junk,
    st.text(printable, max_size=40),
)


@fuzz(60)
@given(messages=chat_messages, room=room_header, resume=resume_header)
def test_stream_chat_fuzz(stack, messages, room, resume) -> None:  # type: ignore[no-untyped-def]
    metadata: list[tuple[str, str]] = []
    target = fresh_room()
    room_valid = True
    if room == "fresh" or room is None:
        metadata.append((ROOM_KEY, target))
    else:
        metadata.append((ROOM_KEY, room))
        room_valid = room == "" or ROOM.fullmatch(room) is not None
        target = room or "general"
    resume_point: int | None = None
    resume_valid = True
    if resume is not None:
        metadata.append((RESUME_KEY, resume))
        resume_valid = resume_ok(resume)
        resume_point = resume_value(resume) if resume_valid and resume else None
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
    if resume_point:
        # Past the end of the (new, empty) room: no point of this room, refused before
        # anything is read or stored.
        received, code = stack.stream_chat(
            messages, expect=1, token=stack.chatter_token, metadata=metadata
        )
        assert code == grpc.StatusCode.OUT_OF_RANGE, code
        assert received == []
        assert stored(stack, target) == before
        return
    skip = 0
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
        messages, expect=len(texts), token=stack.chatter_token, metadata=[(ROOM_KEY, room)]
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


def stream_outcome(stack, metadata: list[tuple[str, str]]) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    """Opens StreamChat with `metadata` and sends one good message: OK once the message is
    stored (the stream was accepted), else the code the call ended with."""
    client_id = uuid.uuid4().hex
    call = stack.chats().StreamChat(
        iter([chat_pb2.ChatMessage(text="metadata fuzz", client_message_id=client_id)]),
        metadata=metadata,
        timeout=20,
    )

    def outcome() -> grpc.StatusCode | None:
        if call.done():
            return call.code()
        rows = stack.sql(
            "SELECT count(*) FROM chat_messages WHERE client_message_id = %s", client_id
        )
        return grpc.StatusCode.OK if rows[0][0] else None

    try:
        return wait_until_sync(outcome, 15, "the stream to end or store its message")
    finally:
        call.cancel()


metadata_values = {
    ROOM_KEY: st.one_of(any_length, st.from_regex(ROOM, fullmatch=True)),
    RESUME_KEY: st.one_of(any_length, digit_strings),
    "x-request-id": any_length,
    "authorization": st.one_of(any_length, any_length.map(lambda v: f"Bearer {v}")),
}
metadata_entries = st.sampled_from(sorted(metadata_values)).flatmap(
    lambda key: st.tuples(st.just(key), metadata_values[key])
)


@fuzz(40)
@given(entry=metadata_entries)
def test_metadata_values_of_any_length_fuzz(stack, entry) -> None:  # type: ignore[no-untyped-def]
    key, value = entry
    room = fresh_room()
    headers = {"authorization": f"Bearer {stack.chatter_token}", ROOM_KEY: room}
    headers[key] = value
    metadata = list(headers.items())
    if key == ROOM_KEY:
        valid = value == "" or ROOM.fullmatch(value) is not None
        stream_expected = grpc.StatusCode.OK if valid else grpc.StatusCode.INVALID_ARGUMENT
    elif key == RESUME_KEY:
        # The room is new and empty: a point past 0 is not one of its points.
        stream_expected = (
            grpc.StatusCode.INVALID_ARGUMENT
            if not resume_ok(value)
            else grpc.StatusCode.OUT_OF_RANGE
            if resume_value(value) > 0
            else grpc.StatusCode.OK
        )
    elif key == "authorization":
        stream_expected = grpc.StatusCode.UNAUTHENTICATED
    else:
        stream_expected = grpc.StatusCode.OK
    # ListMessages reads the room from its request, and the token and request id as StreamChat.
    list_expected = (
        grpc.StatusCode.UNAUTHENTICATED if key == "authorization" else grpc.StatusCode.OK
    )
    allowed_refusal = (
        {grpc.StatusCode.RESOURCE_EXHAUSTED} if len(value) > (METADATA_ALWAYS_ACCEPTED) else set()
    )

    code = stream_outcome(stack, metadata)
    assert code in {stream_expected} | allowed_refusal, (key, len(value), value[:40], code)
    try:
        stack.chats().ListMessages(
            chat_pb2.ListMessagesRequest(room=room), metadata=metadata, timeout=10
        )
        code = grpc.StatusCode.OK
    except grpc.RpcError as error:
        code = error.code()
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            assert "metadata size" in (error.details() or ""), error.details()
    assert code in {list_expected} | allowed_refusal, (key, len(value), value[:40], code)


def _field(number: int, data: bytes) -> bytes:
    """One length-delimited protobuf field: its tag, the length as a varint, the bytes."""
    header = bytearray([number << 3 | 2])
    length = len(data)
    while length >= 0x80:
        header.append(length & 0x7F | 0x80)
        length >>= 7
    header.append(length)
    return bytes(header) + data


def _not_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


# Bytes that are not UTF-8: a stray continuation or lead byte, an overlong form, an encoded
# surrogate, a code point past U+10FFFF, a sequence cut short; between arbitrary bytes.
invalid_utf8 = st.builds(
    lambda before, bad, after: before + bad + after,
    st.binary(max_size=6),
    st.sampled_from(
        [
            b"\xff",
            b"\x80",
            b"\xc3\x28",
            b"\xc0\xaf",
            b"\xed\xa0\x80",
            b"\xf4\x90\x80\x80",
            b"\xe2\x82",
        ]
    ),
    st.binary(max_size=6),
).filter(_not_utf8)
# ChatMessage's string fields, by number; a client sets only text and client_message_id, but
# the server must refuse bad bytes in any of them before reading the message.
chat_string_fields = st.sampled_from(
    [(1, "user"), (2, "text"), (3, "room"), (7, "client_message_id")]
)


@fuzz(30)
@given(bad=invalid_utf8, field=chat_string_fields)
def test_stream_chat_messages_with_invalid_utf8_are_invalid_argument(stack, bad, field) -> None:  # type: ignore[no-untyped-def]
    number, name = field
    room = fresh_room()
    good = chat_pb2.ChatMessage(text="before", client_message_id="good").SerializeToString()
    raw = _field(number, bad)
    if number != 2:
        raw += _field(2, b"after")
    call = stack.channel(stack.chat.target).stream_stream("/chat.ChatService/StreamChat")(
        iter([good, raw]),
        metadata=[*bearer(stack.chatter_token), (ROOM_KEY, room)],
        timeout=10,
    )
    received = []
    with pytest.raises(grpc.RpcError) as failed:
        for reply in call:
            received.append(chat_pb2.ChatMessage.FromString(reply))
    error = rich_error(failed.value)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error.message
    assert error.fields == [name]
    assert error.reason == "MALFORMED_REQUEST"
    rows = stored(stack, room)
    assert [(r.text, r.client_message_id) for r in rows] == [("before", "good")]
    assert [m.text for m in received] in ([], ["before"])


@fuzz(30)
@given(bad=invalid_utf8, method=st.sampled_from(["ListMessages", "ListPresence"]))
def test_room_requests_with_invalid_utf8_are_invalid_argument(stack, bad, method) -> None:  # type: ignore[no-untyped-def]
    # Field 1 of both requests is `room`; ListMessages' other fields come after it.
    raw = _field(1, bad)
    if method == "ListMessages":
        raw += bytes([2 << 3, 5])  # after_sequence = 5
    call = stack.channel(stack.chat.target).unary_unary(f"/chat.ChatService/{method}")
    with pytest.raises(grpc.RpcError) as failed:
        call(raw, metadata=bearer(stack.chatter_token), timeout=10)
    error = rich_error(failed.value)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error.message
    assert error.fields == ["room"]
    assert error.reason == "MALFORMED_REQUEST"
