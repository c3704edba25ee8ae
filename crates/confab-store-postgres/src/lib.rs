//! The PostgreSQL implementation of [`confab_core::Store`], for production
//! and for several confab instances sharing one database.
//!
//! Timestamps come from the database clock (`now()`, the start of the
//! current transaction, i.e. of the statement for single statements), so
//! instances with skewed clocks still agree, and every timestamp a method
//! returns was read back from the row (`RETURNING`), so it round-trips
//! exactly as a keyset cursor.
//!
//! The hot paths are single statements: a turn without an idempotency key is
//! one CTE (one round trip, atomic on its own), finishing a message is one
//! CTE, and the periodic batches (`save_partials`, `touch_api_keys`) are one
//! `UPDATE … FROM unnest(…)` each, whatever their size. Turn writes
//! (begin, finish, a stateless turn's ledger row) go through the group
//! commit ([`group`]), which lets the ones that arrive together share a
//! transaction, and the begins among them share one statement per shape.

mod error;
mod group;
mod migrations;
mod rows;

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use confab_core::store::GroupCommitStats;
use confab_core::{
    ApiKey, ApiKeyId, BegunTurn, Chat, ChatCursor, ChatId, ChatTitle, FinishedMessage,
    IdempotencyRecord, LedgerEntry, Message, MessageId, NewApiKey, NewOrg, NewTurn, NewUser, Org,
    OrgId, OrgPolicy, PartialText, PoolConfig, Principal, RateLimitOverride, Store, StoreError,
    StoredStream, TokenLimits, TurnChat, UsageGroup, UsageReport, User, UserId,
};
use confab_store_sql::patient_acquire;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, Row};
use uuid::Uuid;

use crate::error::{connection_lost, map_err};
use crate::group::{Answer, GroupCommit, Statement, Write};
use crate::rows::{
    api_key_columns, chat_columns, finished_columns, message_columns, org_columns, user_columns,
};

/// A pooled connection idle for longer than this is pinged before use: it
/// may have been cut by a server restart or a NAT timeout meanwhile. Busy
/// connections skip the ping, which would otherwise double the round trips
/// of every query.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(30);

/// [`Store`] on a PostgreSQL database. Cheap to clone (the pool is shared).
#[derive(Clone, Debug)]
pub struct PostgresStore {
    pool: PgPool,
    liveness: Arc<Liveness>,
    /// `DB_ACQUIRE_TIMEOUT_MS`: how long a request waits for a connection.
    acquire_timeout: Duration,
    /// The turn writes' group commit (`DB_GROUP_COMMIT`).
    group: Option<Arc<GroupCommit>>,
    /// [`Store::ping`]'s own connection, outside the pool (opened on first
    /// use, again after a failure): a pool whose every connection is busy
    /// serving requests belongs to a database that answers, and a ping
    /// queued behind them would call it down — the readiness probe would
    /// then take a loaded but healthy instance out of rotation.
    probe: Arc<Probe>,
}

/// [`Store::ping`]'s connection and how to open it.
struct Probe {
    conn: tokio::sync::Mutex<Option<sqlx::PgConnection>>,
    options: PgConnectOptions,
}

impl std::fmt::Debug for Probe {
    /// Not the options: they hold the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Probe")
    }
}

impl PostgresStore {
    /// One UPDATE of an org's or a user's two token-limit columns.
    async fn set_token_limits(
        &self,
        sql: &'static str,
        id: Uuid,
        limits: TokenLimits,
    ) -> Result<(), StoreError> {
        let done = self
            .retry(move || {
                sqlx::query(sql)
                    .bind(id)
                    .bind(i64::try_from(limits.per_minute).unwrap_or(i64::MAX))
                    .bind(i64::try_from(limits.per_day).unwrap_or(i64::MAX))
                    .execute(&self.pool)
            })
            .await
            .map_err(map_err)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    /// Connect to `url` (`postgres://user:pass@host:port/db?…`) with a pool of
    /// up to `max_connections`, requests waiting up to 5 s for a connection.
    pub async fn connect(url: &str, max_connections: u32) -> Result<PostgresStore, StoreError> {
        Self::connect_with(url, PoolConfig::new(max_connections)).await
    }

    /// Connect with a pool sized and timed by `pool`, opening one connection
    /// right away so that a wrong URL or a down server is reported at
    /// start-up.
    ///
    /// `Unavailable` when the server cannot be reached within ~5 s (the
    /// message names host, port and database, never the password); `Other`
    /// for a malformed URL or a refused login.
    pub async fn connect_with(url: &str, config: PoolConfig) -> Result<PostgresStore, StoreError> {
        // The URL may hold a password: it never goes into an error message.
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Other(format!("invalid PostgreSQL URL: {e}")))?;
        let target = format!(
            "{}:{}/{}",
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or(options.get_username())
        );
        let liveness = Arc::new(Liveness::new());
        let check = liveness.clone();
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections.max(1))
            .acquire_timeout(config.acquire_timeout)
            .test_before_acquire(false)
            .before_acquire(move |conn, meta| {
                let check = check.clone();
                Box::pin(async move {
                    if check.suspect(meta.idle_for) {
                        // A failed ping closes the connection; the pool
                        // then tries the next one or opens a new one.
                        if let Err(err) = conn.ping().await {
                            check.lost();
                            return Err(err);
                        }
                    }
                    Ok(true)
                })
            })
            .connect_lazy_with(options.clone());
        // However short the request paths' wait, the first connection gets
        // the patient one: a server that is still starting is waited for.
        patient_acquire(&pool, PoolConfig::PATIENT_ACQUIRE)
            .await
            .map(drop)
            .map_err(|e| match map_err(e) {
                StoreError::Unavailable(msg) => StoreError::Unavailable(format!(
                    "cannot connect to PostgreSQL at {target}: {msg}"
                )),
                StoreError::Other(msg) => {
                    StoreError::Other(format!("cannot connect to PostgreSQL at {target}: {msg}"))
                }
                other => other,
            })?;
        let group = config
            .group_commit
            .then(|| Arc::new(GroupCommit::start(pool.clone(), config.max_connections)));
        Ok(PostgresStore {
            pool,
            liveness,
            acquire_timeout: config.acquire_timeout,
            group,
            probe: Arc::new(Probe {
                conn: tokio::sync::Mutex::new(None),
                options,
            }),
        })
    }

    /// Run one turn write (`begins`: a turn's first write, which may be
    /// refused when the database is too busy; otherwise a write that
    /// finishes admitted work and waits patiently): through the group commit
    /// when it is on — as `batched` when given (a begin the writers combine
    /// with others), else as `build()`'s statement — and alone, as
    /// `build()`'s statement with the dead-connection retry, when it is off
    /// or the write's batch failed.
    async fn write_turn<F>(
        &self,
        build: F,
        batched: Option<Write>,
        chat: Uuid,
        begins: bool,
    ) -> Result<Vec<PgRow>, sqlx::Error>
    where
        F: Fn() -> Statement,
    {
        if let Some(group) = &self.group {
            let wait = begins.then_some(self.acquire_timeout);
            let write = batched.unwrap_or_else(|| Write::Statement(build()));
            match group.submit(write, chat, wait).await? {
                Answer::Done(rows) => return Ok(rows),
                Answer::RunAlone => {}
            }
        }
        // Boxed: the statement's future is large (sqlx's acquire and fetch),
        // and a write waiting for its batch should hold only what it waits
        // with (see `begin_turn`).
        Box::pin(self.retry(|| async {
            let mut conn = if begins {
                self.pool.acquire().await?
            } else {
                patient_acquire(&self.pool, PoolConfig::PATIENT_ACQUIRE).await?
            };
            build().fetch_all(&mut *conn).await
        }))
        .await
    }

    /// Run `op`, and once more when it failed because its pooled connection
    /// was already dead (PostgreSQL restarted, failed over, or terminated
    /// it). The loss is recorded first, so the retry — and every other
    /// request — gets a connection that is pinged if it went idle before the
    /// loss (see [`Liveness`]): no dead pooled connection costs a client an
    /// error.
    ///
    /// Every statement of this store may run twice without applying a
    /// write twice: reads; updates that set values (`GREATEST`/`COALESCE`
    /// for the last-used and revocation times); deletes; inserts keyed by
    /// ids the caller chose, which a replay after a lost commit answer
    /// turns into a conflict; and the idempotency transaction, which did
    /// not commit when a statement before `COMMIT` failed, and whose
    /// message keys guard a replay after a lost `COMMIT` answer.
    async fn retry<T, F, Fut>(&self, op: F) -> Result<T, sqlx::Error>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
    {
        match op().await {
            Err(err) if connection_lost(&err) => {
                self.liveness.lost();
                tracing::info!(
                    error = %err,
                    "a pooled PostgreSQL connection was dead; retrying once on another"
                );
                match op().await {
                    // The retry's own answer when the statement ran: its
                    // result, or what the data says (a conflict, nothing
                    // found). Anything else — typically the new connection
                    // refused while the server is still going away — is the
                    // same outage as the first failure, reported as such.
                    Err(again) if !statement_answer(&again) => Err(err),
                    answered => answered,
                }
            }
            other => other,
        }
    }
}

