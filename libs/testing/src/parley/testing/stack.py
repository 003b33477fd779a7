"""A whole Parley for one test: a UserService and chat replicas on one private database and
Redis prefix, with people who have tokens; and what a test checks of a finished conversation.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import grpc
import psycopg

from parley.proto import user_pb2, user_pb2_grpc
from parley.testing.launcher import JWT_SECRET, Launcher, Served, chat_env, service_env
from parley.testing.tokens import bearer, make_token

__all__ = [
    "USER_DEPENDENCY",
    "Person",
    "Stack",
    "StoredMessage",
    "check_conversation",
    "create_people",
    "start_stack",
    "stored_messages",
]

# The readiness a chat replica reports for its UserService.
USER_DEPENDENCY = "dependency/user-service"


@dataclass(frozen=True)
class Person:
    """A user in UserService and a token for them."""

    id: int
    name: str
    token: str


async def create_people(
    target: str, names: Sequence[str], *, secret: str = JWT_SECRET, ttl: float = 600
) -> dict[str, Person]:
    """Creates users in the UserService at `target` (with a users:write token) and a chat
    token for each, signed with `secret`."""
    admin = bearer(make_token(secret, "admin", "users:write", ttl))
    people: dict[str, Person] = {}
    async with grpc.aio.insecure_channel(target) as channel:
        stub = user_pb2_grpc.UserServiceStub(channel)
        for name in names:
            email = f"{name.lower().replace(' ', '.')}.{uuid.uuid4().hex[:6]}@example.com"
            reply = await stub.CreateUser(
                user_pb2.CreateUserRequest(name=name, email=email, age=36),
                metadata=admin,
                timeout=10,
            )
            user = reply.user
            people[name] = Person(user.id, user.name, make_token(secret, str(user.id), ttl=ttl))
    return people


@dataclass
class Stack:
    """A UserService and chat replicas sharing one database and Redis prefix."""

    launcher: Launcher
    database: str
    redis_url: str
    prefix: str
    users: Served
    replicas: list[Served] = field(default_factory=list)
    people: dict[str, Person] = field(default_factory=dict)
    in_process: bool = False
    chat_overrides: dict[str, str] = field(default_factory=dict)

    def chat_env(self, **overrides: str) -> dict[str, str]:
        settings = {**self.chat_overrides, **overrides}
        return chat_env(self.database, self.redis_url, self.prefix, self.users.target, **settings)

    async def add_replica(self, **overrides: str) -> Served:
        env = self.chat_env(**overrides)
        start = self.launcher.app if self.in_process else self.launcher.process
        replica = await start("chat", env)
        self.replicas.append(replica)
        return replica

    async def add_person(self, name: str) -> Person:
        person = (await create_people(self.users.target, [name]))[name]
        self.people[name] = person
        return person


async def start_stack(
    launcher: Launcher,
    database: str,
    redis_url: str,
    prefix: str,
    *,
    replicas: int = 2,
    people: Sequence[str] = ("Ada", "Grace"),
    in_process: bool = False,
    user_overrides: Mapping[str, str] | None = None,
    **overrides: str,
) -> Stack:
    """Starts a UserService (with `user_overrides` to its settings) and `replicas` chat
    replicas (child processes unless `in_process`, with `overrides`), waits until every
    replica has reached UserService, creates `people`."""
    user_env = service_env(database, **(user_overrides or {}))
    if in_process:
        users = await launcher.app("user", user_env)
    else:
        users = await launcher.process("user", user_env)
    stack = Stack(launcher, database, redis_url, prefix, users, [], {}, in_process, overrides)
    if in_process:
        for _ in range(replicas):
            await stack.add_replica()
    else:  # started together, listed in the order asked for
        env = stack.chat_env()
        stack.replicas = list(
            await asyncio.gather(*(launcher.process("chat", env) for _ in range(replicas)))
        )
    for replica in stack.replicas:
        await launcher.wait_ready(replica, name=USER_DEPENDENCY)
    stack.people = await create_people(users.target, people)
    return stack


@dataclass(frozen=True)
class StoredMessage:
    sequence: int
    user_id: int
    user_name: str
    text: str
    client_message_id: str


async def stored_messages(url: str, room: str) -> list[StoredMessage]:
    """A room's messages as Postgres holds them, by sequence."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT sequence, user_id, user_name, text, client_message_id FROM chat_messages"
            " WHERE room = %s ORDER BY sequence",
            (room,),
        )
        return [StoredMessage(*row) for row in await cur.fetchall()]


def check_conversation(
    rows: Sequence[StoredMessage],
    sent: Mapping[int, Sequence[str]],
    received: Mapping[str, Sequence[tuple[int, int, str, str]]],
) -> None:
    """Zero lost, zero duplicated, in order.

    `sent`: the client message ids each user (by id) sent; `received`: what each reader got,
    as (sequence, user_id, text, client_message_id). Every reader got every stored message
    exactly once, in sequence order, as stored; every sent id is stored exactly once."""
    sequences = [row.sequence for row in rows]
    assert sequences == list(range(1, len(rows) + 1)), f"stored sequences have gaps: {sequences}"
    truth = [(row.sequence, row.user_id, row.text, row.client_message_id) for row in rows]
    for name, got in received.items():
        got_sequences = [message[0] for message in got]
        missing = sorted(set(sequences) - set(got_sequences))
        twice = sorted({s for s in got_sequences if got_sequences.count(s) > 1})
        assert list(got) == truth, (
            f"{name}: {len(got)} messages for {len(rows)} stored; missing {missing[:20]}, "
            f"duplicated {twice[:20]}"
        )
    stored_ids = [(row.user_id, row.client_message_id) for row in rows if row.client_message_id]
    assert len(stored_ids) == len(set(stored_ids)), "a client message id was stored twice"
    for user_id, ids in sent.items():
        mine = {row.client_message_id for row in rows if row.user_id == user_id}
        lost = [cid for cid in ids if cid not in mine]
        assert not lost, f"{len(lost)} of {len(ids)} messages of user {user_id} lost: {lost[:5]}"
