-- A streaming reply is saved about once a second, and each save moves
-- updated_at (the heartbeat crash recovery reads): with updated_at indexed,
-- every save also rewrote its index entry. The sweep finds the few
-- streaming rows through this index and reads updated_at from them. (The
-- PostgreSQL migration of the same number also makes those saves HOT
-- updates.)
DROP INDEX IF EXISTS messages_streaming_updated;
CREATE INDEX messages_streaming ON messages (created_at) WHERE status = 'streaming';