/// Whether `err` is an answer about the data (a constraint, no row) rather
/// than a failure to run the statement.
fn statement_answer(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::RowNotFound => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| code.starts_with("23")),
        _ => false,
    }
}

/// When a pooled connection was last found dead. A connection that went
/// idle before that (or long ago) may be dead too — PostgreSQL drops every
/// connection at once on a restart — and is pinged before it is handed out;
/// the others are handed out as they are, so a healthy pool pays nothing.
#[derive(Debug)]
struct Liveness {
    started: std::time::Instant,
    /// Milliseconds since `started`, plus one, of the last loss; 0: never.
    lost_at: AtomicU64,
}

impl Liveness {
    fn new() -> Self {
        Liveness {
            started: std::time::Instant::now(),
            lost_at: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    }

    fn lost(&self) {
        self.lost_at.store(self.now(), Ordering::Relaxed);
    }

    /// Whether a connection idle for `idle_for` must be pinged before use.
    fn suspect(&self, idle_for: Duration) -> bool {
        if idle_for >= PING_IF_IDLE_FOR {
            return true;
        }
        let lost_at = self.lost_at.load(Ordering::Relaxed);
        if lost_at == 0 {
            return false;
        }
        let idle_ms = u64::try_from(idle_for.as_millis()).unwrap_or(u64::MAX);
        self.now().saturating_sub(idle_ms) <= lost_at
    }
}

fn uuid<T: Into<Uuid>>(id: T) -> Uuid {
    id.into()
}

// ---- begin_turn --------------------------------------------------------------
//
// Begins are multi-row statements: each parameter is an array with one
// element per turn, so that the group commit can write many begins of one
// shape in one statement (one round trip) and a lone begin is the same
// statement with one-element arrays. The parameters, one array each:
//   $1 chat id, $2 org, $3 user, $4 user message id, $5 assistant message id,
//   $6 user message text, $7 idempotency key (NULL: none), $8 request hash,
//   $9 the turn's model, $10 a new chat's title, $11 its system prompt (NULL:
//   none) and $12 the system message's id (both NULL for an existing chat).
// The chat CTE yields each chat's new message_count (its last seq); a turn's
// two messages take count-1 and count. A turn that finds no live chat (or,
// for a new chat, no live user of that org) inserts nothing, and its caller
// gets no message row: `NotFound`. Without a key a turn needs no
// transaction of its own (one statement is atomic). A turn with a key runs
// alone, in a transaction, because when the key is claimed but the chat
// turns out to be gone the claim must be rolled back too.
//
// A chat may appear only once per statement (`UPDATE … FROM` with two rows
// for one chat would apply one of them); the group commit runs further
// turns of a chat as further statements of its transaction.

/// The turns, then the idempotency keys they claim (each for its turn's
/// assistant message). "Drop the user's expired or abandoned key of that
/// name, then claim it" is one upsert: a live key is left untouched and
/// yields no row; an expired one is replaced, and so is an unanswered one
/// older than `ABANDONED_CLAIM_SECS` whose reply is no longer `streaming`
/// (a claim without a message, from before migration 0007, by its age
/// alone). The unique index makes concurrent
/// claims of one key wait for each other, so exactly one wins.
macro_rules! input_and_claim {
    () => {
        "WITH input AS ( \
            SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[], $5::uuid[], \
                                 $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], \
                                 $11::text[], $12::uuid[]) \
                AS i (chat_id, org_id, user_id, user_msg, assistant_msg, content, key, hash, \
                      model, title, system, system_msg) \
        ), claim AS ( \
            INSERT INTO idempotency_keys (user_id, key, request_hash, created_at, message_id) \
            SELECT user_id, key, hash, now(), assistant_msg FROM input WHERE key IS NOT NULL \
            ON CONFLICT (user_id, key) DO UPDATE \
               SET request_hash = EXCLUDED.request_hash, response = NULL, \
                   created_at = EXCLUDED.created_at, message_id = EXCLUDED.message_id \
             WHERE idempotency_keys.created_at < now() - interval '24 hours' \
                OR (idempotency_keys.response IS NULL \
                    AND idempotency_keys.created_at < now() - interval '120 seconds' \
                    AND NOT EXISTS (SELECT 1 FROM messages r \
                        WHERE r.id = idempotency_keys.message_id AND r.status = 'streaming')) \
            RETURNING user_id, key \
        ), "
    };
}

/// Whether the turn `i` may be written: it asked for no key, or claimed it.
macro_rules! claimed {
    () => {
        "(i.key IS NULL OR EXISTS \
            (SELECT 1 FROM claim k WHERE k.user_id = i.user_id AND k.key = i.key))"
    };
}

/// Inserts each written turn's messages into the chat row the `chat` CTE
/// produced (a new chat's system prompt, when it has one, is its first
/// message) and reports whether a key was claimed. At least one row: when
/// no message was inserted the message columns are NULL.
macro_rules! messages_and_result {
    () => {
        "turn AS ( \
            SELECT i.*, c.message_count, c.updated_at AS at, c.org_id AS chat_org \
            FROM chat c JOIN input i ON i.chat_id = c.id \
        ), msgs AS ( \
            INSERT INTO messages \
                (id, chat_id, org_id, role, content, status, seq, model, created_at, updated_at) \
            SELECT user_msg, chat_id, chat_org, 'user', content, 'complete', \
                   message_count - 1, NULL, at, at FROM turn \
            UNION ALL \
            SELECT assistant_msg, chat_id, chat_org, 'assistant', '', 'streaming', \
                   message_count, model, at, at FROM turn \
            UNION ALL \
            SELECT system_msg, chat_id, chat_org, 'system', system, 'complete', 1, NULL, \
                   at, at FROM turn WHERE system IS NOT NULL \
            RETURNING id, chat_id, org_id, role, content, status, token_count, seq, model, \
                      prompt_tokens, completion_tokens, usage_source, created_at, updated_at \
        ) \
        SELECT m.*, k.claimed \
        FROM (SELECT count(*) AS claimed FROM claim) AS k LEFT JOIN msgs AS m ON true"
    };
}

/// Turns that create their chats, from the live user rows so that a chat
/// can only be created for a user of that org.
const BEGIN_TURN_NEW_CHAT: &str = concat!(
    input_and_claim!(),
    "chat AS ( \
        INSERT INTO chats \
            (id, org_id, user_id, title, message_count, model, created_at, updated_at) \
        SELECT i.chat_id, u.org_id, u.id, i.title, 2 + (i.system IS NOT NULL)::int, \
               i.model, now(), now() \
        FROM input i JOIN users u \
          ON u.id = i.user_id AND u.org_id = i.org_id AND u.deleted_at IS NULL \
        WHERE ",
    claimed!(),
    " RETURNING id, org_id, message_count, updated_at \
    ), ",
    messages_and_result!()
);

/// Turns on existing chats. The UPDATE locks each chat row (in the order of
/// the input, which the caller sorts by chat), so concurrent turns on one
/// chat take consecutive sequence numbers.
const BEGIN_TURN_EXISTING_CHAT: &str = concat!(
    input_and_claim!(),
    "chat AS ( \
        UPDATE chats \
           SET message_count = chats.message_count + 2, updated_at = now(), model = i.model \
          FROM input i \
         WHERE chats.id = i.chat_id AND chats.org_id = i.org_id AND chats.deleted_at IS NULL \
           AND ",
    claimed!(),
    " RETURNING chats.id, chats.org_id, chats.message_count, chats.updated_at \
    ), ",
    messages_and_result!()
);

/// One turn's begin, as the begin statements take it.
#[derive(Debug)]
pub(crate) struct Begin {
    /// Whether the turn creates its chat (the statement's shape).
    pub(crate) new_chat: bool,
    pub(crate) chat: Uuid,
    org: Uuid,
    user: Uuid,
    user_message: Uuid,
    assistant_message: Uuid,
    content: String,
    key: Option<String>,
    hash: Option<String>,
    model: String,
    title: Option<String>,
    system: Option<String>,
    system_message: Option<Uuid>,
}

impl Begin {
    fn of(turn: &NewTurn) -> Begin {
        let (new_chat, chat, title, system) = match &turn.chat {
            TurnChat::New { id, title } => (true, *id, Some(title.clone()), turn.system.clone()),
            TurnChat::Existing(id) => (false, *id, None, None),
        };
        Begin {
            new_chat,
            chat: uuid(chat),
            org: uuid(turn.org),
            user: uuid(turn.user),
            user_message: uuid(turn.user_message_id),
            assistant_message: uuid(turn.assistant_message_id),
            content: turn.content.clone(),
            key: turn.idempotency.as_ref().map(|c| c.key.clone()),
            hash: turn.idempotency.as_ref().map(|c| c.request_hash.clone()),
            model: turn.model.clone(),
            system_message: system.as_ref().map(|_| Uuid::new_v4()),
            title,
            system,
        }
    }

