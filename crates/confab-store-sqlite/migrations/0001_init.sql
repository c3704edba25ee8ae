-- confab schema, SQLite dialect.
--
-- Conventions (the PostgreSQL migrations have the same meaning):
-- * ids are UUIDs stored the way sqlx encodes `uuid::Uuid`: a 16-byte BLOB,
--   which compares bytewise exactly like PostgreSQL's uuid type;
-- * timestamps are INTEGER microseconds since the Unix epoch (UTC), the
--   precision of PostgreSQL's timestamptz, so a value read back equals the
--   value written and keyset cursors round-trip;
-- * JSON is TEXT;
-- * STRICT tables, so a wrongly typed bind is an error instead of silently
--   stored text;
-- * unique constraints are named by the store after PostgreSQL's names
--   (orgs_slug_key, users_org_email, ...), see `error.rs`.

CREATE TABLE orgs (
    id                    BLOB    NOT NULL PRIMARY KEY,
    name                  TEXT    NOT NULL,
    slug                  TEXT    NOT NULL,
    metadata              TEXT    NOT NULL DEFAULT '{}',
    rate_limit_burst      INTEGER CHECK (rate_limit_burst > 0),
    rate_limit_per_second REAL    CHECK (rate_limit_per_second > 0),
    created_at            INTEGER NOT NULL,
    updated_at            INTEGER NOT NULL,
    deleted_at            INTEGER,
    -- An override is both numbers or neither.
    CHECK ((rate_limit_burst IS NULL) = (rate_limit_per_second IS NULL))
) STRICT;

CREATE UNIQUE INDEX orgs_slug_key ON orgs (slug);

CREATE TABLE users (
    id         BLOB    NOT NULL PRIMARY KEY,
    org_id     BLOB    NOT NULL REFERENCES orgs (id),
    email      TEXT    NOT NULL,
    name       TEXT    NOT NULL,
    role       TEXT    NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    deleted_at INTEGER
) STRICT;

-- Emails arrive lower-cased; a deleted user's address may be reused.
CREATE UNIQUE INDEX users_org_email ON users (org_id, email) WHERE deleted_at IS NULL;

CREATE TABLE chats (
    id            BLOB    NOT NULL PRIMARY KEY,
    org_id        BLOB    NOT NULL REFERENCES orgs (id),
    user_id       BLOB    NOT NULL REFERENCES users (id),
    title         TEXT    NOT NULL,
    -- Also the source of message sequence numbers: a turn adds 2 and its
    -- messages take the two new values, so no MAX(seq) query is needed.
    message_count INTEGER NOT NULL DEFAULT 0,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    deleted_at    INTEGER
) STRICT;

-- Keyset listing of a user's chats, most recently updated first.
CREATE INDEX chats_user_recent
    ON chats (org_id, user_id, updated_at DESC, id DESC)
    WHERE deleted_at IS NULL;

CREATE TABLE messages (
    id          BLOB    NOT NULL PRIMARY KEY,
    chat_id     BLOB    NOT NULL REFERENCES chats (id),
    org_id      BLOB    NOT NULL,
    role        TEXT    NOT NULL CHECK (role IN ('user', 'assistant', 'system')),
    content     TEXT    NOT NULL,
    status      TEXT    NOT NULL
                CHECK (status IN ('streaming', 'complete', 'cancelled', 'failed', 'interrupted')),
    token_count INTEGER,
    seq         INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    UNIQUE (chat_id, seq)
) STRICT;

-- Crash recovery looks for streams whose last save is old.
CREATE INDEX messages_streaming_updated ON messages (updated_at) WHERE status = 'streaming';

CREATE TABLE api_keys (
    id           BLOB    NOT NULL PRIMARY KEY,
    org_id       BLOB    NOT NULL REFERENCES orgs (id),
    user_id      BLOB    NOT NULL REFERENCES users (id),
    key_hash     BLOB    NOT NULL UNIQUE,
    prefix       TEXT    NOT NULL,
    name         TEXT    NOT NULL,
    created_at   INTEGER NOT NULL,
    last_used_at INTEGER,
    revoked_at   INTEGER
) STRICT;

CREATE INDEX api_keys_org ON api_keys (org_id, created_at DESC);

CREATE TABLE idempotency_keys (
    user_id      BLOB    NOT NULL REFERENCES users (id),
    key          TEXT    NOT NULL,
    request_hash TEXT    NOT NULL,
    response     TEXT,
    created_at   INTEGER NOT NULL,
    PRIMARY KEY (user_id, key)
) STRICT;

CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);
