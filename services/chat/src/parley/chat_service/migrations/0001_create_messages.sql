-- Rooms hold the sequence counter: a message takes the next number in the same
-- transaction that stores it, so numbers are strictly increasing with no gaps.
CREATE TABLE chat_rooms (
    name          text   PRIMARY KEY,
    last_sequence bigint NOT NULL DEFAULT 0
);

CREATE TABLE chat_messages (
    room              text        NOT NULL REFERENCES chat_rooms (name),
    sequence          bigint      NOT NULL,
    user_id           integer     NOT NULL,
    user_name         text        NOT NULL,
    text              text        NOT NULL,
    client_message_id text        NOT NULL DEFAULT '',
    create_time       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (room, sequence)
);

-- A resent message (same sender, room and client id) is stored once.
CREATE UNIQUE INDEX chat_messages_client_id_key
    ON chat_messages (room, user_id, client_message_id)
    WHERE client_message_id <> '';
