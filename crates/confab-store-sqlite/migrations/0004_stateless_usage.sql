-- The OpenAI-compatible API (SPEC §13) runs turns that store no chat; they
-- are counted in the ledger all the same. A ledger row is now keyed by its
-- turn: the assistant message's id when the turn is stored in a chat (so a
-- stored turn is still counted exactly once), a fresh id when it is not
-- (chat_id NULL). SQLite cannot drop a foreign key in place: the table is
-- rebuilt.
CREATE TABLE usage_ledger_v4 (
    turn_id           BLOB    NOT NULL PRIMARY KEY,
    org_id            BLOB    NOT NULL,
    user_id           BLOB    NOT NULL,
    chat_id           BLOB,
    model             TEXT    NOT NULL,
    status            TEXT    NOT NULL
                      CHECK (status IN ('complete', 'cancelled', 'failed', 'interrupted')),
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    source            TEXT    NOT NULL CHECK (source IN ('provider', 'estimated')),
    cost_micro_usd    INTEGER NOT NULL,
    created_at        INTEGER NOT NULL
) STRICT;

INSERT INTO usage_ledger_v4 (turn_id, org_id, user_id, chat_id, model, status, prompt_tokens,
                             completion_tokens, source, cost_micro_usd, created_at)
SELECT message_id, org_id, user_id, chat_id, model, status, prompt_tokens, completion_tokens,
       source, cost_micro_usd, created_at
FROM usage_ledger;

DROP TABLE usage_ledger;
ALTER TABLE usage_ledger_v4 RENAME TO usage_ledger;

CREATE INDEX usage_ledger_org_time ON usage_ledger (org_id, created_at);
CREATE INDEX usage_ledger_user_time ON usage_ledger (org_id, user_id, created_at);
