"""Rooms and their members in Postgres: who owns a room, who may read it, who belongs to it.

Postgres holds the truth about access. Every change of who may read a room (visibility,
membership, deletion) takes a new `access_version` in the same transaction, on the room's row,
which every message append also locks: a message stored after the change is read together
with the new version (see the 0003 migration and RoomHub's access checks).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import errors as pg_errors

from parley.chassis import Database

__all__ = ["Access", "MemberRow", "RoomRow", "RoomStore", "direct_room_name"]

DIRECT_PREFIX = "dm-"

_ROOM_COLUMNS = "name, title, private, owner_id, direct, create_time, member_count"
_IS_MEMBER = (
    "EXISTS (SELECT FROM chat_room_members m WHERE m.room = r.name AND m.user_id = %(user_id)s)"
)
_CAN_READ = f"(NOT r.private OR {_IS_MEMBER})"


def direct_room_name(a: int, b: int) -> str:
    """The one name of the direct room of two users, whoever opens it."""
    low, high = sorted((a, b))
    return f"{DIRECT_PREFIX}{low}-{high}"


@dataclass(frozen=True)
class RoomRow:
    name: str
    title: str
    private: bool
    owner_id: int
    direct: bool
    create_time: datetime
    member_count: int


@dataclass(frozen=True)
class MemberRow:
    user_id: int
    join_time: datetime
    owner: bool


@dataclass(frozen=True)
class Access:
    """What one user may do with one room, as of `version`."""

    exists: bool
    private: bool
    member: bool
    owner_id: int
    direct: bool
    version: int
    last_sequence: int
    room_id: int = 0  # which room the name stands for (see the 0004 migration)
    quota_spent: bool = False  # missing, and not made: the user may make no more rooms

    @property
    def readable(self) -> bool:
        return self.exists and (not self.private or self.member)


_NO_ROOM = Access(False, False, False, 0, False, 0, 0, 0)
_QUOTA_SPENT = Access(False, False, False, 0, False, 0, 0, 0, quota_spent=True)


def _room(row: tuple[Any, ...]) -> RoomRow:
    return RoomRow(*row[:7])


# Makes a room on first use, unless its maker has made `max` rooms already. Another maker at
# the same moment may overshoot the count by one room each: a bound, not an exact quota.
# Makes a room on first use, unless its maker has made `max` rooms already (counted up to
# `max` only). Returns whether the maker was under the quota; makers at the same moment may
# each overshoot it by one room.
_MAKE_ON_FIRST_USE = """
WITH allowed AS (
    SELECT count(*) < %(max)s AS ok FROM (
        SELECT FROM chat_rooms WHERE creator_id = %(user_id)s LIMIT %(max)s
    ) AS made
), made AS (
    INSERT INTO chat_rooms (name, creator_id)
    SELECT %(room)s, %(user_id)s FROM allowed WHERE ok
    ON CONFLICT (name) DO NOTHING
)
SELECT ok FROM allowed
"""


class RoomStore:
    def __init__(self, db: Database, *, max_rooms_per_user: int) -> None:
        self._db = db
        self._max_rooms = max_rooms_per_user

    async def access(
        self, room: str, user_id: int, *, create: bool, timeout: float | None = None
    ) -> Access:
        """The user's access to `room`; with `create`, a missing room is made first (public,
        no owner, counted as one of the user's), unless its name belongs to direct rooms or
        the user has made PARLEY_CHAT_MAX_ROOMS_PER_USER rooms (then it stays missing)."""
        create = create and not room.startswith(DIRECT_PREFIX)
        query = (
            f"SELECT r.private, {_IS_MEMBER}, r.owner_id,"
            " r.direct, r.access_version, r.last_sequence, r.room_id"
            " FROM chat_rooms r WHERE r.name = %(room)s"
        )
        params = {"room": room, "user_id": user_id, "max": self._max_rooms}
        async with self._db.connection(timeout) as conn:
            cur = await conn.execute(query, params)
            row = await cur.fetchone()
            if row is None and create:  # made only when missing: a join costs one read
                cur = await conn.execute(_MAKE_ON_FIRST_USE, params)
                allowed = await cur.fetchone()
                if allowed is None or not allowed[0]:
                    return _QUOTA_SPENT
                cur = await conn.execute(query, params)
                row = await cur.fetchone()
        if row is None:
            return _NO_ROOM
        return Access(
            True, bool(row[0]), bool(row[1]), row[2], bool(row[3]), row[4], row[5], row[6]
        )

    async def readers(self, room: str, user_ids: list[int]) -> tuple[int, int, set[int]] | None:
        """Which room the name stands for, its access version, and which of `user_ids` may
        read it; None when there is no such room. One statement, so one snapshot."""
        async with self._db.connection() as conn:
            cur = await conn.execute(
                "SELECT r.room_id, r.access_version, CASE WHEN r.private THEN"
                " (SELECT coalesce(array_agg(m.user_id), '{}') FROM chat_room_members m"
                "  WHERE m.room = r.name AND m.user_id = ANY(%(users)s::integer[]))"
                " ELSE %(users)s::integer[] END"
                " FROM chat_rooms r WHERE r.name = %(room)s",
                {"room": room, "users": user_ids},
            )
            row = await cur.fetchone()
        if row is None:
            return None
        return int(row[0]), int(row[1]), set(row[2])

    async def versions(self, rooms: list[str]) -> dict[str, tuple[int, int]]:
        """Which room each of `rooms` that exists stands for, and its access version."""
        async with self._db.connection() as conn:
            cur = await conn.execute(
                "SELECT name, room_id, access_version FROM chat_rooms WHERE name = ANY(%s)",
                (rooms,),
            )
            return {name: (int(rid), int(version)) for name, rid, version in await cur.fetchall()}

    async def create(self, name: str, title: str, private: bool, owner_id: int) -> RoomRow | None:
        """A new room owned (and joined) by `owner_id`; None when the owner has made
        PARLEY_CHAT_MAX_ROOMS_PER_USER rooms already. Raises UniqueViolation when the name is
        taken."""
        async with self._db.connection() as conn, conn.transaction():
            # Serialises one user's CreateRoom calls, so the count below is not raced past.
            await conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (0x524F, owner_id))
            if not await self._may_make(conn, owner_id):
                return None
            cur = await conn.execute(
                "INSERT INTO chat_rooms (name, title, private, owner_id, creator_id, member_count)"
                f" VALUES (%s, %s, %s, %s, %s, 1) RETURNING {_ROOM_COLUMNS}",
                (name, title, private, owner_id, owner_id),
            )
            row = await cur.fetchone()
            assert row is not None
            await conn.execute(
                "INSERT INTO chat_room_members (room, user_id) VALUES (%s, %s)", (name, owner_id)
            )
        return _room(row)

    async def _may_make(self, conn: Any, user_id: int) -> bool:
        cur = await conn.execute(
            "SELECT count(*) FROM (SELECT FROM chat_rooms WHERE creator_id = %s LIMIT %s) AS m",
            (user_id, self._max_rooms),
        )
        made = await cur.fetchone()
        return made is None or int(made[0]) < self._max_rooms

    async def get(self, name: str) -> RoomRow | None:
        async with self._db.connection() as conn:
            cur = await conn.execute(
                f"SELECT {_ROOM_COLUMNS} FROM chat_rooms WHERE name = %s", (name,)
            )
            row = await cur.fetchone()
        return None if row is None else _room(row)

    async def visible(self, user_id: int, after: str, limit: int) -> list[RoomRow]:
        """Up to `limit` rooms named after `after` that `user_id` may read, by name."""
        async with self._db.connection() as conn:
            cur = await conn.execute(
                f"SELECT {_ROOM_COLUMNS} FROM chat_rooms r"
                f" WHERE r.name > %(after)s AND {_CAN_READ} ORDER BY r.name LIMIT %(limit)s",
                {"after": after, "user_id": user_id, "limit": limit},
            )
            return [_room(row) for row in await cur.fetchall()]

    async def update(
        self, name: str, owner_id: int, *, title: str | None, private: bool | None
    ) -> RoomRow | None:
        """Changes the room if `owner_id` owns it; None otherwise. Making a room private takes
        a new access version (its streams are checked again)."""
        async with self._db.connection() as conn:
            cur = await conn.execute(
                "UPDATE chat_rooms SET title = coalesce(%(title)s, title),"
                " private = coalesce(%(private)s, private),"
                " access_version = CASE WHEN %(private)s AND NOT private"
                "  THEN nextval('chat_access_versions') ELSE access_version END"
                f" WHERE name = %(name)s AND owner_id = %(owner)s RETURNING {_ROOM_COLUMNS}",
                {"title": title, "private": private, "name": name, "owner": owner_id},
            )
            row = await cur.fetchone()
        return None if row is None else _room(row)

    async def delete(self, name: str, owner_id: int) -> bool:
        """Deletes the room and its messages and members, if `owner_id` owns it (0: a room
        without an owner that is not direct, as a chat:admin may)."""
        async with self._db.connection() as conn:
            cur = await conn.execute(
                "DELETE FROM chat_rooms WHERE name = %s AND owner_id = %s"
                " AND NOT (owner_id = 0 AND direct) RETURNING name",
                (name, owner_id),
            )
            return await cur.fetchone() is not None

    async def add_member(
        self, room: str, user_id: int, *, max_members: int
    ) -> tuple[MemberRow, bool] | None:
        """Makes `user_id` a member; returns the membership and whether it is new, or None
        when the room already has `max_members`. The caller has checked the room exists and
        is not direct."""
        async with self._db.connection() as conn, conn.transaction():
            cur = await conn.execute(
                "SELECT member_count, owner_id FROM chat_rooms WHERE name = %s FOR UPDATE",
                (room,),
            )
            locked = await cur.fetchone()
            if locked is None:
                raise LookupError(room)
            count, owner_id = locked
            cur = await conn.execute(
                "SELECT join_time FROM chat_room_members WHERE room = %s AND user_id = %s",
                (room, user_id),
            )
            existing = await cur.fetchone()
            if existing is not None:
                return MemberRow(user_id, existing[0], user_id == owner_id), False
            if count >= max_members:
                return None
            cur = await conn.execute(
                "INSERT INTO chat_room_members (room, user_id) VALUES (%s, %s) RETURNING join_time",
                (room, user_id),
            )
            joined = await cur.fetchone()
            assert joined is not None
            await conn.execute(
                "UPDATE chat_rooms SET member_count = member_count + 1 WHERE name = %s", (room,)
            )
        return MemberRow(user_id, joined[0], user_id == owner_id), True

    async def remove_member(self, room: str, user_id: int) -> bool:
        """Ends the membership, with a new access version; False when there was none."""
        async with self._db.connection() as conn, conn.transaction():
            cur = await conn.execute(
                "DELETE FROM chat_room_members WHERE room = %s AND user_id = %s RETURNING 1",
                (room, user_id),
            )
            if await cur.fetchone() is None:
                return False
            await conn.execute(
                "UPDATE chat_rooms SET member_count = member_count - 1,"
                " access_version = nextval('chat_access_versions') WHERE name = %s",
                (room,),
            )
        return True

    async def members(self, room: str, after: int, limit: int) -> list[MemberRow]:
        async with self._db.connection() as conn:
            cur = await conn.execute(
                "SELECT m.user_id, m.join_time, m.user_id = r.owner_id"
                " FROM chat_room_members m JOIN chat_rooms r ON r.name = m.room"
                " WHERE m.room = %s AND m.user_id > %s ORDER BY m.user_id LIMIT %s",
                (room, after, limit),
            )
            return [MemberRow(*row) for row in await cur.fetchall()]

    async def open_direct(self, a: int, b: int) -> RoomRow | None:
        """The direct room of users `a` and `b`, made on first use (one of `a`'s rooms);
        None when `a` may make no more rooms. Raises LookupError when its name is held by a
        room that is not direct."""
        name = direct_room_name(a, b)
        async with self._db.connection() as conn:
            for _ in range(2):
                cur = await conn.execute(
                    f"SELECT {_ROOM_COLUMNS} FROM chat_rooms WHERE name = %s", (name,)
                )
                row = await cur.fetchone()
                if row is not None:
                    found = _room(row)
                    if not found.direct:
                        raise LookupError(name)
                    return found
                if not await self._may_make(conn, a):
                    return None
                try:
                    async with conn.transaction():
                        cur = await conn.execute(
                            "INSERT INTO chat_rooms"
                            " (name, private, direct, member_count, creator_id)"
                            f" VALUES (%s, true, true, 2, %s) RETURNING {_ROOM_COLUMNS}",
                            (name, a),
                        )
                        created = await cur.fetchone()
                        assert created is not None
                        await conn.execute(
                            "INSERT INTO chat_room_members (room, user_id)"
                            " VALUES (%s, %s), (%s, %s)",
                            (name, a, name, b),
                        )
                    return _room(created)
                except pg_errors.UniqueViolation:
                    continue  # opened at the same moment by the other user: read theirs
        raise RuntimeError(f"direct room {name} could neither be read nor made")