    /// The begin statement of this turn alone.
    pub(crate) fn alone(self) -> Statement {
        begin_statement(self.new_chat, std::iter::once(self))
    }
}

/// The statement that writes `begins`, all of one shape (`new_chat`), no
/// chat twice; it takes their texts over rather than copying them. Its rows
/// carry each message's `chat_id`.
pub(crate) fn begin_statement(
    new_chat: bool,
    begins: impl ExactSizeIterator<Item = Begin>,
) -> Statement {
    let n = begins.len();
    let (mut chat, mut org, mut user) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut user_message, mut assistant_message) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut content, mut key, mut hash) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut model, mut title, mut system) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let mut system_message = Vec::with_capacity(n);
    for b in begins {
        chat.push(b.chat);
        org.push(b.org);
        user.push(b.user);
        user_message.push(b.user_message);
        assistant_message.push(b.assistant_message);
        content.push(b.content);
        key.push(b.key);
        hash.push(b.hash);
        model.push(b.model);
        title.push(b.title);
        system.push(b.system);
        system_message.push(b.system_message);
    }
    sqlx::query(if new_chat {
        BEGIN_TURN_NEW_CHAT
    } else {
        BEGIN_TURN_EXISTING_CHAT
    })
    .bind(chat)
    .bind(org)
    .bind(user)
    .bind(user_message)
    .bind(assistant_message)
    .bind(content)
    .bind(key)
    .bind(hash)
    .bind(model)
    .bind(title)
    .bind(system)
    .bind(system_message)
}

/// The ledger rows of final writes (SPEC §12), one home for both final
/// write statements: from CTE `m` (the messages written, with their `cost`)
/// and `c` (their chats' `id` and `user_id`), one row per turn, replaced
/// when the turn was settled before.
macro_rules! final_ledger_rows {
    () => {
        "INSERT INTO usage_ledger (turn_id, org_id, user_id, chat_id, model, status, \
             prompt_tokens, completion_tokens, source, cost_micro_usd, created_at) \
         SELECT m.id, m.org_id, c.user_id, m.chat_id, coalesce(m.model, 'unknown'), \
                m.status, m.prompt_tokens, m.completion_tokens, m.usage_source, m.cost, now() \
           FROM m JOIN c ON c.id = m.chat_id \
         ON CONFLICT (turn_id) DO UPDATE SET status = EXCLUDED.status, \
            prompt_tokens = EXCLUDED.prompt_tokens, \
            completion_tokens = EXCLUDED.completion_tokens, source = EXCLUDED.source, \
            cost_micro_usd = EXCLUDED.cost_micro_usd, created_at = EXCLUDED.created_at"
    };
}

/// One turn's final write (SPEC §6, §12): the message's final text,
/// status and usage, its chat's `updated_at` and its ledger row, written
/// together — alone ([`Finish::alone`], also storing an idempotent
/// response), or with the other final writes of a group commit batch in one
/// statement ([`finish_statement`]). The two statements write the same
/// columns the same way; the store contract's final-write tests run both.
#[derive(Clone, Debug)]
pub(crate) struct Finish {
    pub(crate) id: Uuid,
    org: Uuid,
    pub(crate) chat: Uuid,
    content: String,
    status: &'static str,
    completion: i64,
    prompt: i64,
    source: &'static str,
    cost: i64,
    lengths: Vec<u8>,
}

impl Finish {
    fn of(msg: &FinishedMessage) -> Finish {
        Finish {
            id: uuid(msg.id),
            org: uuid(msg.org),
            chat: uuid(msg.chat),
            content: msg.content.clone(),
            status: msg.status.as_str(),
            completion: msg.usage.completion_tokens,
            prompt: msg.usage.prompt_tokens,
            source: msg.usage.source.as_str(),
            cost: msg.cost.cost_micro_usd,
            lengths: msg.event_lengths.clone(),
        }
    }

