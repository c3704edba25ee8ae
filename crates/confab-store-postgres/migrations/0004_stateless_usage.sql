-- The OpenAI-compatible API (SPEC §13) runs turns that store no chat; they
-- are counted in the ledger all the same. A ledger row is now keyed by its
-- turn: the assistant message's id when the turn is stored in a chat (so a
-- stored turn is still counted exactly once), a fresh id when it is not
-- (chat_id NULL).
ALTER TABLE usage_ledger DROP CONSTRAINT IF EXISTS usage_ledger_message_id_fkey;
ALTER TABLE usage_ledger RENAME COLUMN message_id TO turn_id;
ALTER TABLE usage_ledger ALTER COLUMN chat_id DROP NOT NULL;
