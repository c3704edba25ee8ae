-- An idempotency claim names the reply of the turn that holds it. An
-- unanswered claim used to count as abandoned 120 s after it was made, so a
-- retry of a turn that simply ran longer (a long reply, a final write held
-- back by an outage) ran the turn a second time. Now it is abandoned only when
-- its reply is no longer alive too (not `streaming`, or not saved for 120 s:
-- a live turn's reply is saved every few seconds), and a turn's final write
-- and release touch only the claim it holds. Claims made before this
-- migration (NULL) keep the old rule. Adding a nullable column rewrites
-- nothing; instances of the previous release keep working on this schema.
ALTER TABLE idempotency_keys ADD COLUMN message_id BLOB;
