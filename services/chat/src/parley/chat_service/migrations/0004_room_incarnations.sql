-- Which room a name stands for. A room deleted and made again under the same name (on first
-- use, say) is another room: its streams, held messages and resume points must never carry
-- over. room_id tells the two apart; like access_version it comes from the one sequence, so
-- it never repeats.
ALTER TABLE chat_rooms
    ADD COLUMN room_id bigint NOT NULL DEFAULT nextval('chat_access_versions');

CREATE UNIQUE INDEX chat_rooms_room_id ON chat_rooms (room_id);

-- Who made a room, whether by CreateRoom, on first use or by OpenDirectRoom: the rooms one
-- user may make count against PARLEY_CHAT_MAX_ROOMS_PER_USER, however they were made.
ALTER TABLE chat_rooms
    ADD COLUMN creator_id integer NOT NULL DEFAULT 0;

UPDATE chat_rooms SET creator_id = owner_id WHERE owner_id <> 0;

CREATE INDEX chat_rooms_creator ON chat_rooms (creator_id) WHERE creator_id <> 0;
