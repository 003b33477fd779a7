-- History retention (retention.py) finds the messages older than PARLEY_CHAT_RETENTION_MAX_AGE
-- by this index, reading only the expired rows rather than every room. Built inside the
-- migration's transaction, so writes to chat_messages wait while it builds (seconds per few
-- million rows). On a large table, build it first without blocking writers, and this
-- migration then does nothing:
--   CREATE INDEX CONCURRENTLY IF NOT EXISTS chat_messages_create_time
--       ON chat_messages (create_time);
CREATE INDEX IF NOT EXISTS chat_messages_create_time ON chat_messages (create_time);
