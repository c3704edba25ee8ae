//! The storage contract. Two implementations exist (SQLite, PostgreSQL); both
//! pass the same contract tests. Tenant scoping is part of every chat method's
//! signature: a chat or message of another org is simply `NotFound`.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::ids::{ApiKeyId, ChatId, MessageId, OrgId, UserId};
use crate::model::{
    ApiKey, BegunTurn, Chat, ChatCursor, ChatTitle, FinishedMessage, IdempotencyRecord,
    LedgerEntry, Message, NewApiKey, NewOrg, NewTurn, NewUser, Org, OrgPolicy, PartialText,
    Principal, RateLimitOverride, StoredStream, TokenLimits, UsageGroup, UsageReport, User,
};

#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    /// The row does not exist, is soft-deleted, or belongs to another org.
    #[error("not found")]
    NotFound,
    /// A uniqueness rule was hit; `constraint` names it (e.g. `orgs_slug_key`).
    #[error("conflict on {constraint}")]
    Conflict { constraint: String },
    /// The database could not be reached or timed out; worth retrying later.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("database error: {0}")]
    Other(String),
}

/// How a store's connection pool is sized and how long a caller waits for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// `DB_POOL_MAX`.
    pub max_connections: u32,
    /// How long a request waits for a pooled connection before
    /// `Unavailable` (`DB_ACQUIRE_TIMEOUT_MS`). A turn's final write and the
    /// flusher's batches wait longer ([`PoolConfig::PATIENT_ACQUIRE`]): an
    /// admitted turn must not lose its reply to a moment of contention.
    pub acquire_timeout: std::time::Duration,
    /// `DB_GROUP_COMMIT`: turn writes that arrive together share
    /// transactions (PostgreSQL; SQLite has one writer anyway).
    pub group_commit: bool,
}

/// Counters of a store's group commit, for `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupCommitStats {
    /// Transactions (or lone statements) that carried turn writes.
    pub transactions: u64,
    /// Turn writes they carried.
    pub writes: u64,
    /// Batches that failed and were rolled back, their writes then run alone.
    pub fallbacks: u64,
}

impl PoolConfig {
    /// How long writes that finish work already done wait for a connection.
    pub const PATIENT_ACQUIRE: std::time::Duration = std::time::Duration::from_secs(5);

    /// `max_connections` connections, waiting up to 5 s for one (tools, tests).
    pub fn new(max_connections: u32) -> Self {
        Self {
            max_connections,
            acquire_timeout: Self::PATIENT_ACQUIRE,
            group_commit: true,
        }
    }
}

