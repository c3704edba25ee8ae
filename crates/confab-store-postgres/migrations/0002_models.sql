-- Models and usage (SPEC §11): the chat's model, the model and token usage
-- of each assistant message, and each org's model allowlist and default
-- system prompt.

ALTER TABLE chats ADD COLUMN model TEXT;

ALTER TABLE messages ADD COLUMN model TEXT;
ALTER TABLE messages ADD COLUMN prompt_tokens BIGINT;
ALTER TABLE messages ADD COLUMN completion_tokens BIGINT;
ALTER TABLE messages ADD COLUMN usage_source TEXT
    CHECK (usage_source IN ('provider', 'estimated'));

-- NULL = every configured model.
ALTER TABLE orgs ADD COLUMN allowed_models TEXT[];
ALTER TABLE orgs ADD COLUMN system_prompt TEXT;
