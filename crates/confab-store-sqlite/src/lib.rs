//! The embedded SQLite implementation of [`confab_core::Store`], confab's
//! zero-configuration default.
//!
//! SQLite allows one writer at a time. Instead of letting concurrent write
//! transactions collide and fail with `SQLITE_BUSY`, every write goes through
//! a pool of exactly one connection, so writers queue in-process (fairly, with
//! the pool's acquire timeout) and each write transaction starts with
//! `BEGIN IMMEDIATE`, taking the write lock up front instead of upgrading a
//! read lock half-way (which WAL refuses when another process wrote
//! meanwhile). Reads use a separate pool; in WAL mode they never block the
//! writer nor wait for it.
//!
//! Encodings: UUIDs as sqlx encodes `uuid::Uuid` (16-byte BLOBs, ordered
//! bytewise like PostgreSQL's uuid), timestamps as INTEGER microseconds since
//! the epoch, JSON as text. See `migrations/`.
//!
//! An in-memory URL (`sqlite::memory:`) works for experiments only: it has no
//! WAL, so the reader and writer pools contend with table locks.

mod error;
mod migrations;
mod rows;

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use confab_core::{
    ApiKey, ApiKeyId, BegunTurn, Chat, ChatCursor, ChatId, ChatTitle, FinishedMessage,
    IdempotencyRecord, LedgerEntry, Message, MessageId, NewApiKey, NewOrg, NewTurn, NewUser, Org,
    OrgId, OrgPolicy, PartialText, PoolConfig, Principal, RateLimitOverride, Store, StoreError,
    StoredStream, TokenLimits, TurnChat, UsageGroup, UsageReport, User, UserId,
};
use confab_store_sql::patient_acquire;
use sqlx::pool::PoolConnection;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{Connection, Row, Sqlite, Transaction};
use uuid::Uuid;

use crate::error::map_err;
use crate::rows::{
    api_key_columns, chat_columns, json_text, message_columns, micros, now_micros, org_columns,
    user_columns,
};

/// How long a statement waits for another process's write lock before
/// giving up with `Unavailable` (the wait for a pooled connection is
/// [`PoolConfig::acquire_timeout`]).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Idempotency keys older than this are expired and may be claimed again.
const IDEMPOTENCY_TTL_MICROS: i64 = confab_core::model::IDEMPOTENCY_TTL_HOURS * 60 * 60 * 1_000_000;
/// A claim never answered for this long belongs to a request that died.
const ABANDONED_CLAIM_MICROS: i64 = confab_core::model::ABANDONED_CLAIM_SECS * 1_000_000;

/// [`Store`] on a SQLite file. Cheap to clone (the pools are shared).
#[derive(Clone, Debug)]
pub struct SqliteStore {
    /// Exactly one connection: all write transactions.
    write: SqlitePool,
    /// `max_connections` connections: plain reads.
    read: SqlitePool,
}

impl SqliteStore {
    /// Open (creating it if missing) the database at `url`
    /// (`sqlite://confab.db`, `sqlite:///abs/path.db`) in WAL mode with
    /// `synchronous=NORMAL` (durable across process crashes; a power loss
    /// may lose the last transactions, never corrupt the file), foreign keys
    /// on and a 5 s busy timeout. `max_connections` sizes the read pool.
    ///
    /// `Unavailable` when the file cannot be opened; `Other` for a bad URL.
    pub async fn connect(url: &str, max_connections: u32) -> Result<SqliteStore, StoreError> {
        Self::connect_with(url, PoolConfig::new(max_connections)).await
    }

