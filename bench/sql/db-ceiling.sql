-- The writes of one POST /chat, in ONE transaction (one commit), as the
-- benchmark issue defines the database ceiling. Mirrors the two statements
-- confab-store-postgres issues (src/lib.rs: BEGIN_TURN_NEW_CHAT, then
-- finish_message): insert chat + 2 messages, update the reply + the chat.
-- Variables: org, user, reply, reply_tokens (-D), n (random), client_id.
\set n random(1, 9000000000000000000)
BEGIN;
-- begin_turn (BEGIN_TURN_NEW_CHAT without an idempotency key: $7/$8 NULL)
WITH claim AS (
    INSERT INTO idempotency_keys (user_id, key, request_hash, created_at)
    SELECT :user::uuid, NULL::text, NULL::text, now() WHERE NULL::text IS NOT NULL
    ON CONFLICT (user_id, key) DO UPDATE
       SET request_hash = EXCLUDED.request_hash, response = NULL,
           created_at = EXCLUDED.created_at
     WHERE idempotency_keys.created_at < now() - interval '24 hours'
    RETURNING 1
), chat AS (
    INSERT INTO chats (id, org_id, user_id, title, message_count, created_at, updated_at)
    SELECT md5(:client_id::text || '/' || :n::text || '/c')::uuid, u.org_id, u.id,
           left('Benchmark pgbench message ' || :n::text || ': how does confab store a turn?', 50),
           2, now(), now() FROM users u
    WHERE u.id = :user::uuid AND u.org_id = :org::uuid AND u.deleted_at IS NULL
      AND (NULL::text IS NULL OR EXISTS (SELECT 1 FROM claim))
    RETURNING id, org_id, message_count, updated_at
), msgs AS (
    INSERT INTO messages
        (id, chat_id, org_id, role, content, status, seq, created_at, updated_at)
    SELECT md5(:client_id::text || '/' || :n::text || '/u')::uuid, c.id, c.org_id, 'user',
           'Benchmark pgbench message ' || :n::text || ': how does confab store a turn?',
           'complete', c.message_count - 1, c.updated_at, c.updated_at FROM chat c
    UNION ALL
    SELECT md5(:client_id::text || '/' || :n::text || '/a')::uuid, c.id, c.org_id, 'assistant',
           '', 'streaming', c.message_count, c.updated_at, c.updated_at FROM chat c
    RETURNING id, chat_id, org_id, role, content, status, token_count, seq,
              created_at, updated_at
)
SELECT m.*, k.claimed
FROM (SELECT count(*) AS claimed FROM claim) AS k LEFT JOIN msgs AS m ON true;
-- finish_message (complete, no idempotent response: $7/$8/$9 NULL)
WITH m AS (
    UPDATE messages
       SET content = :reply, status = 'complete', token_count = :reply_tokens::bigint,
           updated_at = now()
     WHERE id = md5(:client_id::text || '/' || :n::text || '/a')::uuid
       AND org_id = :org::uuid
       AND chat_id = md5(:client_id::text || '/' || :n::text || '/c')::uuid
    RETURNING id, chat_id, org_id, role, content, status, token_count, seq, created_at, updated_at
), c AS (
    UPDATE chats SET updated_at = now()
     WHERE id = md5(:client_id::text || '/' || :n::text || '/c')::uuid
       AND org_id = :org::uuid AND EXISTS (SELECT 1 FROM m)
), k AS (
    UPDATE idempotency_keys SET response = NULL::jsonb
     WHERE user_id = NULL::uuid AND key = NULL::text AND EXISTS (SELECT 1 FROM m)
)
SELECT * FROM m;
COMMIT;
