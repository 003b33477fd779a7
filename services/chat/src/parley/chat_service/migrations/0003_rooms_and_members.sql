-- Rooms as a resource: an owner, a title, who may read them (public, or private to their
-- members), and their members.
--
-- access_version changes with every change of who may read a room: visibility, membership,
-- deletion. It comes from one sequence for all rooms, so a room deleted and made again never
-- reuses a number. A change updates the room's row, which every message append also locks, so
-- a message stored after a change is always read together with the new version: that is how
-- a replica knows to check its streams' access before it delivers such a message.
CREATE SEQUENCE chat_access_versions;

ALTER TABLE chat_rooms
    ADD COLUMN title          text        NOT NULL DEFAULT '',
    ADD COLUMN private        boolean     NOT NULL DEFAULT false,
    ADD COLUMN owner_id       integer     NOT NULL DEFAULT 0,
    ADD COLUMN direct         boolean     NOT NULL DEFAULT false,
    ADD COLUMN create_time    timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN member_count   integer     NOT NULL DEFAULT 0,
    ADD COLUMN access_version bigint      NOT NULL DEFAULT nextval('chat_access_versions');

CREATE INDEX chat_rooms_owner ON chat_rooms (owner_id) WHERE owner_id <> 0;

CREATE TABLE chat_room_members (
    room      text        NOT NULL REFERENCES chat_rooms (name) ON DELETE CASCADE,
    user_id   integer     NOT NULL,
    join_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (room, user_id)
);

-- The rooms a user belongs to (ListRooms).
CREATE INDEX chat_room_members_user ON chat_room_members (user_id, room);

-- A deleted room takes its messages with it.
ALTER TABLE chat_messages
    DROP CONSTRAINT chat_messages_room_fkey,
    ADD CONSTRAINT chat_messages_room_fkey
        FOREIGN KEY (room) REFERENCES chat_rooms (name) ON DELETE CASCADE;