/// Everything confab keeps. All methods are safe to call concurrently from
/// many tasks and, for PostgreSQL, from many processes.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `"sqlite"` or `"postgres"`.
    fn backend(&self) -> &'static str;

    /// One cheap round trip, for `/health`.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Apply this backend's pending migrations (idempotent).
    async fn migrate(&self) -> Result<(), StoreError>;

    /// Close the pool, waiting for connections in use to be returned.
    async fn close(&self);

    /// The group commit's counters, when this store groups its writes.
    fn group_commit_stats(&self) -> Option<GroupCommitStats> {
        None
    }

    // ---- tenancy -------------------------------------------------------

    /// `Conflict` when the id or slug is taken.
    async fn create_org(&self, org: &NewOrg) -> Result<Org, StoreError>;
    /// Orgs that are not deleted, oldest first.
    async fn list_orgs(&self) -> Result<Vec<Org>, StoreError>;
    /// By id or by slug; `NotFound` when deleted.
    async fn find_org(&self, id_or_slug: &str) -> Result<Org, StoreError>;
    /// Set or clear (`None`) the org's own rate limit.
    async fn set_org_rate_limit(
        &self,
        org: OrgId,
        limit: Option<RateLimitOverride>,
    ) -> Result<(), StoreError>;
    /// Set the org's token limits (0 = unlimited).
    async fn set_org_token_limits(&self, org: OrgId, limits: TokenLimits)
    -> Result<(), StoreError>;
    /// Set a user's own token limits (0 = unlimited); `NotFound` for an
    /// unknown or deleted user.
    async fn set_user_token_limits(
        &self,
        user: UserId,
        limits: TokenLimits,
    ) -> Result<(), StoreError>;
    /// The usage ledger of an org (or of one of its users) for turns
    /// finished in `[from, to)`: totals, and groups when asked.
    async fn usage_report(
        &self,
        org: OrgId,
        user: Option<UserId>,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        group_by: Option<UsageGroup>,
    ) -> Result<UsageReport, StoreError>;
    /// Set the org's model allowlist and default system prompt.
    async fn set_org_policy(&self, org: OrgId, policy: &OrgPolicy) -> Result<(), StoreError>;
    /// `NotFound` when the org does not exist; `Conflict` when the id or the
    /// email (within the org) is taken.
    async fn create_user(&self, user: &NewUser) -> Result<User, StoreError>;
    /// Users of the org that are not deleted, oldest first.
    async fn list_users(&self, org: OrgId) -> Result<Vec<User>, StoreError>;
    /// Soft-delete a user: they can no longer authenticate.
    async fn delete_user(&self, org: OrgId, user: UserId) -> Result<(), StoreError>;
    /// Whether any org exists (demo seeding happens only on an empty database).
    async fn has_orgs(&self) -> Result<bool, StoreError>;

    // ---- authentication -------------------------------------------------

    /// The principal for a user id, with the user's *own* org; `None` when the
    /// user or their org is unknown or deleted. Header auth compares the org.
    async fn find_principal(&self, user: UserId) -> Result<Option<Principal>, StoreError>;
    /// `NotFound` when the user is not in that org; `Conflict` on a hash collision.
    async fn create_api_key(&self, key: &NewApiKey) -> Result<ApiKey, StoreError>;
    /// Keys of an org, revoked ones included, newest first.
    async fn list_api_keys(&self, org: OrgId) -> Result<Vec<ApiKey>, StoreError>;
    /// Revoke a key (idempotent); `NotFound` when no such key exists.
    async fn revoke_api_key(&self, id: ApiKeyId) -> Result<(), StoreError>;
    /// The principal for a key hash; `None` when unknown, revoked, or its user
    /// or org is deleted.
    async fn find_principal_by_key(&self, hash: &[u8]) -> Result<Option<Principal>, StoreError>;
    /// Record when keys were last used (batched by the caller).
    async fn touch_api_keys(&self, used: &[(ApiKeyId, DateTime<Utc>)]) -> Result<(), StoreError>;

    // ---- chats ------------------------------------------------------------

    /// A chat of this org that is not deleted.
    async fn get_chat(&self, org: OrgId, chat: ChatId) -> Result<Chat, StoreError>;
    /// The user's own chats, most recently updated first, strictly after `after`.
    async fn list_chats(
        &self,
        org: OrgId,
        user: UserId,
        after: Option<ChatCursor>,
        limit: u32,
    ) -> Result<Vec<Chat>, StoreError>;
    async fn rename_chat(
        &self,
        org: OrgId,
        chat: ChatId,
        title: &ChatTitle,
    ) -> Result<Chat, StoreError>;
    /// Soft-delete; afterwards every method treats the chat as `NotFound`.
    async fn delete_chat(&self, org: OrgId, chat: ChatId) -> Result<(), StoreError>;
    /// The newest `limit` messages with `seq < before` (all when `None`),
    /// returned in conversation order (ascending `seq`).
    async fn list_messages(
        &self,
        org: OrgId,
        chat: ChatId,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError>;

    /// Write a turn's beginning ([`Store::insert_turn`]). A turn written
    /// before — a replay after a COMMIT whose answer was lost — conflicts
    /// with its own rows; then its two messages are read back by their ids
    /// (fresh per turn, so finding them means this very turn was written,
    /// once) and, the reply still `streaming`, are the answer. The one home
    /// of that rule for every backend.
    async fn begin_turn(&self, turn: &NewTurn) -> Result<BegunTurn, StoreError> {
        match self.insert_turn(turn).await {
            Err(StoreError::Conflict { constraint }) => {
                let ids = [turn.user_message_id, turn.assistant_message_id];
                match turn.begun_from(self.find_messages(turn.org, &ids).await?) {
                    Some(begun) => Ok(begun),
                    None => Err(StoreError::Conflict { constraint }),
                }
            }
            other => other,
        }
    }
    /// In ONE transaction: drop the user's expired (> 24 h) or abandoned
    /// (unanswered for [`crate::model::ABANDONED_CLAIM_SECS`] and its reply
    /// no longer `streaming`: finished, or marked `interrupted` by crash
    /// recovery)
    /// idempotency key of the same name, claim the new key if any (for this
    /// turn's assistant message) (`Conflict { constraint:
    /// "idempotency_keys" }` and nothing written when it is taken), create the
    /// chat if new (`NotFound` if an existing one is gone) with its `system`
    /// message first when given, append the user message (`complete`) and the
    /// assistant message (`streaming`, empty, with the turn's model), record
    /// the turn's model on the chat, and bump the chat's `updated_at`.
    /// Callers use [`Store::begin_turn`].
    async fn insert_turn(&self, turn: &NewTurn) -> Result<BegunTurn, StoreError>;
    /// The org's messages with these ids (those that exist, in no order).
    async fn find_messages(
        &self,
        org: OrgId,
        ids: &[MessageId],
    ) -> Result<Vec<Message>, StoreError>;
    /// Set an assistant message's final content, status and usage
    /// (`token_count` = completion tokens), write (or rewrite) its usage-ledger
    /// row with the same figures, bump the chat's `updated_at`, and store the
    /// idempotent response if given (only into a claim this message holds: a
    /// retry that took an abandoned key over keeps its own), in one
    /// transaction.
    async fn finish_message(&self, msg: &FinishedMessage) -> Result<Message, StoreError>;
    /// Write the ledger row of a turn stored in no chat; a second write of
    /// the same turn changes nothing (a turn is counted once).
    async fn record_usage(&self, entry: &LedgerEntry) -> Result<(), StoreError>;
    /// Save growing partial texts of many streaming messages at once (one
    /// statement or one transaction). Rows no longer `streaming` are left alone.
    /// Each partial's event boundaries are saved with its text.
    async fn save_partials(&self, partials: &[PartialText]) -> Result<(), StoreError>;
    /// One message of a chat of this org with its stored event boundaries
    /// (SPEC §14); `NotFound` when the message is not in that chat.
    async fn stream_state(
        &self,
        org: OrgId,
        chat: ChatId,
        message: MessageId,
    ) -> Result<StoredStream, StoreError>;
    /// Mark `streaming` messages not saved for `stale_after` as `interrupted`
    /// (they belong to a dead process), each with an estimated usage (the
    /// prompt figure saved so far, the text's length / 4) and its ledger row
    /// in the same transaction. Measured on the database's clock — the
    /// one that stamped the saves — so instances with skewed clocks never take
    /// each other's live streams for dead ones. Returns how many.
    async fn interrupt_stale_streams(
        &self,
        stale_after: std::time::Duration,
    ) -> Result<u64, StoreError>;

    // ---- idempotency --------------------------------------------------------

    /// The user's stored key, if any (expired ones included; the caller decides).
    async fn get_idempotency(
        &self,
        user: UserId,
        key: &str,
    ) -> Result<Option<IdempotencyRecord>, StoreError>;
    /// Forget a key whose request (the turn of assistant message `message`)
    /// failed, so that a retry can run again. A key that holds a response is
    /// kept: its request was answered (a final write whose commit went
    /// through although its caller saw an error), and a retry must get that
    /// answer, not run the turn twice. So is a key another turn claimed since.
    async fn release_idempotency(
        &self,
        user: UserId,
        key: &str,
        message: MessageId,
    ) -> Result<(), StoreError>;
    /// Delete keys created before `older_than`. Returns how many.
    async fn purge_idempotency(&self, older_than: DateTime<Utc>) -> Result<u64, StoreError>;
}
