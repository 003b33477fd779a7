"""A model of rooms and memberships that predicts every access decision of the chat service.

A hypothesis state machine drives real `parley-chat serve` processes (two replicas sharing one
database and Redis) through random sequences of room operations, each by a random person, with
or without the `chat:admin` scope: CreateRoom, UpdateRoom, DeleteRoom, AddMember, RemoveMember
(leaving included), OpenDirectRoom and a message sent over StreamChat (which creates a missing
room on first use). A plain Python model of the rooms says what each call must answer, to the
status code. After every step every person's reads of the room it touched are checked against
the model (GetRoom with the room's fields, ListMembers with the member set through pages,
ListMessages with the number of messages, ListPresence's code), and so is every person's
ListRooms (exactly the public rooms and those the person belongs to); at the end of each
example, every person's reads of every room.

Each example makes people of its own in UserService and names its rooms with a prefix of its
own, so direct rooms (`dm-<id>-<id>`) and the rooms of other examples never get in the way; the
state machine is synchronous, so it runs on a worker thread with a synchronous gRPC client.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from parley.proto import chat_pb2, chat_pb2_grpc, user_pb2, user_pb2_grpc
from parley.proto.contract import ROOM_KEY
from parley.testing import bearer, make_token
from parley.testing.launcher import JWT_SECRET
from parley.testing.plugin import MakeStack

OK = grpc.StatusCode.OK
DENIED = grpc.StatusCode.PERMISSION_DENIED
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXISTS = grpc.StatusCode.ALREADY_EXISTS
INVALID = grpc.StatusCode.INVALID_ARGUMENT
PUBLIC, PRIVATE = chat_pb2.Room.PUBLIC, chat_pb2.Room.PRIVATE
UNSPECIFIED = chat_pb2.Room.VISIBILITY_UNSPECIFIED
CALL_TIMEOUT = 10.0

PEOPLE = 3  # person indexes 0..2; index PEOPLE stands for a user id UserService does not have
GHOST = PEOPLE
GHOST_ID = 2**31 - 1
ROOMS = ("r0", "r1", "r2")  # room slots, named `<example prefix><slot>`
DIRECT = tuple(f"dm{a}{b}" for a, b in itertools.combinations(range(PEOPLE), 2))
SLOTS = ROOMS + DIRECT

people_ = st.integers(0, PEOPLE - 1)
# Who acts on a room: a person, or ("owner") the room's owner when it has one, else person 0;
# without the bias, random people rarely own the room they pick.
actors = st.one_of(st.just("owner"), people_)
targets = st.integers(0, PEOPLE)  # a person, or the ghost
# Half the time one of the rooms CreateRoom and StreamChat can make, else any room, direct
# ones included.
slots = st.one_of(st.sampled_from(ROOMS), st.sampled_from(SLOTS))
new_slots = st.sampled_from(ROOMS * 3 + DIRECT[:1])  # now and then a name CreateRoom refuses
replicas = st.integers(0, 1)
visibilities = st.sampled_from([UNSPECIFIED, PUBLIC, PRIVATE])
titles = st.sampled_from(["", "Room one", "déjà vu"])


@dataclass
class RoomModel:
    private: bool
    owner: int | None  # a person index; None for rooms made on first use and direct rooms
    members: set[int] = field(default_factory=set)
    direct: bool = False
    title: str = ""
    messages: int = 0

    def readable(self, person: int) -> bool:
        return not self.private or person in self.members


@dataclass(frozen=True)
class Servers:
    user: str
    chat: tuple[str, ...]


class RoomMachine(RuleBasedStateMachine):
    def __init__(self, servers: Servers, stats: dict[str, int], outcomes: Counter[str]) -> None:
        super().__init__()
        self.stats = stats
        self.outcomes = outcomes
        self.channels = [grpc.insecure_channel(target) for target in (servers.user, *servers.chat)]
        users = user_pb2_grpc.UserServiceStub(self.channels[0])
        self.stubs = [chat_pb2_grpc.ChatServiceStub(channel) for channel in self.channels[1:]]
        self.prefix = f"m{uuid.uuid4().hex[:8]}-"
        admin = bearer(make_token(JWT_SECRET, "admin", "users:write"))
        self.ids: list[int] = []
        for index in range(PEOPLE):
            reply = users.CreateUser(
                user_pb2.CreateUserRequest(
                    name=f"P{index}", email=f"p{index}.{uuid.uuid4().hex}@example.com", age=30
                ),
                metadata=admin,
                timeout=CALL_TIMEOUT,
            )
            self.ids.append(reply.user.id)
        self.tokens = [make_token(JWT_SECRET, str(user_id)) for user_id in self.ids]
        self.admin_tokens = [make_token(JWT_SECRET, str(i), "chat:admin") for i in self.ids]
        self.rooms: dict[str, RoomModel] = {}
        self.client_ids = itertools.count(1)
        self.calls = 0
        self.checks = 0
        self.lock = threading.Lock()
        # Each person's reads run side by side: the checks are most of the calls.
        self.pool = ThreadPoolExecutor(PEOPLE, thread_name_prefix="room-model")

    def teardown(self) -> None:
        try:
            for slot in SLOTS:
                self.check_slot(slot)
        finally:
            self.pool.shutdown()
            for channel in self.channels:
                channel.close()
            self.stats["examples"] += 1
            self.stats["calls"] += self.calls

    # --- Names, tokens and calls ----------------------------------------------------------

    def name(self, slot: str) -> str:
        if slot in DIRECT:
            low, high = sorted((self.ids[int(slot[2])], self.ids[int(slot[3])]))
            return f"dm-{low}-{high}"
        return self.prefix + slot

    def user_id(self, person: int) -> int:
        return GHOST_ID if person == GHOST else self.ids[person]

    def owner_id(self, room: RoomModel) -> int:
        return 0 if room.owner is None else self.ids[room.owner]

    def token(self, person: int, admin: bool = False) -> str:
        return (self.admin_tokens if admin else self.tokens)[person]

    def call(
        self, replica: int, method: str, request: Any, person: int, admin: bool = False
    ) -> tuple[grpc.StatusCode, Any]:
        with self.lock:
            self.calls += 1
        rpc: Callable[..., Any] = getattr(self.stubs[replica], method)
        try:
            return OK, rpc(
                request, metadata=bearer(self.token(person, admin)), timeout=CALL_TIMEOUT
            )
        except grpc.RpcError as error:
            return error.code(), None

    def expect(self, what: str, got: grpc.StatusCode | str, expected: grpc.StatusCode) -> None:
        with self.lock:
            self.outcomes[f"{what.split()[0]} {expected.name}"] += 1
        assert got == expected, f"{what}: expected {expected.name}, got {got.name}; {self.state()}"

    def state(self) -> str:
        rooms = {
            self.name(slot): (
                "private" if room.private else "public",
                f"owner={room.owner}",
                f"members={sorted(room.members)}",
                "direct" if room.direct else "",
                f"messages={room.messages}",
            )
            for slot, room in self.rooms.items()
        }
        return f"people {self.ids} (person i is ids[i]), model {rooms}"

    def resolve(self, actor: int | str, slot: str) -> int:
        if actor != "owner":
            assert isinstance(actor, int)
            return actor
        room = self.rooms.get(slot)
        return 0 if room is None or room.owner is None else room.owner

    def member_request_code(
        self, slot: str, actor: int, admin: bool, *, leaving: bool
    ) -> grpc.StatusCode | None:
        """The refusal of an AddMember/RemoveMember before its target is looked at, if any."""
        room = self.rooms.get(slot)
        if room is None:
            return NOT_FOUND if admin else DENIED
        if not (admin or room.owner == actor or (leaving and room.readable(actor))):
            return DENIED
        if room.direct:
            return PRECONDITION
        return None

    # --- Rules: every change, with the status the model predicts ---------------------------

    @initialize(replica=replicas, actor=people_, visibility=visibilities)
    def a_first_room(self, replica: int, actor: int, visibility: int) -> None:
        self.create_room(replica, actor, ROOMS[0], visibility, "")

    @initialize(replica=replicas, actor=people_, visibility=visibilities)
    def a_second_room(self, replica: int, actor: int, visibility: int) -> None:
        self.create_room(replica, actor, ROOMS[1], visibility, "")

    @rule(replica=replicas, actor=people_, slot=new_slots, visibility=visibilities, title=titles)
    def create_room(self, replica: int, actor: int, slot: str, visibility: int, title: str) -> None:
        name = self.name(slot)
        code, room = self.call(
            replica,
            "CreateRoom",
            chat_pb2.CreateRoomRequest(name=name, title=title, visibility=visibility),
            actor,
        )
        if slot in DIRECT:
            expected = INVALID  # names starting with dm- are direct rooms'
        elif slot in self.rooms:
            expected = EXISTS
        else:
            expected = OK
            self.rooms[slot] = RoomModel(
                private=visibility == PRIVATE, owner=actor, members={actor}, title=title
            )
        self.expect(f"CreateRoom {name} by person {actor}", code, expected)
        if code == OK:
            self.check_room_message(slot, room)
        self.check_slot(slot)

    @rule(replica=replicas, actor=actors, slot=slots)
    def send_message(self, replica: int, actor: int | str, slot: str) -> None:
        actor = self.resolve(actor, slot)
        name = self.name(slot)
        client_id = f"c{next(self.client_ids)}"
        code, echo = self.stream(replica, actor, name, client_id)
        room = self.rooms.get(slot)
        if room is None and slot not in DIRECT:  # made on first use: public, no owner
            room = self.rooms[slot] = RoomModel(private=False, owner=None)
        if room is not None and room.readable(actor):
            expected = OK
            room.messages += 1
        else:
            expected = DENIED
        self.expect(f"StreamChat in {name} by person {actor}", code, expected)
        if code == OK:
            assert room is not None
            assert (echo.room, echo.sequence, echo.user_id) == (
                name,
                room.messages,
                self.ids[actor],
            ), f"echo {echo} in {name}; {self.state()}"
        self.check_slot(slot)

    def stream(
        self, replica: int, actor: int, name: str, client_id: str
    ) -> tuple[grpc.StatusCode | str, Any]:
        """Sends one message over a new stream: OK and its echo, or the status it ended with."""
        self.calls += 1
        call = self.stubs[replica].StreamChat(
            iter([chat_pb2.ChatMessage(text="hello", client_message_id=client_id)]),
            metadata=[*bearer(self.token(actor)), (ROOM_KEY, name)],
            timeout=CALL_TIMEOUT,
        )
        try:
            for reply in call:
                if reply.client_message_id == client_id and reply.user_id == self.ids[actor]:
                    return OK, reply
            return f"the stream ended with {call.code()} before the echo", None
        except grpc.RpcError as error:
            return error.code(), None
        finally:
            call.cancel()

    @rule(
        replica=replicas,
        actor=actors,
        slot=slots,
        visibility=visibilities,
        title=st.none() | titles,
    )
    def update_room(
        self, replica: int, actor: int | str, slot: str, visibility: int, title: str | None
    ) -> None:
        actor = self.resolve(actor, slot)
        name = self.name(slot)
        request = chat_pb2.UpdateRoomRequest(name=name, visibility=visibility)
        if title is not None:
            request.title = title
        code, reply = self.call(replica, "UpdateRoom", request, actor)
        room = self.rooms.get(slot)
        if room is not None and room.readable(actor) and room.owner == actor:
            expected = OK
            if visibility != UNSPECIFIED:
                room.private = visibility == PRIVATE
            if title is not None:
                room.title = title
        else:
            expected = DENIED
        self.expect(f"UpdateRoom {name} by person {actor}", code, expected)
        if code == OK:
            self.check_room_message(slot, reply)
        self.check_slot(slot)

    @rule(replica=replicas, actor=actors, slot=slots)
    def delete_room(self, replica: int, actor: int | str, slot: str) -> None:
        actor = self.resolve(actor, slot)
        name = self.name(slot)
        code, _ = self.call(replica, "DeleteRoom", chat_pb2.DeleteRoomRequest(name=name), actor)
        room = self.rooms.get(slot)
        if room is not None and room.readable(actor) and room.owner == actor:
            expected = OK
            del self.rooms[slot]
        else:
            expected = DENIED
        self.expect(f"DeleteRoom {name} by person {actor}", code, expected)
        self.check_slot(slot)

    @rule(replica=replicas, actor=actors, admin=st.booleans(), slot=slots, who=targets)
    def add_member(self, replica: int, actor: int | str, admin: bool, slot: str, who: int) -> None:
        actor = self.resolve(actor, slot)
        name = self.name(slot)
        code, reply = self.call(
            replica,
            "AddMember",
            chat_pb2.AddMemberRequest(room=name, user_id=self.user_id(who)),
            actor,
            admin,
        )
        expected = self.member_request_code(slot, actor, admin, leaving=False)
        if expected is None:
            if who == GHOST:
                expected = NOT_FOUND
            else:
                expected = OK
                self.rooms[slot].members.add(who)
        self.expect(
            f"AddMember {name} person {who} by person {actor}{' (admin)' * admin}",
            code,
            expected,
        )
        if code == OK:
            room = self.rooms[slot]
            assert (reply.member.user_id, reply.member.owner) == (
                self.ids[who],
                room.owner == who,
            ), f"AddMember answered {reply}; {self.state()}"
        self.check_slot(slot)

    @rule(
        replica=replicas,
        actor=actors,
        admin=st.booleans(),
        slot=slots,
        who=st.none() | targets,
        by_id=st.booleans(),
    )
    def remove_member(
        self,
        replica: int,
        actor: int | str,
        admin: bool,
        slot: str,
        who: int | None,
        by_id: bool,
    ) -> None:
        """Removes `who`; None is the actor leaving, by user id 0 or (`by_id`) by their id."""
        actor = self.resolve(actor, slot)
        name = self.name(slot)
        removed = actor if who is None else who
        user_id = self.ids[actor] if who is None and by_id else 0
        if who is not None:
            user_id = self.user_id(who)
        code, _ = self.call(
            replica,
            "RemoveMember",
            chat_pb2.RemoveMemberRequest(room=name, user_id=user_id),
            actor,
            admin,
        )
        expected = self.member_request_code(slot, actor, admin, leaving=removed == actor)
        if expected is None:
            room = self.rooms[slot]
            if removed == room.owner:
                expected = PRECONDITION  # the owner cannot leave
            else:
                expected = OK
                room.members.discard(removed)
        self.expect(
            f"RemoveMember {name} person {removed} (user_id={user_id}) by person {actor}"
            f"{' (admin)' * admin}",
            code,
            expected,
        )
        self.check_slot(slot)

    @rule(replica=replicas, actor=people_, other=targets)
    def open_direct_room(self, replica: int, actor: int, other: int) -> None:
        code, room = self.call(
            replica,
            "OpenDirectRoom",
            chat_pb2.OpenDirectRoomRequest(user_id=self.user_id(other)),
            actor,
        )
        slot = None
        if other == actor:
            expected = INVALID
        elif other == GHOST:
            expected = NOT_FOUND
        else:
            expected = OK
            low, high = sorted((actor, other))
            slot = f"dm{low}{high}"
            self.rooms.setdefault(
                slot, RoomModel(private=True, owner=None, members={low, high}, direct=True)
            )
        self.expect(f"OpenDirectRoom with person {other} by person {actor}", code, expected)
        if slot is not None:
            self.check_room_message(slot, room)
            self.check_slot(slot)

    # --- Reads: every person's view of a room, and of the rooms ----------------------------

    def check_room_message(self, slot: str, message: chat_pb2.Room) -> None:
        room = self.rooms[slot]
        got = (
            message.name,
            message.title,
            message.visibility,
            message.owner_id,
            message.member_count,
            message.direct,
        )
        want = (
            self.name(slot),
            room.title,
            PRIVATE if room.private else PUBLIC,
            self.owner_id(room),
            len(room.members),
            room.direct,
        )
        assert got == want, f"room {got}, expected {want}; {self.state()}"

    def each_person(self, check: Callable[[int], None]) -> None:
        for future in [self.pool.submit(check, person) for person in range(PEOPLE)]:
            future.result()

    def check_slot(self, slot: str) -> None:
        """Every person's reads of one room: the codes, and what they return."""
        self.checks += 1
        self.each_person(lambda person: self.check_reads(slot, person))

    def check_reads(self, slot: str, person: int) -> None:
        name = self.name(slot)
        room = self.rooms.get(slot)
        replica = (person + self.checks) % 2  # each person asks each replica in turn
        readable = room is not None and room.readable(person)
        who = f"in {name} by person {person}"

        code, reply = self.call(replica, "GetRoom", chat_pb2.GetRoomRequest(name=name), person)
        self.expect(f"GetRoom {who}", code, OK if readable else DENIED)
        if readable:
            self.check_room_message(slot, reply)

        code, members = self.members(replica, name, person)
        self.expect(f"ListMembers {who}", code, OK if readable else DENIED)
        if readable:
            assert room is not None
            want = [
                (self.ids[p], p == room.owner)
                for p in sorted(room.members, key=lambda p: self.ids[p])
            ]
            assert members == want, f"ListMembers {who}: {members}, not {want}; {self.state()}"

        # Not made yet: empty until first use, except a direct room's name.
        listed = readable or (room is None and slot not in DIRECT)
        code, page = self.call(
            replica, "ListMessages", chat_pb2.ListMessagesRequest(room=name), person
        )
        self.expect(f"ListMessages {who}", code, OK if listed else DENIED)
        if code == OK:
            count = 0 if room is None else room.messages
            assert (page.last_sequence, [m.sequence for m in page.messages]) == (
                count,
                list(range(1, count + 1)),
            ), f"ListMessages {who}: {page}; {self.state()}"

        code, _ = self.call(
            replica, "ListPresence", chat_pb2.ListPresenceRequest(room=name), person
        )
        self.expect(f"ListPresence {who}", code, OK if listed else DENIED)

    def members(self, replica: int, name: str, person: int) -> tuple[grpc.StatusCode, Any]:
        """ListMembers, two to a page: [(user_id, owner)], or the status it failed with."""
        found: list[tuple[int, bool]] = []
        token = ""
        while True:
            code, page = self.call(
                replica,
                "ListMembers",
                chat_pb2.ListMembersRequest(room=name, page_size=2, page_token=token),
                person,
            )
            if code != OK:
                return code, None
            found.extend((m.user_id, m.owner) for m in page.members)
            token = page.next_page_token
            if not token:
                return OK, found

    @invariant()
    def every_person_lists_the_rooms_they_may_read(self) -> None:
        self.each_person(self.check_listed)

    def check_listed(self, person: int) -> None:
        listed: dict[str, chat_pb2.Room] = {}
        token = ""
        while True:
            code, page = self.call(
                person % 2,
                "ListRooms",
                chat_pb2.ListRoomsRequest(page_size=500, page_token=token),
                person,
            )
            self.expect(f"ListRooms by person {person}", code, OK)
            for room in page.rooms:
                # Other examples' rooms are not in the model. A direct room a person of
                # this example may read is one of theirs: the people are new.
                if room.name.startswith((self.prefix, "dm-")):
                    listed[room.name] = room
            token = page.next_page_token
            if not token:
                break
        want = {self.name(slot): slot for slot, room in self.rooms.items() if room.readable(person)}
        assert sorted(listed) == sorted(want), (
            f"ListRooms by person {person}: {sorted(listed)}, expected {sorted(want)}; "
            f"{self.state()}"
        )
        for name, slot in want.items():
            self.check_room_message(slot, listed[name])


async def test_a_model_of_rooms_predicts_every_access_decision(make_stack: MakeStack) -> None:
    stack = await make_stack(replicas=2, people=(), in_process=False)
    servers = Servers(stack.users.target, tuple(r.target for r in stack.replicas))
    stats = {"examples": 0, "calls": 0}
    outcomes: Counter[str] = Counter()

    started = time.monotonic()
    await asyncio.to_thread(
        run_state_machine_as_test,
        lambda: RoomMachine(servers, stats, outcomes),
        settings=settings(
            max_examples=25,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
    took = time.monotonic() - started
    print(f"{stats['examples']} examples, {stats['calls']} calls in {took:.1f}s")
    print("  ".join(f"{key}: {count}" for key, count in sorted(outcomes.items())))