    /// This final write alone, storing `idempotent` (user, key, response)
    /// with it: one statement, hence one transaction; the chat's
    /// `updated_at` and the response change only when the message was
    /// found ($7/$8 are NULL without a response, which matches no key).
    pub(crate) fn alone(&self, idempotent: Option<(Uuid, &str, &serde_json::Value)>) -> Statement {
        let (user, key, response) = match idempotent {
            Some((user, key, response)) => (Some(user), Some(key), Some(response)),
            None => (None, None, None),
        };
        sqlx::query(concat!(
            "WITH m AS ( \
                UPDATE messages \
                   SET content = $4, status = $5, token_count = $6, updated_at = now(), \
                       prompt_tokens = $10, completion_tokens = $6, usage_source = $11, \
                       event_lengths = $13 \
                 WHERE id = $1 AND org_id = $2 AND chat_id = $3 \
                RETURNING ",
            finished_columns!(),
            ", $12::bigint AS cost \
            ), c AS ( \
                UPDATE chats SET updated_at = now() \
                 WHERE id = $3 AND org_id = $2 AND EXISTS (SELECT 1 FROM m) \
                RETURNING id, user_id \
            ), l AS ( ",
            final_ledger_rows!(),
            " ), k AS ( \
                UPDATE idempotency_keys SET response = $9 \
                 WHERE user_id = $7 AND key = $8 AND EXISTS (SELECT 1 FROM m) \
                   AND (message_id = $1 OR message_id IS NULL) \
            ) \
            SELECT * FROM m"
        ))
        .bind(self.id)
        .bind(self.org)
        .bind(self.chat)
        .bind(&self.content)
        .bind(self.status)
        .bind(self.completion)
        .bind(user)
        .bind(key)
        .bind(response)
        .bind(self.prompt)
        .bind(self.source)
        .bind(self.cost)
        .bind(&self.lengths)
    }
}

/// Several final writes (none with an idempotent response, no message
/// twice) as one statement: what [`Finish::alone`] does for each, with the
/// rows of the messages found (`finished_columns`, each with its `id`).
/// Planned for its arrays on every run, never a cached generic plan (see
/// `save_partials`): a multi-row `UPDATE messages … FROM unnest(…)` whose
/// generic plan was made while the table was small kept a hash join over a
/// sequential scan of it.
pub(crate) fn finish_statement(finishes: &[Finish]) -> Statement {
    fn column<'a, T>(finishes: &'a [Finish], field: impl Fn(&'a Finish) -> T) -> Vec<T> {
        finishes.iter().map(field).collect()
    }
    sqlx::query(concat!(
        "WITH p AS ( \
            SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], \
                                 $6::bigint[], $7::bigint[], $8::text[], $9::bigint[], $10::bytea[]) \
                AS p(id, org_id, chat_id, content, status, completion_tokens, prompt_tokens, \
                     usage_source, cost, event_lengths) \
        ), m AS ( \
            UPDATE messages \
               SET content = p.content, status = p.status, token_count = p.completion_tokens, \
                   updated_at = now(), prompt_tokens = p.prompt_tokens, \
                   completion_tokens = p.completion_tokens, usage_source = p.usage_source, \
                   event_lengths = p.event_lengths \
              FROM p \
             WHERE messages.id = p.id AND messages.org_id = p.org_id \
               AND messages.chat_id = p.chat_id \
            RETURNING messages.id, messages.chat_id, messages.org_id, messages.role, \
                      messages.status, messages.token_count, messages.seq, messages.model, \
                      messages.prompt_tokens, messages.completion_tokens, \
                      messages.usage_source, messages.created_at, messages.updated_at, p.cost \
        ), c AS ( \
            UPDATE chats SET updated_at = now() \
              FROM (SELECT DISTINCT chat_id, org_id FROM m) mc \
             WHERE chats.id = mc.chat_id AND chats.org_id = mc.org_id \
            RETURNING chats.id, chats.user_id \
        ), l AS ( ",
        final_ledger_rows!(),
        " ) \
        SELECT ",
        finished_columns!(),
        " FROM m"
    ))
    .bind(column(finishes, |f| f.id))
    .bind(column(finishes, |f| f.org))
    .bind(column(finishes, |f| f.chat))
    .bind(column(finishes, |f| f.content.as_str()))
    .bind(column(finishes, |f| f.status))
    .bind(column(finishes, |f| f.completion))
    .bind(column(finishes, |f| f.prompt))
    .bind(column(finishes, |f| f.source))
    .bind(column(finishes, |f| f.cost))
    .bind(column(finishes, |f| f.lengths.as_slice()))
    .persistent(false)
}

/// Interpret the result rows of a turn statement: `Conflict` when a key was
/// asked for but not claimed, `NotFound` when no message was inserted.
fn begun_turn(turn: &NewTurn, rows: &[PgRow]) -> Result<BegunTurn, StoreError> {
    let claimed: i64 = match rows.first() {
        Some(row) => row.try_get("claimed").map_err(map_err)?,
        None => 0,
    };
    if turn.idempotency.is_some() && claimed == 0 {
        return Err(StoreError::Conflict {
            constraint: "idempotency_keys".into(),
        });
    }
    let mut messages = Vec::with_capacity(2);
    for row in rows {
        if row
            .try_get::<Option<Uuid>, _>("id")
            .map_err(map_err)?
            .is_none()
        {
            continue;
        }
        messages.push(rows::message(row)?);
    }
    turn.begun_from(messages).ok_or(StoreError::NotFound)
}

/// Keep one entry per id (the last one for partial texts); `UPDATE … FROM`
/// with duplicate ids would apply an arbitrary one of them.
fn last_per_id<K: Copy + Eq + std::hash::Hash, V>(items: &[(K, V)]) -> Vec<(K, &V)> {
    let mut position: HashMap<K, usize> = HashMap::with_capacity(items.len());
    let mut out: Vec<(K, &V)> = Vec::with_capacity(items.len());
    for (key, value) in items {
        match position.get(key) {
            Some(&i) => out[i].1 = value,
            None => {
                position.insert(*key, out.len());
                out.push((*key, value));
            }
        }
    }
    out
}

