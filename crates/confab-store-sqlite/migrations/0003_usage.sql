-- Usage ledger and token budgets (SPEC §12).

-- Token limits; NULL or 0 = unlimited.
ALTER TABLE orgs ADD COLUMN tokens_per_minute INTEGER CHECK (tokens_per_minute >= 0);
ALTER TABLE orgs ADD COLUMN tokens_per_day INTEGER CHECK (tokens_per_day >= 0);
ALTER TABLE users ADD COLUMN tokens_per_minute INTEGER CHECK (tokens_per_minute >= 0);
ALTER TABLE users ADD COLUMN tokens_per_day INTEGER CHECK (tokens_per_day >= 0);

-- One row per finished turn, keyed by its assistant message: written in the
-- transaction that gives the message its final status, so a turn is counted
-- exactly once whatever retries, replays, shutdowns or recoveries happen.
CREATE TABLE usage_ledger (
    message_id        BLOB    NOT NULL PRIMARY KEY REFERENCES messages (id),
    org_id            BLOB    NOT NULL,
    user_id           BLOB    NOT NULL,
    chat_id           BLOB    NOT NULL,
    model             TEXT    NOT NULL,
    status            TEXT    NOT NULL
                      CHECK (status IN ('complete', 'cancelled', 'failed', 'interrupted')),
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    source            TEXT    NOT NULL CHECK (source IN ('provider', 'estimated')),
    cost_micro_usd    INTEGER NOT NULL,
    created_at        INTEGER NOT NULL
) STRICT;

-- The report's queries: an org's (or one user's) turns in a time range.
CREATE INDEX usage_ledger_org_time ON usage_ledger (org_id, created_at);
CREATE INDEX usage_ledger_user_time ON usage_ledger (org_id, user_id, created_at);
