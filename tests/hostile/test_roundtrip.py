"""Strings that break naive SQL, LIKE patterns, escaping and Unicode handling are stored and
returned byte for byte, by UserService (GetUser, ListUsers) and ChatService (the StreamChat
echo, ListMessages and a StreamChat replay)."""

from __future__ import annotations

import uuid
from typing import Any

from parley.proto import chat_pb2, user_pb2
from parley.proto.contract import RESUME_KEY, ROOM_KEY
from parley.testing import bearer

NASTY = [
    "'; DROP TABLE users; --",
    "Robert'); DROP TABLE chat_messages;--",
    "%_\\ 100% _under_ \\\\ back\\slash",
    "\"double\" 'single' `back` ‘curly’ «guillemets»",
    "$1 $$ :name %s %(x)s {0} ?",
    "e\u0301 a\u0308 Z\u0324\u0354\u0367\u0311\u0313 combining",
    "שלום \u200fעולם مرحبا بالعالم",
    "\u202eoverride\u202c and a\u200bzero width",
    "👨\u200d👩\u200d👧\u200d👦 family, 🏳️\u200d🌈 flag, 🧑🏽\u200d💻 coder",
    "𝕳𝖊𝖑𝖑𝖔 𐍈 \U0001f600 \U0010fffd astral",
    "a\ufeffb BOM inside, ﷽ wide",
    "日本語のテキスト、中文文本，한국어",
    "😀" * 100,  # 100 characters, 400 bytes: the longest name allowed
]
CHAT_ONLY = [
    "  padded with spaces and a newline\n",
    "line one\nline two\n\ttabbed",
    "a\u2028b\u2029c",
    "😀" * 1024,  # exactly 4096 bytes
]


def test_user_names_round_trip(stack: Any) -> None:
    created = {stack.create_user(name).id: name for name in NASTY}
    assert [created[i] for i in sorted(created)] == NASTY
    for user_id, name in created.items():
        reply = stack.users().GetUser(
            user_pb2.GetUserRequest(id=user_id), metadata=bearer(stack.chatter_token), timeout=10
        )
        assert reply.user.name.encode() == name.encode()
    listed = {
        user.id: user.name
        for user in stack.users().ListUsers(
            user_pb2.ListUsersRequest(page_size=1000),
            metadata=bearer(stack.chatter_token),
            timeout=10,
        )
    }
    for user_id, name in created.items():
        assert listed[user_id].encode() == name.encode()
    stored = dict(stack.sql("SELECT id, name FROM users WHERE id = ANY(%s)", list(created)))
    assert stored == created
    assert stack.sql("SELECT to_regclass('users'), to_regclass('chat_messages')") == [
        ("users", "chat_messages")
    ]


def test_chat_texts_round_trip(stack: Any) -> None:
    texts = NASTY + CHAT_ONLY
    room = f"rt-{uuid.uuid4().hex[:12]}"
    ids = [f"{i}:{t}"[:64] for i, t in enumerate(texts)]  # nasty, and unique
    echoes, code = stack.stream_chat(
        [
            chat_pb2.ChatMessage(text=t, client_message_id=i)
            for t, i in zip(texts, ids, strict=True)
        ],
        expect=len(texts),
        token=stack.chatter_token,
        metadata=[(ROOM_KEY, room)],
    )
    assert code is None
    assert [m.text.encode() for m in echoes] == [t.encode() for t in texts]
    assert [m.client_message_id for m in echoes] == ids
    listed = stack.chats().ListMessages(
        chat_pb2.ListMessagesRequest(room=room, page_size=100),
        metadata=bearer(stack.chatter_token),
        timeout=10,
    )
    assert [m.text.encode() for m in listed.messages] == [t.encode() for t in texts]
    replay, code = stack.stream_chat(
        [],
        expect=len(texts),
        token=stack.chatter_token,
        metadata=[(ROOM_KEY, room), (RESUME_KEY, "0")],
    )
    assert code is None
    assert [m.text.encode() for m in replay] == [t.encode() for t in texts]
    stored = [
        r[0]
        for r in stack.sql("SELECT text FROM chat_messages WHERE room = %s ORDER BY sequence", room)
    ]
    assert stored == texts