    /// As [`SqliteStore::connect`], the read pool sized by `pool` and every
    /// request waiting at most `pool.acquire_timeout` for a connection (the
    /// writer included: writes queue for its single connection).
    pub async fn connect_with(url: &str, pool: PoolConfig) -> Result<SqliteStore, StoreError> {
        let max_connections = pool.max_connections;
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::Other(format!("invalid SQLite URL {url:?}: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let unavailable = |e: sqlx::Error| match map_err(e) {
            StoreError::Unavailable(msg) | StoreError::Other(msg) => {
                StoreError::Unavailable(format!("cannot open SQLite database {url:?}: {msg}"))
            }
            other => other,
        };
        // The writer connects first and eagerly: it creates the file and
        // switches it to WAL (a persistent property of the file) before any
        // reader opens it. It is kept open for the life of the store.
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .acquire_timeout(pool.acquire_timeout)
            .idle_timeout(None)
            .max_lifetime(None)
            // A local file does not go stale; a ping per acquire would cost a
            // round trip to the connection's worker thread on every query.
            .test_before_acquire(false)
            .before_acquire(|conn, _| Box::pin(discard_if_left_in_transaction(conn)))
            .connect_with(options.clone())
            .await
            .map_err(unavailable)?;
        let read = SqlitePoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(pool.acquire_timeout)
            .test_before_acquire(false)
            .connect_with(options)
            .await
            .map_err(unavailable)?;
        Ok(SqliteStore { write, read })
    }

    /// A write transaction on the single writer connection.
    /// One UPDATE of an org's or a user's two token-limit columns.
    async fn set_token_limits(
        &self,
        sql: &'static str,
        id: Uuid,
        limits: TokenLimits,
    ) -> Result<(), StoreError> {
        let done = sqlx::query(sql)
            .bind(id)
            .bind(i64::try_from(limits.per_minute).unwrap_or(i64::MAX))
            .bind(i64::try_from(limits.per_day).unwrap_or(i64::MAX))
            .bind(now_micros())
            .execute(&self.write)
            .await
            .map_err(map_err)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        self.write
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(map_err)
    }

    /// The writer connection for a write that finishes work already done (a
    /// turn's final write, the flusher's batch, the dead-stream sweep): it
    /// waits up to [`PoolConfig::PATIENT_ACQUIRE`], not the request paths'
    /// short wait. Begin with `BEGIN IMMEDIATE` on it, as [`Self::begin_write`].
    async fn patient_writer(&self) -> Result<PoolConnection<Sqlite>, StoreError> {
        patient_acquire(&self.write, PoolConfig::PATIENT_ACQUIRE)
            .await
            .map_err(map_err)
    }
}

/// Pool hook of the writer: `Ok(false)` (close it, open a fresh one) when
/// the connection still counts an open transaction although nobody holds it.
///
/// That happens after a failed statement or `COMMIT` (a full disk,
/// `SQLITE_FULL`/`SQLITE_IOERR`): SQLite may already have rolled the
/// transaction back itself, so the `ROLLBACK` sqlx queues when the
/// `Transaction` is dropped fails ("no transaction is active") and sqlx's
/// depth counter stays at 1. Every later `BEGIN IMMEDIATE` on that connection
/// is then refused ("begin_with at non-zero transaction depth") until restart.
/// On the happy path the depth is 0 and this costs nothing; when a dropped
/// transaction's rollback is merely still queued, the ping waits for it.
async fn discard_if_left_in_transaction(conn: &mut SqliteConnection) -> Result<bool, sqlx::Error> {
    if !conn.is_in_transaction() {
        return Ok(true);
    }
    conn.ping().await?;
    if conn.is_in_transaction() {
        tracing::warn!("discarding the SQLite writer connection left inside a failed transaction");
        return Ok(false);
    }
    Ok(true)
}

fn uuid<T: Into<Uuid>>(id: T) -> Uuid {
    id.into()
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    /// Reads and writes: a disk that is full (or failing) leaves reads
    /// working, so a `SELECT 1` alone would call the store healthy while
    /// every write fails. The write probe commits a one-page change that
    /// leaves the data as it was (`user_version` set to its own value; sqlx's
    /// migrations keep their state in a table, not there).
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.read)
            .await
            .map_err(map_err)?;
        let mut tx = self.begin_write().await?;
        let version: i64 = sqlx::query_scalar("PRAGMA user_version")
            .fetch_one(&mut *tx)
            .await
            .map_err(map_err)?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "PRAGMA user_version = {version}"
        )))
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        tx.commit().await.map_err(map_err)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        migrations::migrator()
            .run(&self.write)
            .await
            .map_err(|e| map_err(sqlx::Error::Migrate(Box::new(e))))
    }

    async fn close(&self) {
        self.read.close().await;
        self.write.close().await;
    }

    // ---- tenancy -------------------------------------------------------

    async fn create_org(&self, org: &NewOrg) -> Result<Org, StoreError> {
        let now = now_micros();
        let row = sqlx::query(concat!(
            "INSERT INTO orgs (id, name, slug, metadata, created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?5) RETURNING ",
            org_columns!()
        ))
        .bind(uuid(org.id))
        .bind(&org.name)
        .bind(org.slug.as_str())
        .bind(json_text(&org.metadata))
        .bind(now)
        .fetch_one(&self.write)
        .await
        .map_err(map_err)?;
        rows::org(&row)
    }

    async fn list_orgs(&self) -> Result<Vec<Org>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            org_columns!(),
            " FROM orgs WHERE deleted_at IS NULL ORDER BY created_at, id"
        ))
        .fetch_all(&self.read)
        .await
        .map_err(map_err)?;
        rows.iter().map(rows::org).collect()
    }

    async fn find_org(&self, id_or_slug: &str) -> Result<Org, StoreError> {
        // A slug may itself look like a UUID; an id match wins.
        let id = Uuid::parse_str(id_or_slug).ok();
        let row = sqlx::query(concat!(
            "SELECT ",
            org_columns!(),
            " FROM orgs WHERE deleted_at IS NULL AND (id = ?1 OR slug = ?2) \
             ORDER BY id = ?1 DESC LIMIT 1"
        ))
        .bind(id)
        .bind(id_or_slug)
        .fetch_optional(&self.read)
        .await
        .map_err(map_err)?;
        row.as_ref().map(rows::org).ok_or(StoreError::NotFound)?
    }

    async fn set_org_rate_limit(
        &self,
        org: OrgId,
        limit: Option<RateLimitOverride>,
    ) -> Result<(), StoreError> {
        let done = sqlx::query(
            "UPDATE orgs SET rate_limit_burst = ?2, rate_limit_per_second = ?3, updated_at = ?4 \
             WHERE id = ?1 AND deleted_at IS NULL",
        )
        .bind(uuid(org))
        .bind(limit.map(|l| i64::from(l.burst)))
        .bind(limit.map(|l| l.per_second))
        .bind(now_micros())
        .execute(&self.write)
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
            "UPDATE orgs SET tokens_per_minute = ?2, tokens_per_day = ?3, updated_at = ?4 \
             WHERE id = ?1 AND deleted_at IS NULL",
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
            "UPDATE users SET tokens_per_minute = ?2, tokens_per_day = ?3, updated_at = ?4 \
             WHERE id = ?1 AND deleted_at IS NULL",
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
        const TOTALS: &str = "SELECT count(*) AS turns, sum(prompt_tokens) AS prompt_tokens, \
                sum(completion_tokens) AS completion_tokens, sum(cost_micro_usd) AS cost_micro_usd \
             FROM usage_ledger WHERE org_id = ?1 AND (?2 IS NULL OR user_id = ?2) \
               AND created_at >= ?3 AND created_at < ?4";
        const BY_MODEL: &str = "SELECT model AS key, count(*) AS turns, sum(prompt_tokens) AS prompt_tokens, \
                sum(completion_tokens) AS completion_tokens, sum(cost_micro_usd) AS cost_micro_usd \
             FROM usage_ledger WHERE org_id = ?1 AND (?2 IS NULL OR user_id = ?2) \
               AND created_at >= ?3 AND created_at < ?4 GROUP BY 1 ORDER BY 1";
        const BY_USER: &str = "SELECT lower(hex(user_id)) AS key, count(*) AS turns, \
                sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens, \
                sum(cost_micro_usd) AS cost_micro_usd \
             FROM usage_ledger WHERE org_id = ?1 AND (?2 IS NULL OR user_id = ?2) \
               AND created_at >= ?3 AND created_at < ?4 GROUP BY 1 ORDER BY 1";
        const BY_DAY: &str = "SELECT strftime('%Y-%m-%d', created_at / 1000000, 'unixepoch') AS key, \
                count(*) AS turns, sum(prompt_tokens) AS prompt_tokens, \
                sum(completion_tokens) AS completion_tokens, sum(cost_micro_usd) AS cost_micro_usd \
             FROM usage_ledger WHERE org_id = ?1 AND (?2 IS NULL OR user_id = ?2) \
               AND created_at >= ?3 AND created_at < ?4 GROUP BY 1 ORDER BY 1";
        let bind = |sql: &'static str| {
            sqlx::query(sql)
                .bind(uuid(org))
                .bind(user.map(uuid))
                .bind(micros(from))
                .bind(micros(to))
        };
        let row = bind(TOTALS).fetch_one(&self.read).await.map_err(map_err)?;
        let totals = rows::usage_totals(&row)?;
        let groups = match group_by {
            None => Vec::new(),
            Some(group) => {
                let sql = match group {
                    UsageGroup::Model => BY_MODEL,
                    UsageGroup::User => BY_USER,
                    UsageGroup::Day => BY_DAY,
                };
                let found = bind(sql).fetch_all(&self.read).await.map_err(map_err)?;
                let mut groups = Vec::with_capacity(found.len());
                for row in &found {
                    let mut key: String = row.try_get("key").map_err(map_err)?;
                    if group == UsageGroup::User {
                        // hex(blob) → the UUID's usual spelling.
                        key = Uuid::parse_str(&key).map(|u| u.to_string()).unwrap_or(key);
                    }
                    groups.push((key, rows::usage_totals(row)?));
                }
                groups
            }
        };
        Ok(UsageReport { totals, groups })
    }

    async fn set_org_policy(&self, org: OrgId, policy: &OrgPolicy) -> Result<(), StoreError> {
        let done = sqlx::query(
            "UPDATE orgs SET allowed_models = ?2, system_prompt = ?3, updated_at = ?4 \
             WHERE id = ?1 AND deleted_at IS NULL",
        )
        .bind(uuid(org))
        .bind(rows::allowed_models_text(policy))
        .bind(policy.system_prompt.as_deref())
        .bind(now_micros())
        .execute(&self.write)
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
        let row = sqlx::query(concat!(
            "INSERT INTO users (id, org_id, email, name, role, created_at, updated_at) \
             SELECT ?1, o.id, ?3, ?4, ?5, ?6, ?6 FROM orgs o WHERE o.id = ?2 AND o.deleted_at IS NULL \
             RETURNING ",
            user_columns!()
        ))
        .bind(uuid(user.id))
        .bind(uuid(user.org_id))
        .bind(user.email.as_str())
        .bind(&user.name)
        .bind(user.role.as_str())
        .bind(now_micros())
        .fetch_optional(&self.write)
        .await
        .map_err(map_err)?;
        row.as_ref().map(rows::user).ok_or(StoreError::NotFound)?
    }

    async fn list_users(&self, org: OrgId) -> Result<Vec<User>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            user_columns!(),
            " FROM users WHERE org_id = ?1 AND deleted_at IS NULL ORDER BY created_at, id"
        ))
        .bind(uuid(org))
        .fetch_all(&self.read)
        .await
        .map_err(map_err)?;
        rows.iter().map(rows::user).collect()
    }

    async fn delete_user(&self, org: OrgId, user: UserId) -> Result<(), StoreError> {
        let done = sqlx::query(
            "UPDATE users SET deleted_at = ?3, updated_at = ?3 \
             WHERE id = ?1 AND org_id = ?2 AND deleted_at IS NULL",
        )
        .bind(uuid(user))
        .bind(uuid(org))
        .bind(now_micros())
        .execute(&self.write)
        .await
        .map_err(map_err)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    async fn has_orgs(&self) -> Result<bool, StoreError> {
        // Deleted orgs count: seeding is for a database nobody has used yet.
        let row = sqlx::query("SELECT EXISTS (SELECT 1 FROM orgs) AS any_org")
            .fetch_one(&self.read)
            .await
            .map_err(map_err)?;
        row.try_get::<bool, _>("any_org").map_err(map_err)
    }

    // ---- authentication -------------------------------------------------

    async fn find_principal(&self, user: UserId) -> Result<Option<Principal>, StoreError> {
        let row = sqlx::query(
            "SELECT u.id AS user_id, u.org_id, u.email, u.role, \
                    o.rate_limit_burst, o.rate_limit_per_second, \
                    o.allowed_models, o.system_prompt, \
                    o.tokens_per_minute AS org_tpm, o.tokens_per_day AS org_tpd, \
                    u.tokens_per_minute AS user_tpm, u.tokens_per_day AS user_tpd \
             FROM users u JOIN orgs o ON o.id = u.org_id \
             WHERE u.id = ?1 AND u.deleted_at IS NULL AND o.deleted_at IS NULL",
        )
        .bind(uuid(user))
        .fetch_optional(&self.read)
        .await
        .map_err(map_err)?;
        row.map(|r| rows::principal(&r, false)).transpose()
    }

    async fn create_api_key(&self, key: &NewApiKey) -> Result<ApiKey, StoreError> {
        // Only for a live user of that org (nothing inserted → NotFound).
        let row = sqlx::query(concat!(
            "INSERT INTO api_keys (id, org_id, user_id, key_hash, prefix, name, created_at) \
             SELECT ?1, u.org_id, u.id, ?4, ?5, ?6, ?7 FROM users u \
             WHERE u.id = ?3 AND u.org_id = ?2 AND u.deleted_at IS NULL \
             RETURNING ",
            api_key_columns!()
        ))
        .bind(uuid(key.id))
        .bind(uuid(key.org_id))
        .bind(uuid(key.user_id))
        .bind(key.hash.as_slice())
        .bind(&key.prefix)
        .bind(&key.name)
        .bind(now_micros())
        .fetch_optional(&self.write)
        .await
        .map_err(map_err)?;
        row.as_ref()
            .map(rows::api_key)
            .ok_or(StoreError::NotFound)?
    }

    async fn list_api_keys(&self, org: OrgId) -> Result<Vec<ApiKey>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            api_key_columns!(),
            " FROM api_keys WHERE org_id = ?1 ORDER BY created_at DESC, id DESC"
        ))
        .bind(uuid(org))
        .fetch_all(&self.read)
        .await
        .map_err(map_err)?;
        rows.iter().map(rows::api_key).collect()
    }

    async fn revoke_api_key(&self, id: ApiKeyId) -> Result<(), StoreError> {
        // COALESCE keeps the first revocation time: revoking twice is a no-op.
        let row = sqlx::query(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?2) WHERE id = ?1 RETURNING id",
        )
        .bind(uuid(id))
        .bind(now_micros())
        .fetch_optional(&self.write)
        .await
        .map_err(map_err)?;
        row.map(drop).ok_or(StoreError::NotFound)
    }

    async fn find_principal_by_key(&self, hash: &[u8]) -> Result<Option<Principal>, StoreError> {
        let row = sqlx::query(
            "SELECT k.id AS api_key_id, u.id AS user_id, u.org_id, u.email, u.role, \
                    o.rate_limit_burst, o.rate_limit_per_second, \
                    o.allowed_models, o.system_prompt, \
                    o.tokens_per_minute AS org_tpm, o.tokens_per_day AS org_tpd, \
                    u.tokens_per_minute AS user_tpm, u.tokens_per_day AS user_tpd \
             FROM api_keys k \
             JOIN users u ON u.id = k.user_id AND u.org_id = k.org_id \
             JOIN orgs o ON o.id = u.org_id \
             WHERE k.key_hash = ?1 AND k.revoked_at IS NULL \
               AND u.deleted_at IS NULL AND o.deleted_at IS NULL",
        )
        .bind(hash)
        .fetch_optional(&self.read)
        .await
        .map_err(map_err)?;
        row.map(|r| rows::principal(&r, true)).transpose()
    }

    async fn touch_api_keys(&self, used: &[(ApiKeyId, DateTime<Utc>)]) -> Result<(), StoreError> {
        if used.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_write().await?;
        for (id, at) in used {
            // MAX: batches may arrive out of order; never move a key's
            // last use backwards.
            sqlx::query(
                "UPDATE api_keys SET last_used_at = MAX(COALESCE(last_used_at, ?2), ?2) \
                 WHERE id = ?1",
            )
            .bind(uuid(*id))
            .bind(micros(*at))
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        }
        tx.commit().await.map_err(map_err)
    }

    // ---- chats ------------------------------------------------------------

    async fn get_chat(&self, org: OrgId, chat: ChatId) -> Result<Chat, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            chat_columns!(),
            " FROM chats WHERE id = ?1 AND org_id = ?2 AND deleted_at IS NULL"
        ))
        .bind(uuid(chat))
        .bind(uuid(org))
        .fetch_optional(&self.read)
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
        // Two fixed statements rather than one with `?3 IS NULL OR …`, so
        // each gets a plan that walks `chats_user_recent` from the right spot.
        let query = match after {
            None => sqlx::query(concat!(
                "SELECT ",
                chat_columns!(),
                " FROM chats WHERE org_id = ?1 AND user_id = ?2 AND deleted_at IS NULL \
                 ORDER BY updated_at DESC, id DESC LIMIT ?3"
            ))
            .bind(uuid(org))
            .bind(uuid(user))
            .bind(i64::from(limit)),
            Some(cursor) => sqlx::query(concat!(
                "SELECT ",
                chat_columns!(),
                " FROM chats WHERE org_id = ?1 AND user_id = ?2 AND deleted_at IS NULL \
                   AND (updated_at, id) < (?4, ?5) \
                 ORDER BY updated_at DESC, id DESC LIMIT ?3"
            ))
            .bind(uuid(org))
            .bind(uuid(user))
            .bind(i64::from(limit))
            .bind(micros(cursor.updated_at))
            .bind(uuid(cursor.id)),
        };
        let rows = query.fetch_all(&self.read).await.map_err(map_err)?;
        rows.iter().map(rows::chat).collect()
    }

    async fn rename_chat(
        &self,
        org: OrgId,
        chat: ChatId,
        title: &ChatTitle,
    ) -> Result<Chat, StoreError> {
        let row = sqlx::query(concat!(
            "UPDATE chats SET title = ?3, updated_at = ?4 \
             WHERE id = ?1 AND org_id = ?2 AND deleted_at IS NULL RETURNING ",
            chat_columns!()
        ))
        .bind(uuid(chat))
        .bind(uuid(org))
        .bind(title.as_str())
        .bind(now_micros())
        .fetch_optional(&self.write)
        .await
        .map_err(map_err)?;
        row.as_ref().map(rows::chat).ok_or(StoreError::NotFound)?
    }

    async fn delete_chat(&self, org: OrgId, chat: ChatId) -> Result<(), StoreError> {
        let done = sqlx::query(
            "UPDATE chats SET deleted_at = ?3, updated_at = ?3 \
             WHERE id = ?1 AND org_id = ?2 AND deleted_at IS NULL",
        )
        .bind(uuid(chat))
        .bind(uuid(org))
        .bind(now_micros())
        .execute(&self.write)
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
        let rows = sqlx::query(concat!(
            "SELECT ",
            message_columns!(),
            " FROM messages \
             WHERE chat_id = ?1 AND org_id = ?2 AND seq < ?3 \
               AND EXISTS (SELECT 1 FROM chats c \
                           WHERE c.id = ?1 AND c.org_id = ?2 AND c.deleted_at IS NULL) \
             ORDER BY seq DESC LIMIT ?4"
        ))
        .bind(uuid(chat))
        .bind(uuid(org))
        .bind(before.unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(&self.read)
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
        let now = now_micros();
        // Dropping `tx` on an early return rolls everything back.
        let mut tx = self.begin_write().await?;

        if let Some(claim) = &turn.idempotency {
            // "Drop the expired (or abandoned) key, then claim" as one
            // upsert: a live key is left alone (0 rows → Conflict), an expired
            // one is replaced, and so is an unanswered one older than
            // ABANDONED_CLAIM_SECS whose reply is no longer `streaming` (a
            // claim from before migration 0007, with no message, by its age
            // alone).
            let claimed = sqlx::query(
                "INSERT INTO idempotency_keys \
                    (user_id, key, request_hash, response, created_at, message_id) \
                 VALUES (?1, ?2, ?3, NULL, ?4, ?7) \
                 ON CONFLICT (user_id, key) DO UPDATE \
                    SET request_hash = excluded.request_hash, response = NULL, \
                        created_at = excluded.created_at, message_id = excluded.message_id \
                  WHERE idempotency_keys.created_at < ?5 \
                     OR (idempotency_keys.response IS NULL AND idempotency_keys.created_at < ?6 \
                         AND NOT EXISTS (SELECT 1 FROM messages r \
                             WHERE r.id = idempotency_keys.message_id \
                               AND r.status = 'streaming'))",
            )
            .bind(uuid(turn.user))
            .bind(&claim.key)
            .bind(&claim.request_hash)
            .bind(now)
            .bind(now - IDEMPOTENCY_TTL_MICROS)
            .bind(now - ABANDONED_CLAIM_MICROS)
            .bind(uuid(turn.assistant_message_id))
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
            if claimed.rows_affected() == 0 {
                tx.rollback().await.map_err(map_err)?;
                return Err(StoreError::Conflict {
                    constraint: "idempotency_keys".into(),
                });
            }
        }

        // The chat's message_count is the sequence: the turn takes the two
        // numbers after it.
        let (chat_id, count) = match &turn.chat {
            TurnChat::New { id, title } => {
                // From the live user row, so a chat can only be created for a
                // user of `turn.org`.
                let count = if turn.system.is_some() { 3_i64 } else { 2 };
                let done = sqlx::query(
                    "INSERT INTO chats \
                        (id, org_id, user_id, title, message_count, model, created_at, updated_at) \
                     SELECT ?1, u.org_id, u.id, ?4, ?6, ?7, ?5, ?5 FROM users u \
                     WHERE u.id = ?3 AND u.org_id = ?2 AND u.deleted_at IS NULL",
                )
                .bind(uuid(*id))
                .bind(uuid(turn.org))
                .bind(uuid(turn.user))
                .bind(title)
                .bind(now)
                .bind(count)
                .bind(&turn.model)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
                if done.rows_affected() == 0 {
                    return Err(StoreError::NotFound);
                }
                if let Some(system) = &turn.system {
                    sqlx::query(
                        "INSERT INTO messages \
                            (id, chat_id, org_id, role, content, status, token_count, seq, \
                             created_at, updated_at) \
                         VALUES (?1, ?2, ?3, 'system', ?4, 'complete', NULL, 1, ?5, ?5)",
                    )
                    .bind(Uuid::new_v4())
                    .bind(uuid(*id))
                    .bind(uuid(turn.org))
                    .bind(system)
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(map_err)?;
                }
                (*id, count)
            }
            TurnChat::Existing(id) => {
                let row = sqlx::query(
                    "UPDATE chats SET message_count = message_count + 2, updated_at = ?3, \
                        model = ?4 \
                     WHERE id = ?1 AND org_id = ?2 AND deleted_at IS NULL \
                     RETURNING message_count",
                )
                .bind(uuid(*id))
                .bind(uuid(turn.org))
                .bind(now)
                .bind(&turn.model)
                .fetch_optional(&mut *tx)
                .await
                .map_err(map_err)?;
                let Some(row) = row else {
                    return Err(StoreError::NotFound);
                };
                (*id, row.try_get::<i64, _>(0).map_err(map_err)?)
            }
        };

        let rows = sqlx::query(concat!(
            "INSERT INTO messages \
                (id, chat_id, org_id, role, content, status, token_count, seq, model, \
                 created_at, updated_at) \
             VALUES (?1, ?3, ?4, 'user', ?5, 'complete', NULL, ?6, NULL, ?8, ?8), \
                    (?2, ?3, ?4, 'assistant', '', 'streaming', NULL, ?7, ?9, ?8, ?8) \
             RETURNING ",
            message_columns!()
        ))
        .bind(uuid(turn.user_message_id))
        .bind(uuid(turn.assistant_message_id))
        .bind(uuid(chat_id))
        .bind(uuid(turn.org))
        .bind(&turn.content)
        .bind(count - 1)
        .bind(count)
        .bind(now)
        .bind(&turn.model)
        .fetch_all(&mut *tx)
        .await
        .map_err(map_err)?;
        let messages = rows
            .iter()
            .map(rows::message)
            .collect::<Result<Vec<_>, _>>()?;
        tx.commit().await.map_err(map_err)?;
        debug_assert_eq!(chat_id, turn.chat_id());
        turn.begun_from(messages)
            .ok_or_else(|| StoreError::Other("a turn did not insert its two messages".into()))
    }

    async fn find_messages(
        &self,
        org: OrgId,
        ids: &[MessageId],
    ) -> Result<Vec<Message>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut query = sqlx::QueryBuilder::<sqlx::Sqlite>::new(concat!(
            "SELECT ",
            message_columns!(),
            " FROM messages WHERE org_id = "
        ));
        query.push_bind(uuid(org)).push(" AND id IN (");
        let mut each = query.separated(", ");
        for id in ids {
            each.push_bind(uuid(*id));
        }
        each.push_unseparated(")");
        let rows = query.build().fetch_all(&self.read).await.map_err(map_err)?;
        rows.iter().map(rows::message).collect()
    }

    async fn finish_message(&self, msg: &FinishedMessage) -> Result<Message, StoreError> {
        let now = now_micros();
        let mut writer = self.patient_writer().await?;
        let mut tx = writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(map_err)?;
        let row = sqlx::query(concat!(
            "UPDATE messages SET content = ?4, status = ?5, token_count = ?6, updated_at = ?7, \
                prompt_tokens = ?8, completion_tokens = ?6, usage_source = ?9, event_lengths = ?10 \
             WHERE id = ?1 AND org_id = ?2 AND chat_id = ?3 RETURNING ",
            message_columns!()
        ))
        .bind(uuid(msg.id))
        .bind(uuid(msg.org))
        .bind(uuid(msg.chat))
        .bind(&msg.content)
        .bind(msg.status.as_str())
        .bind(msg.usage.completion_tokens)
        .bind(now)
        .bind(msg.usage.prompt_tokens)
        .bind(msg.usage.source.as_str())
        .bind(&msg.event_lengths)
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_err)?;
        let Some(row) = row else {
            return Err(StoreError::NotFound);
        };
        let message = rows::message(&row)?;
        // The ledger row, in the same transaction as the final status:
        // exactly one per turn (rewritten if the message is finished again).
        sqlx::query(
            "INSERT INTO usage_ledger (turn_id, org_id, user_id, chat_id, model, status, \
                prompt_tokens, completion_tokens, source, cost_micro_usd, created_at) \
             SELECT m.id, m.org_id, c.user_id, m.chat_id, coalesce(m.model, 'unknown'), m.status, \
                    m.prompt_tokens, m.completion_tokens, m.usage_source, ?2, ?3 \
             FROM messages m JOIN chats c ON c.id = m.chat_id WHERE m.id = ?1 \
             ON CONFLICT (turn_id) DO UPDATE SET status = excluded.status, \
                prompt_tokens = excluded.prompt_tokens, \
                completion_tokens = excluded.completion_tokens, source = excluded.source, \
                cost_micro_usd = excluded.cost_micro_usd, created_at = excluded.created_at",
        )
        .bind(uuid(msg.id))
        .bind(msg.cost.cost_micro_usd)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        sqlx::query("UPDATE chats SET updated_at = ?3 WHERE id = ?1 AND org_id = ?2")
            .bind(uuid(msg.chat))
            .bind(uuid(msg.org))
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        if let Some((user, key, response)) = &msg.idempotent_response {
            // Only into the claim this message holds (or one from before
            // migration 0007): a retry that took an abandoned key over keeps
            // its own.
            sqlx::query(
                "UPDATE idempotency_keys SET response = ?3 WHERE user_id = ?1 AND key = ?2 \
                   AND (message_id = ?4 OR message_id IS NULL)",
            )
            .bind(uuid(*user))
            .bind(key)
            .bind(json_text(response))
            .bind(uuid(msg.id))
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        }
        tx.commit().await.map_err(map_err)?;
        Ok(message)
    }

    async fn record_usage(&self, entry: &LedgerEntry) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO usage_ledger (turn_id, org_id, user_id, chat_id, model, status, \
                prompt_tokens, completion_tokens, source, cost_micro_usd, created_at) \
             VALUES (?1, ?2, ?3, NULL, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
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
        .bind(now_micros())
        .execute(&self.write)
        .await
        .map_err(map_err)?;
        Ok(())
    }

    async fn save_partials(&self, partials: &[PartialText]) -> Result<(), StoreError> {
        if partials.is_empty() {
            return Ok(());
        }
        let now = now_micros();
        let mut writer = self.patient_writer().await?;
        let mut tx = writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(map_err)?;
        for partial in partials {
            // updated_at moves even when the text did not: it is the
            // heartbeat that keeps a live stream from looking stale.
            sqlx::query(
                "UPDATE messages SET content = ?2, updated_at = ?3, event_lengths = ?4, \
                    prompt_tokens = CASE WHEN ?5 > 0 THEN ?5 ELSE prompt_tokens END \
                 WHERE id = ?1 AND status = 'streaming'",
            )
            .bind(uuid(partial.id))
            .bind(&partial.content)
            .bind(now)
            .bind(&partial.event_lengths)
            .bind(partial.prompt_tokens)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        }
        tx.commit().await.map_err(map_err)
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
             WHERE id = ?1 AND chat_id = ?2 AND org_id = ?3 \
               AND EXISTS (SELECT 1 FROM chats c \
                           WHERE c.id = ?2 AND c.org_id = ?3 AND c.deleted_at IS NULL)"
        ))
        .bind(uuid(message))
        .bind(uuid(chat))
        .bind(uuid(org))
        .fetch_optional(&self.read)
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
        // One machine, one clock: the app's clock stamped the saves too.
        let now = now_micros();
        let stale = i64::try_from(stale_after.as_micros()).unwrap_or(i64::MAX);
        // One transaction: the estimated usage, the final status and the
        // ledger rows together (SQLite has one writer, so the two statements
        // see the same rows).
        let mut writer = self.patient_writer().await?;
        let mut tx = writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(map_err)?;
        let done = sqlx::query(
            "UPDATE messages SET status = 'interrupted', updated_at = ?2, \
                prompt_tokens = coalesce(prompt_tokens, 0), \
                completion_tokens = (length(content) + 3) / 4, \
                token_count = (length(content) + 3) / 4, usage_source = 'estimated' \
             WHERE status = 'streaming' AND updated_at < ?1",
        )
        .bind(now.saturating_sub(stale))
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        if done.rows_affected() > 0 {
            sqlx::query(
                "INSERT INTO usage_ledger (turn_id, org_id, user_id, chat_id, model, status, \
                    prompt_tokens, completion_tokens, source, cost_micro_usd, created_at) \
                 SELECT m.id, m.org_id, c.user_id, m.chat_id, coalesce(m.model, 'unknown'), \
                        m.status, m.prompt_tokens, m.completion_tokens, m.usage_source, 0, ?1 \
                 FROM messages m JOIN chats c ON c.id = m.chat_id \
                 WHERE m.status = 'interrupted' AND m.updated_at = ?1 \
                 ON CONFLICT (turn_id) DO NOTHING",
            )
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        }
        tx.commit().await.map_err(map_err)?;
        Ok(done.rows_affected())
    }

    // ---- idempotency --------------------------------------------------------

    async fn get_idempotency(
        &self,
        user: UserId,
        key: &str,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT request_hash, response, created_at FROM idempotency_keys \
             WHERE user_id = ?1 AND key = ?2",
        )
        .bind(uuid(user))
        .bind(key)
        .fetch_optional(&self.read)
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
        sqlx::query(
            "DELETE FROM idempotency_keys WHERE user_id = ?1 AND key = ?2 \
               AND response IS NULL AND (message_id = ?3 OR message_id IS NULL)",
        )
        .bind(uuid(user))
        .bind(key)
        .bind(uuid(message))
        .execute(&self.write)
        .await
        .map(drop)
        .map_err(map_err)
    }

    async fn purge_idempotency(&self, older_than: DateTime<Utc>) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM idempotency_keys WHERE created_at < ?1")
            .bind(micros(older_than))
            .execute(&self.write)
            .await
            .map_err(map_err)?;
        Ok(done.rows_affected())
    }
}