#[async_trait]
impl Store for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut slot = self.probe.conn.lock().await;
        // Out of its slot while the ping runs, back only when it answered:
        // a ping cut short by its caller's deadline (a host gone dark
        // answers nothing) drops the connection, and the next ping opens a
        // new one instead of waiting behind the old query.
        let mut conn = match slot.take() {
            Some(conn) => conn,
            None => sqlx::PgConnection::connect_with(&self.probe.options)
                .await
                .map_err(map_err)?,
        };
        sqlx::query("SELECT 1")
            .execute(&mut conn)
            .await
            .map_err(map_err)?;
        *slot = Some(conn);
        Ok(())
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        migrations::migrator()
            .run(&self.pool)
            .await
            .map_err(|e| map_err(sqlx::Error::Migrate(Box::new(e))))
    }

    async fn close(&self) {
        if let Some(conn) = self.probe.conn.lock().await.take() {
            let _ = conn.close().await;
        }
        self.pool.close().await;
    }

    fn group_commit_stats(&self) -> Option<GroupCommitStats> {
        self.group.as_ref().map(|group| group.stats())
    }

    // ---- tenancy -------------------------------------------------------

    async fn create_org(&self, org: &NewOrg) -> Result<Org, StoreError> {
        let row = self
            .retry(move || {
                sqlx::query(concat!(
                    "INSERT INTO orgs (id, name, slug, metadata, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, now(), now()) RETURNING ",
                    org_columns!()
                ))
                .bind(uuid(org.id))
                .bind(&org.name)
                .bind(org.slug.as_str())
                .bind(&org.metadata)
                .fetch_one(&self.pool)
            })
            .await
            .map_err(map_err)?;
        rows::org(&row)
    }

    async fn list_orgs(&self) -> Result<Vec<Org>, StoreError> {
        let rows = self
            .retry(move || {
                sqlx::query(concat!(
                    "SELECT ",
                    org_columns!(),
                    " FROM orgs WHERE deleted_at IS NULL ORDER BY created_at, id"
                ))
                .fetch_all(&self.pool)
            })
            .await
            .map_err(map_err)?;
        rows.iter().map(rows::org).collect()
    }

    async fn find_org(&self, id_or_slug: &str) -> Result<Org, StoreError> {
        // A slug may itself look like a UUID; an id match wins.
        let id = Uuid::parse_str(id_or_slug).ok();
        let row = self
            .retry(move || {
                sqlx::query(concat!(
                    "SELECT ",
                    org_columns!(),
                    " FROM orgs WHERE deleted_at IS NULL AND (id = $1 OR slug = $2) \
             ORDER BY id = $1 DESC NULLS LAST LIMIT 1"
                ))
                .bind(id)
                .bind(id_or_slug)
                .fetch_optional(&self.pool)
            })
            .await
            .map_err(map_err)?;
        row.as_ref().map(rows::org).ok_or(StoreError::NotFound)?
    }

    async fn set_org_rate_limit(
        &self,
        org: OrgId,
        limit: Option<RateLimitOverride>,
    ) -> Result<(), StoreError> {
        let burst = limit
            .map(|l| i32::try_from(l.burst))
            .transpose()
            .map_err(|_| StoreError::Other("rate-limit burst is too large".into()))?;
        let done = self
            .retry(move || {
                sqlx::query(
            "UPDATE orgs SET rate_limit_burst = $2, rate_limit_per_second = $3, updated_at = now() \
             WHERE id = $1 AND deleted_at IS NULL",
        )
        .bind(uuid(org))
        .bind(burst)
        .bind(limit.map(|l| l.per_second))
        .execute(&self.pool)
            })
            .await
            .map_err(map_err)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    async fn set_org_token_limits(
        &self,
        org: OrgId,
        limits: TokenLimits,
    ) -> Result<(), StoreError> {
        self.set_token_limits(
            "UPDATE orgs SET tokens_per_minute = $2, tokens_per_day = $3, updated_at = now() \
             WHERE id = $1 AND deleted_at IS NULL",
            uuid(org),
            limits,
        )
        .await
    }

    async fn set_user_token_limits(
        &self,
        user: UserId,
        limits: TokenLimits,
    ) -> Result<(), StoreError> {
        self.set_token_limits(
            "UPDATE users SET tokens_per_minute = $2, tokens_per_day = $3, updated_at = now() \
             WHERE id = $1 AND deleted_at IS NULL",
            uuid(user),
            limits,
        )
        .await
    }

    async fn usage_report(
        &self,
        org: OrgId,
        user: Option<UserId>,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        group_by: Option<UsageGroup>,
    ) -> Result<UsageReport, StoreError> {
        // One statement per shape: the grouping key is a column or an
        // expression, never a bound value.
        const TOTALS: &str = "SELECT count(*) AS turns, sum(prompt_tokens)::bigint AS prompt_tokens, \
                sum(completion_tokens)::bigint AS completion_tokens, \
                sum(cost_micro_usd)::bigint AS cost_micro_usd \
             FROM usage_ledger WHERE org_id = $1 AND ($2::uuid IS NULL OR user_id = $2) \
               AND created_at >= $3 AND created_at < $4";
        const BY_MODEL: &str = "SELECT model AS key, count(*) AS turns, \
                sum(prompt_tokens)::bigint AS prompt_tokens, \
                sum(completion_tokens)::bigint AS completion_tokens, \
                sum(cost_micro_usd)::bigint AS cost_micro_usd \
             FROM usage_ledger WHERE org_id = $1 AND ($2::uuid IS NULL OR user_id = $2) \
               AND created_at >= $3 AND created_at < $4 GROUP BY 1 ORDER BY 1";
        const BY_USER: &str = "SELECT user_id::text AS key, count(*) AS turns, \
                sum(prompt_tokens)::bigint AS prompt_tokens, \
                sum(completion_tokens)::bigint AS completion_tokens, \
                sum(cost_micro_usd)::bigint AS cost_micro_usd \
             FROM usage_ledger WHERE org_id = $1 AND ($2::uuid IS NULL OR user_id = $2) \
               AND created_at >= $3 AND created_at < $4 GROUP BY 1 ORDER BY 1";
        const BY_DAY: &str = "SELECT to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS key, \
                count(*) AS turns, sum(prompt_tokens)::bigint AS prompt_tokens, \
                sum(completion_tokens)::bigint AS completion_tokens, \
                sum(cost_micro_usd)::bigint AS cost_micro_usd \
             FROM usage_ledger WHERE org_id = $1 AND ($2::uuid IS NULL OR user_id = $2) \
               AND created_at >= $3 AND created_at < $4 GROUP BY 1 ORDER BY 1";
        let bind = |sql: &'static str| {
            sqlx::query(sql)
                .bind(uuid(org))
                .bind(user.map(uuid))
                .bind(from)
                .bind(to)
        };
        let row = self
            .retry(|| bind(TOTALS).fetch_one(&self.pool))
            .await
            .map_err(map_err)?;
        let totals = rows::usage_totals(&row)?;
        let groups = match group_by {
            None => Vec::new(),
            Some(group) => {
                let sql = match group {
                    UsageGroup::Model => BY_MODEL,
                    UsageGroup::User => BY_USER,
                    UsageGroup::Day => BY_DAY,
                };
                let found = self
                    .retry(|| bind(sql).fetch_all(&self.pool))
                    .await
                    .map_err(map_err)?;
                let mut groups = Vec::with_capacity(found.len());
                for row in &found {
                    let key: String = row.try_get("key").map_err(map_err)?;
                    groups.push((key, rows::usage_totals(row)?));
                }
                groups
            }
        };
        Ok(UsageReport { totals, groups })
    }

    async fn set_org_policy(&self, org: OrgId, policy: &OrgPolicy) -> Result<(), StoreError> {
        let done = self
            .retry(move || {
                sqlx::query(
                    "UPDATE orgs SET allowed_models = $2, system_prompt = $3, updated_at = now() \
             WHERE id = $1 AND deleted_at IS NULL",
                )
                .bind(uuid(org))
                .bind(policy.allowed_models.as_deref())
                .bind(policy.system_prompt.as_deref())
                .execute(&self.pool)
            })
            .await
            .map_err(map_err)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    async fn create_user(&self, user: &NewUser) -> Result<User, StoreError> {
        // INSERT … SELECT from the live org: an unknown *or deleted* org
        // inserts nothing (→ NotFound); a foreign key alone would accept a
        // deleted org.
        let row = self
            .retry(move || {
                sqlx::query(concat!(
                    "INSERT INTO users (id, org_id, email, name, role, created_at, updated_at) \
             SELECT $1::uuid, o.id, $3::text, $4::text, $5::text, now(), now() \
             FROM orgs o WHERE o.id = $2 AND o.deleted_at IS NULL \
             RETURNING ",
                    user_columns!()
                ))
                .bind(uuid(user.id))
                .bind(uuid(user.org_id))
                .bind(user.email.as_str())
                .bind(&user.name)
                .bind(user.role.as_str())
                .fetch_optional(&self.pool)
            })
            .await
            .map_err(map_err)?;
        row.as_ref().map(rows::user).ok_or(StoreError::NotFound)?
    }

    async fn list_users(&self, org: OrgId) -> Result<Vec<User>, StoreError> {
        let rows = self
            .retry(move || {
                sqlx::query(concat!(
                    "SELECT ",
                    user_columns!(),
                    " FROM users WHERE org_id = $1 AND deleted_at IS NULL ORDER BY created_at, id"
                ))
                .bind(uuid(org))
                .fetch_all(&self.pool)
            })
            .await
            .map_err(map_err)?;
        rows.iter().map(rows::user).collect()
    }

    async fn delete_user(&self, org: OrgId, user: UserId) -> Result<(), StoreError> {
        let done = self
            .retry(move || {
                sqlx::query(
                    "UPDATE users SET deleted_at = now(), updated_at = now() \
             WHERE id = $1 AND org_id = $2 AND deleted_at IS NULL",
                )
                .bind(uuid(user))
                .bind(uuid(org))
                .execute(&self.pool)
            })
            .await
            .map_err(map_err)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    async fn has_orgs(&self) -> Result<bool, StoreError> {
        // Deleted orgs count: seeding is for a database nobody has used yet.
        let row = self
            .retry(move || {
                sqlx::query("SELECT EXISTS (SELECT 1 FROM orgs) AS any_org").fetch_one(&self.pool)
            })
            .await
            .map_err(map_err)?;
        row.try_get::<bool, _>("any_org").map_err(map_err)
    }

    // ---- authentication -------------------------------------------------

    async fn find_principal(&self, user: UserId) -> Result<Option<Principal>, StoreError> {
        let row = self
            .retry(move || {
                sqlx::query(
                    "SELECT u.id AS user_id, u.org_id, u.email, u.role, \
                    o.rate_limit_burst, o.rate_limit_per_second, \
                    o.allowed_models, o.system_prompt, \
                    o.tokens_per_minute AS org_tpm, o.tokens_per_day AS org_tpd, \
                    u.tokens_per_minute AS user_tpm, u.tokens_per_day AS user_tpd \
             FROM users u JOIN orgs o ON o.id = u.org_id \
             WHERE u.id = $1 AND u.deleted_at IS NULL AND o.deleted_at IS NULL",
                )
                .bind(uuid(user))
                .fetch_optional(&self.pool)
            })
            .await
            .map_err(map_err)?;
        row.map(|r| rows::principal(&r, false)).transpose()
    }

    async fn create_api_key(&self, key: &NewApiKey) -> Result<ApiKey, StoreError> {
        // Only for a live user of that org (nothing inserted → NotFound).
        let row = self
            .retry(move || {
                sqlx::query(concat!(
            "INSERT INTO api_keys (id, org_id, user_id, key_hash, prefix, name, created_at) \
             SELECT $1::uuid, u.org_id, u.id, $4::bytea, $5::text, $6::text, now() FROM users u \
             WHERE u.id = $3 AND u.org_id = $2 AND u.deleted_at IS NULL \
             RETURNING ",
            api_key_columns!()
        ))
        .bind(uuid(key.id))
        .bind(uuid(key.org_id))
        .bind(uuid(key.user_id))
        .bind(key.hash.as_slice())
        .bind(&key.prefix)
        .bind(&key.name)
        .fetch_optional(&self.pool)
            })
            .await
            .map_err(map_err)?;
        row.as_ref()
            .map(rows::api_key)
            .ok_or(StoreError::NotFound)?
    }

    async fn list_api_keys(&self, org: OrgId) -> Result<Vec<ApiKey>, StoreError> {
        let rows = self
            .retry(move || {
                sqlx::query(concat!(
                    "SELECT ",
                    api_key_columns!(),
                    " FROM api_keys WHERE org_id = $1 ORDER BY created_at DESC, id DESC"
                ))
                .bind(uuid(org))
                .fetch_all(&self.pool)
            })
            .await
            .map_err(map_err)?;
        rows.iter().map(rows::api_key).collect()
    }

    async fn revoke_api_key(&self, id: ApiKeyId) -> Result<(), StoreError> {
        // COALESCE keeps the first revocation time: revoking twice is a no-op.
        let row = self.retry(move || sqlx::query(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now()) WHERE id = $1 RETURNING id",
        )
        .bind(uuid(id))
        .fetch_optional(&self.pool))
        .await
        .map_err(map_err)?;
        row.map(drop).ok_or(StoreError::NotFound)
    }

    async fn find_principal_by_key(&self, hash: &[u8]) -> Result<Option<Principal>, StoreError> {
        let row = self
            .retry(move || {
                sqlx::query(
                    "SELECT k.id AS api_key_id, u.id AS user_id, u.org_id, u.email, u.role, \
                    o.rate_limit_burst, o.rate_limit_per_second, \
                    o.allowed_models, o.system_prompt, \
                    o.tokens_per_minute AS org_tpm, o.tokens_per_day AS org_tpd, \
                    u.tokens_per_minute AS user_tpm, u.tokens_per_day AS user_tpd \
             FROM api_keys k \
             JOIN users u ON u.id = k.user_id AND u.org_id = k.org_id \
             JOIN orgs o ON o.id = u.org_id \
             WHERE k.key_hash = $1 AND k.revoked_at IS NULL \
               AND u.deleted_at IS NULL AND o.deleted_at IS NULL",
                )
                .bind(hash)
                .fetch_optional(&self.pool)
            })
            .await
            .map_err(map_err)?;
        row.map(|r| rows::principal(&r, true)).transpose()
    }

    async fn touch_api_keys(&self, used: &[(ApiKeyId, DateTime<Utc>)]) -> Result<(), StoreError> {
        if used.is_empty() {
            return Ok(());
        }
        // Latest use per key; GREATEST (which ignores NULL) never moves a
        // key's last use backwards when batches arrive out of order.
        let mut latest: HashMap<ApiKeyId, DateTime<Utc>> = HashMap::with_capacity(used.len());
        for (id, at) in used {
            let entry = latest.entry(*id).or_insert(*at);
            *entry = (*entry).max(*at);
        }
        let (ids, times): (Vec<Uuid>, Vec<DateTime<Utc>>) =
            latest.into_iter().map(|(id, at)| (uuid(id), at)).unzip();
        let (ids, times) = (&ids[..], &times[..]);
        self.retry(move || {
            sqlx::query(
                "UPDATE api_keys k SET last_used_at = GREATEST(k.last_used_at, t.at) \
             FROM unnest($1::uuid[], $2::timestamptz[]) AS t(id, at) \
             WHERE k.id = t.id",
            )
            .bind(ids)
            .bind(times)
            .execute(&self.pool)
        })
        .await
        .map(drop)
        .map_err(map_err)
    }

    // ---- chats ------------------------------------------------------------

    async fn get_chat(&self, org: OrgId, chat: ChatId) -> Result<Chat, StoreError> {
        let row = self
            .retry(move || {
                sqlx::query(concat!(
                    "SELECT ",
                    chat_columns!(),
                    " FROM chats WHERE id = $1 AND org_id = $2 AND deleted_at IS NULL"
                ))
                .bind(uuid(chat))
                .bind(uuid(org))
                .fetch_optional(&self.pool)
            })
            .await
            .map_err(map_err)?;
        row.as_ref().map(rows::chat).ok_or(StoreError::NotFound)?
    }

    async fn list_chats(
        &self,
        org: OrgId,
        user: UserId,
        after: Option<ChatCursor>,
        limit: u32,
    ) -> Result<Vec<Chat>, StoreError> {
        // Two fixed statements rather than one with `$3 IS NULL OR …`, so
        // each gets a plan that walks `chats_user_recent` from the right spot.
        let query = move || match after {
            None => sqlx::query(concat!(
                "SELECT ",
                chat_columns!(),
                " FROM chats WHERE org_id = $1 AND user_id = $2 AND deleted_at IS NULL \
                 ORDER BY updated_at DESC, id DESC LIMIT $3"
            ))
            .bind(uuid(org))
            .bind(uuid(user))
            .bind(i64::from(limit)),
            Some(cursor) => sqlx::query(concat!(
                "SELECT ",
                chat_columns!(),
                " FROM chats WHERE org_id = $1 AND user_id = $2 AND deleted_at IS NULL \
                   AND (updated_at, id) < ($4, $5) \
                 ORDER BY updated_at DESC, id DESC LIMIT $3"
            ))
            .bind(uuid(org))
            .bind(uuid(user))
            .bind(i64::from(limit))
            .bind(cursor.updated_at)
            .bind(uuid(cursor.id)),
        };
        let rows = self
            .retry(|| query().fetch_all(&self.pool))
            .await
            .map_err(map_err)?;
        rows.iter().map(rows::chat).collect()
    }

    async fn rename_chat(
        &self,
        org: OrgId,
        chat: ChatId,
        title: &ChatTitle,
    ) -> Result<Chat, StoreError> {
        let row = self
            .retry(move || {
                sqlx::query(concat!(
                    "UPDATE chats SET title = $3, updated_at = now() \
             WHERE id = $1 AND org_id = $2 AND deleted_at IS NULL RETURNING ",
                    chat_columns!()
                ))
                .bind(uuid(chat))
                .bind(uuid(org))
                .bind(title.as_str())
                .fetch_optional(&self.pool)
            })
            .await
            .map_err(map_err)?;
        row.as_ref().map(rows::chat).ok_or(StoreError::NotFound)?
    }

    async fn delete_chat(&self, org: OrgId, chat: ChatId) -> Result<(), StoreError> {
        let done = self
            .retry(move || {
                sqlx::query(
                    "UPDATE chats SET deleted_at = now(), updated_at = now() \
             WHERE id = $1 AND org_id = $2 AND deleted_at IS NULL",
                )
                .bind(uuid(chat))
                .bind(uuid(org))
                .execute(&self.pool)
            })
            .await
            .map_err(map_err)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    async fn list_messages(
        &self,
        org: OrgId,
        chat: ChatId,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        // Newest first through the (chat_id, seq) index, then reversed. The
        // chat's org and liveness are part of the same query, so another
        // org's chat yields nothing.
        let rows = self
            .retry(move || {
                sqlx::query(concat!(
                    "SELECT ",
                    message_columns!(),
                    " FROM messages \
             WHERE chat_id = $1 AND org_id = $2 AND seq < $3 \
               AND EXISTS (SELECT 1 FROM chats c \
                           WHERE c.id = $1 AND c.org_id = $2 AND c.deleted_at IS NULL) \
             ORDER BY seq DESC LIMIT $4"
                ))
                .bind(uuid(chat))
                .bind(uuid(org))
                .bind(before.unwrap_or(i64::MAX))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
            })
            .await
            .map_err(map_err)?;
        if rows.is_empty() {
            // Nothing: an empty page of a readable chat, or no such chat.
            self.get_chat(org, chat).await?;
            return Ok(Vec::new());
        }
        let mut messages = rows
            .iter()
            .map(rows::message)
            .collect::<Result<Vec<_>, _>>()?;
        messages.reverse();
        Ok(messages)
    }

    async fn insert_turn(&self, turn: &NewTurn) -> Result<BegunTurn, StoreError> {
        // Retried like every statement here: the messages' primary keys
        // (ids chosen by the caller) make a turn apply at most once, so a
        // replay after a commit whose answer was lost conflicts instead of
        // writing the turn twice (and `begin_turn` finds the turn it wrote).
        if turn.idempotency.is_none() {
            // The hot path: one self-contained statement, one round trip.
            let begin = Begin::of(turn);
            let chat = begin.chat;
            let rows = self
                .write_turn(
                    || Begin::of(turn).alone(),
                    Some(Write::Begin(begin)),
                    chat,
                    true,
                )
                .await
                .map_err(map_err)?;
            return begun_turn(turn, &rows);
        }
        // Boxed, like `write_turn`'s statement: every turn of a burst waits
        // in this future while its begin commits, so it is sized for the hot
        // path (≈ 7.9 KB each with this transaction's futures inline).
        Box::pin(self.retry(|| async {
            let mut tx = self.pool.begin().await?;
            let rows = Begin::of(turn).alone().fetch_all(&mut *tx).await?;
            match begun_turn(turn, &rows) {
                Ok(begun) => {
                    tx.commit().await?;
                    Ok(Ok(begun))
                }
                Err(err) => {
                    // Undo the claim when the chat was gone; nothing else was written.
                    tx.rollback().await?;
                    Ok(Err(err))
                }
            }
        }))
        .await
        .map_err(map_err)?
    }

    async fn find_messages(
        &self,
        org: OrgId,
        ids: &[MessageId],
    ) -> Result<Vec<Message>, StoreError> {
        let ids: Vec<Uuid> = ids.iter().map(|id| uuid(*id)).collect();
        let rows = self
            .retry(|| {
                sqlx::query(concat!(
                    "SELECT ",
                    message_columns!(),
                    " FROM messages WHERE id = ANY($1) AND org_id = $2"
                ))
                .bind(&ids)
                .bind(uuid(org))
                .fetch_all(&self.pool)
            })
            .await
            .map_err(map_err)?;
        rows.iter().map(rows::message).collect()
    }

    async fn finish_message(&self, msg: &FinishedMessage) -> Result<Message, StoreError> {
        let finish = Finish::of(msg);
        let idempotent = msg
            .idempotent_response
            .as_ref()
            .map(|(user, key, response)| (uuid(*user), key.as_str(), response));
        // Without a response to store, the group commit may write it with
        // the other final writes of its batch (one statement).
        let batched = idempotent.is_none().then(|| Write::Finish(finish.clone()));
        let rows = self
            .write_turn(|| finish.alone(idempotent), batched, finish.chat, false)
            .await
            .map_err(map_err)?;
        rows.first()
            .map(|row| rows::finished_message(row, msg.content.clone()))
            .ok_or(StoreError::NotFound)?
    }

    async fn record_usage(&self, entry: &LedgerEntry) -> Result<(), StoreError> {
        // Keyed by the turn's own id: a retried insert cannot count twice.
        let build = || {
            sqlx::query(
                "INSERT INTO usage_ledger (turn_id, org_id, user_id, chat_id, model, status, \
                    prompt_tokens, completion_tokens, source, cost_micro_usd, created_at) \
                 VALUES ($1, $2, $3, NULL, $4, $5, $6, $7, $8, $9, now()) \
                 ON CONFLICT (turn_id) DO NOTHING",
            )
            .bind(uuid(entry.turn))
            .bind(uuid(entry.org))
            .bind(uuid(entry.user))
            .bind(&entry.model)
            .bind(entry.status.as_str())
            .bind(entry.usage.prompt_tokens)
            .bind(entry.usage.completion_tokens)
            .bind(entry.usage.source.as_str())
            .bind(entry.cost.cost_micro_usd)
        };
        // No chat: its ledger row is the only row it writes.
        self.write_turn(build, None, Uuid::nil(), false)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn save_partials(&self, partials: &[PartialText]) -> Result<(), StoreError> {
        if partials.is_empty() {
            return Ok(());
        }
        let keyed: Vec<(MessageId, &PartialText)> = partials.iter().map(|p| (p.id, p)).collect();
        let mut ids = Vec::with_capacity(keyed.len());
        let mut texts = Vec::with_capacity(keyed.len());
        let mut lengths = Vec::with_capacity(keyed.len());
        let mut prompts = Vec::with_capacity(keyed.len());
        for (id, partial) in last_per_id(&keyed) {
            ids.push(uuid(id));
            texts.push(partial.content.as_str());
            lengths.push(partial.event_lengths.as_slice());
            prompts.push(partial.prompt_tokens);
        }
        // updated_at moves even when the text did not: it is the heartbeat
        // that keeps a live stream from looking stale. A reply whose row is
        // locked is skipped (`SKIP LOCKED`): that is its final write, whose
        // text supersedes this one, in a group commit that may hold other
        // replies' rows too. Waiting for it instead would let the two
        // statements lock the same rows in different orders — a deadlock,
        // which PostgreSQL breaks only after `deadlock_timeout` (1 s), seen
        // as 1 s stalls of whole batches at a thousand streams.
        let (ids, texts, lengths, prompts) = (&ids[..], &texts[..], &lengths[..], &prompts[..]);
        self.retry(move || async move {
            let mut conn = patient_acquire(&self.pool, PoolConfig::PATIENT_ACQUIRE).await?;
            sqlx::query(
                "UPDATE messages m SET content = p.content, event_lengths = p.lengths, \
                        prompt_tokens = CASE WHEN p.prompt > 0 THEN p.prompt \
                                             ELSE m.prompt_tokens END, \
                        updated_at = now() \
                 FROM unnest($1::uuid[], $2::text[], $3::bytea[], $4::bigint[]) \
                      AS p(id, content, lengths, prompt) \
                 WHERE m.id = p.id AND m.id IN ( \
                     SELECT id FROM messages WHERE id = ANY($1) AND status = 'streaming' \
                     FOR UPDATE SKIP LOCKED)",
            )
            .bind(ids)
            .bind(texts)
            .bind(lengths)
            .bind(prompts)
            // Not a cached prepared statement: planned for these very
            // arrays each time (once a second). PostgreSQL's generic plan
            // for it, taken after a few runs, guessed 10 elements and 1
            // locked row and joined them in a nested loop that rescanned the
            // unnested arrays once per row: 25 million comparisons and 4 GB
            // of temp reads per save at 5,000 live streams, 14-24 s per
            // save instead of 0.1-0.3 s (BENCHMARKS.md).
            .persistent(false)
            .execute(&mut *conn)
            .await
        })
        .await
        .map(drop)
        .map_err(map_err)
    }

    async fn stream_state(
        &self,
        org: OrgId,
        chat: ChatId,
        message: MessageId,
    ) -> Result<StoredStream, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            message_columns!(),
            ", event_lengths FROM messages \
             WHERE id = $1 AND chat_id = $2 AND org_id = $3 \
               AND EXISTS (SELECT 1 FROM chats c \
                           WHERE c.id = $2 AND c.org_id = $3 AND c.deleted_at IS NULL)"
        ))
        .bind(uuid(message))
        .bind(uuid(chat))
        .bind(uuid(org))
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?
        .ok_or(StoreError::NotFound)?;
        Ok(StoredStream {
            message: rows::message(&row)?,
            event_lengths: row.try_get("event_lengths").map_err(map_err)?,
        })
    }

    async fn interrupt_stale_streams(
        &self,
        stale_after: std::time::Duration,
    ) -> Result<u64, StoreError> {
        // One statement: the estimated usage, the final status and the
        // ledger rows together. A stale row that is locked is skipped
        // (`SKIP LOCKED`): the lock is its final write (or a partial save)
        // in progress, so the stream is not dead, and waiting for it would
        // let this statement and a group commit's multi-row final write lock
        // rows in opposite orders — a deadlock, which PostgreSQL breaks only
        // after `deadlock_timeout` by failing one of them (seen while saves
        // took seconds at 5,000 streams).
        let row = self
            .retry(move || async move {
                let mut conn = patient_acquire(&self.pool, PoolConfig::PATIENT_ACQUIRE).await?;
                sqlx::query(
                    "WITH m AS ( \
                UPDATE messages SET status = 'interrupted', updated_at = now(), \
                    prompt_tokens = coalesce(prompt_tokens, 0), \
                    completion_tokens = (length(content) + 3) / 4, \
                    token_count = (length(content) + 3) / 4, usage_source = 'estimated' \
                 WHERE status = 'streaming' AND id IN ( \
                     SELECT id FROM messages \
                      WHERE status = 'streaming' \
                        AND updated_at < now() - make_interval(secs => $1) \
                     FOR UPDATE SKIP LOCKED) \
                RETURNING id, org_id, chat_id, model, status, prompt_tokens, completion_tokens, \
                          usage_source \
             ), l AS ( \
                INSERT INTO usage_ledger (turn_id, org_id, user_id, chat_id, model, status, \
                    prompt_tokens, completion_tokens, source, cost_micro_usd, created_at) \
                SELECT m.id, m.org_id, c.user_id, m.chat_id, coalesce(m.model, 'unknown'), \
                       m.status, m.prompt_tokens, m.completion_tokens, m.usage_source, 0, now() \
                  FROM m JOIN chats c ON c.id = m.chat_id \
                ON CONFLICT (turn_id) DO NOTHING \
             ) SELECT count(*) AS n FROM m",
                )
                .bind(stale_after.as_secs_f64())
                .fetch_one(&mut *conn)
                .await
            })
            .await
            .map_err(map_err)?;
        let n: i64 = row.try_get("n").map_err(map_err)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    // ---- idempotency --------------------------------------------------------

    async fn get_idempotency(
        &self,
        user: UserId,
        key: &str,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        let row = self
            .retry(move || {
                sqlx::query(
                    "SELECT request_hash, response, created_at FROM idempotency_keys \
             WHERE user_id = $1 AND key = $2",
                )
                .bind(uuid(user))
                .bind(key)
                .fetch_optional(&self.pool)
            })
            .await
            .map_err(map_err)?;
        row.as_ref().map(rows::idempotency).transpose()
    }

    async fn release_idempotency(
        &self,
        user: UserId,
        key: &str,
        message: MessageId,
    ) -> Result<(), StoreError> {
        self.retry(move || {
            sqlx::query(
                "DELETE FROM idempotency_keys WHERE user_id = $1 AND key = $2 \
                   AND response IS NULL AND (message_id = $3 OR message_id IS NULL)",
            )
            .bind(uuid(user))
            .bind(key)
            .bind(uuid(message))
            .execute(&self.pool)
        })
        .await
        .map(drop)
        .map_err(map_err)
    }

    async fn purge_idempotency(&self, older_than: DateTime<Utc>) -> Result<u64, StoreError> {
        let done = self
            .retry(move || {
                sqlx::query("DELETE FROM idempotency_keys WHERE created_at < $1")
                    .bind(older_than)
                    .execute(&self.pool)
            })
            .await
            .map_err(map_err)?;
        Ok(done.rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_per_id_keeps_the_last_value_in_first_seen_order() {
        let items = [(1, "a"), (2, "b"), (1, "c")];
        assert_eq!(last_per_id(&items), vec![(1, &"c"), (2, &"b")]);
    }
}
