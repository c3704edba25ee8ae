-- Usage ledger and token budgets (SPEC §12).

-- Token limits; NULL or 0 = unlimited.
ALTER TABLE orgs ADD COLUMN tokens_per_minute BIGINT CHECK (tokens_per_minute >= 0);
ALTER TABLE orgs ADD COLUMN tokens_per_day BIGINT CHECK (tokens_per_day >= 0);
ALTER TABLE users ADD COLUMN tokens_per_minute BIGINT CHECK (tokens_per_minute >= 0);
ALTER TABLE users ADD COLUMN tokens_per_day BIGINT CHECK (tokens_per_day >= 0);

-- One row per finished turn, keyed by its assistant message: written in the
-- transaction that gives the message its final status, so a turn is counted
-- exactly once whatever retries, replays, shutdowns or recoveries happen.
CREATE TABLE usage_ledger (
    message_id        UUID    NOT NULL PRIMARY KEY REFERENCES messages (id),
    org_id            UUID    NOT NULL,
    user_id           UUID    NOT NULL,
    chat_id           UUID    NOT NULL,
    model             TEXT    NOT NULL,
    status            TEXT    NOT NULL
                      CHECK (status IN ('complete', 'cancelled', 'failed', 'interrupted')),
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    source            TEXT    NOT NULL CHECK (source IN ('provider', 'estimated')),
    cost_micro_usd    BIGINT NOT NULL,
    created_at        TIMESTAMPTZ NOT NULL
);

-- The report's queries: an org's (or one user's) turns in a time range.
CREATE INDEX usage_ledger_org_time ON usage_ledger (org_id, created_at);
CREATE INDEX usage_ledger_user_time ON usage_ledger (org_id, user_id, created_at);
