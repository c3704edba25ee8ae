-- A streaming reply is saved about once a second (its text, its event
-- boundaries and updated_at, the heartbeat crash recovery reads). With
-- updated_at indexed, every save was a non-HOT update: a new entry in each of
-- the table's indexes, the old version left for VACUUM, the whole new row in
-- the WAL. Nothing indexes a column such a save changes now — the sweep finds
-- the few streaming rows through this index and reads updated_at from them —
-- and pages keep room for the next version of a growing row, so a save is a
-- HOT update within its page (measured with 5,000 live replies growing to
-- 2.3 KB: 86 % of saves HOT, 21 % less WAL, the table 32 MB instead of 183 MB
-- of mostly dead versions; BENCHMARKS.md). The price: pages of completed
-- history are filled to 70 %.
-- The index is built with a lock that blocks writes while the table is
-- scanned once (README "Upgrades and migrations").
DROP INDEX IF EXISTS messages_streaming_updated;
CREATE INDEX messages_streaming ON messages (created_at) WHERE status = 'streaming';
ALTER TABLE messages SET (fillfactor = 70);
