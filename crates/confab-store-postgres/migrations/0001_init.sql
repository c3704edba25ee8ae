-- confab schema, PostgreSQL dialect (the SQLite migrations have the same meaning).
--
-- Timestamps come from the database clock (`now()`), so every instance
-- sharing this database agrees on them. Constraint names are part of the
-- store's contract: `StoreError::Conflict` reports them.

CREATE TABLE orgs (
    id                    uuid        PRIMARY KEY,
    name                  text        NOT NULL,
    slug                  text        NOT NULL,
    metadata              jsonb       NOT NULL DEFAULT '{}'::jsonb,
    rate_limit_burst      integer     CHECK (rate_limit_burst > 0),
    rate_limit_per_second double precision CHECK (rate_limit_per_second > 0),
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    deleted_at            timestamptz,
    CONSTRAINT orgs_slug_key UNIQUE (slug),
    -- An override is both numbers or neither.
    CONSTRAINT orgs_rate_limit_complete
        CHECK ((rate_limit_burst IS NULL) = (rate_limit_per_second IS NULL))
);

CREATE TABLE users (
    id         uuid        PRIMARY KEY,
    org_id     uuid        NOT NULL REFERENCES orgs (id),
    email      text        NOT NULL,
    name       text        NOT NULL,
    role       text        NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    deleted_at timestamptz
);

-- Emails arrive lower-cased; a deleted user's address may be reused.
CREATE UNIQUE INDEX users_org_email ON users (org_id, email) WHERE deleted_at IS NULL;

CREATE TABLE chats (
    id            uuid        PRIMARY KEY,
    org_id        uuid        NOT NULL REFERENCES orgs (id),
    user_id       uuid        NOT NULL REFERENCES users (id),
    title         text        NOT NULL,
    -- Also the source of message sequence numbers: a turn adds 2 and its
    -- messages take the two new values. The UPDATE that does it locks the
    -- chat row, so concurrent turns on one chat serialise without MAX(seq).
    message_count bigint      NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    deleted_at    timestamptz
);

-- Keyset listing of a user's chats, most recently updated first.
CREATE INDEX chats_user_recent
    ON chats (org_id, user_id, updated_at DESC, id DESC)
    WHERE deleted_at IS NULL;

CREATE TABLE messages (
    id          uuid        PRIMARY KEY,
    chat_id     uuid        NOT NULL REFERENCES chats (id),
    org_id      uuid        NOT NULL,
    role        text        NOT NULL CHECK (role IN ('user', 'assistant', 'system')),
    content     text        NOT NULL,
    status      text        NOT NULL
                CHECK (status IN ('streaming', 'complete', 'cancelled', 'failed', 'interrupted')),
    token_count bigint,
    seq         bigint      NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT messages_chat_id_seq_key UNIQUE (chat_id, seq)
);

-- Crash recovery looks for streams whose last save is old.
CREATE INDEX messages_streaming_updated ON messages (updated_at) WHERE status = 'streaming';

CREATE TABLE api_keys (
    id           uuid        PRIMARY KEY,
    org_id       uuid        NOT NULL REFERENCES orgs (id),
    user_id      uuid        NOT NULL REFERENCES users (id),
    key_hash     bytea       NOT NULL,
    prefix       text        NOT NULL,
    name         text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz,
    CONSTRAINT api_keys_key_hash_key UNIQUE (key_hash)
);

CREATE INDEX api_keys_org ON api_keys (org_id, created_at DESC);

CREATE TABLE idempotency_keys (
    user_id      uuid        NOT NULL REFERENCES users (id),
    key          text        NOT NULL,
    request_hash text        NOT NULL,
    response     jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT idempotency_keys_pkey PRIMARY KEY (user_id, key)
);

CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);
