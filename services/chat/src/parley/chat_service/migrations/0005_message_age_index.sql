-- parley:no-transaction
-- History retention (retention.py) finds the messages older than PARLEY_CHAT_RETENTION_MAX_AGE
-- by this index, reading only the expired rows rather than every room. Built concurrently:
-- sends (INSERTs into chat_messages) go on while it builds. A build that fails (the migrator
-- stopped, a deadlock) leaves the index INVALID; the runner drops it and builds it again on
-- its next run, and records this migration only once the build succeeded.
CREATE INDEX CONCURRENTLY IF NOT EXISTS chat_messages_create_time ON chat_messages (create_time);
