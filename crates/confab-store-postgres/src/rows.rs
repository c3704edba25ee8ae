//! Row ⇄ domain mapping.
//!
//! Columns are read by name with `Row::try_get`; the SELECT lists live next
//! to the mapping functions (as macros, so they can be `concat!`ed into
//! `&'static str` queries) to keep the two in step.

use chrono::{DateTime, Utc};
use confab_core::model::{OrgPolicy, TokenLimits, Usage, UsageSource, UsageTotals};
use confab_core::{
    ApiKey, Chat, IdempotencyRecord, Message, Org, Principal, RateLimitOverride, StoreError, User,
};
use sqlx::Row;
use sqlx::postgres::PgRow;
use uuid::Uuid;

use crate::error::{corrupt, map_err};

/// Columns read by [`org`].
macro_rules! org_columns {
    () => {
        "id, name, slug, metadata, rate_limit_burst, rate_limit_per_second, allowed_models, \
         system_prompt, tokens_per_minute, tokens_per_day, created_at, updated_at"
    };
}
/// Columns read by [`user`].
macro_rules! user_columns {
    () => {
        "id, org_id, email, name, role, created_at, updated_at"
    };
}
/// Columns read by [`chat`].
macro_rules! chat_columns {
    () => {
        "id, org_id, user_id, title, message_count, model, created_at, updated_at"
    };
}
/// Columns read by [`message`].
macro_rules! message_columns {
    () => {
        "id, chat_id, org_id, role, content, status, token_count, seq, model, prompt_tokens, \
         completion_tokens, usage_source, created_at, updated_at"
    };
}
/// Columns read by [`finished_message`]: a message's but its content (the
/// writer has it; a final write does not read back the text it sent).
macro_rules! finished_columns {
    () => {
        "id, chat_id, org_id, role, status, token_count, seq, model, prompt_tokens, \
         completion_tokens, usage_source, created_at, updated_at"
    };
}
/// Columns read by [`api_key`].
macro_rules! api_key_columns {
    () => {
        "id, org_id, user_id, prefix, name, created_at, last_used_at, revoked_at"
    };
}
pub(crate) use {
    api_key_columns, chat_columns, finished_columns, message_columns, org_columns, user_columns,
};

fn get<'r, T>(row: &'r PgRow, column: &str) -> Result<T, StoreError>
where
    T: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    row.try_get(column).map_err(map_err)
}

fn get_time(row: &PgRow, column: &str) -> Result<DateTime<Utc>, StoreError> {
    get(row, column)
}

fn get_opt_time(row: &PgRow, column: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
    get(row, column)
}

fn get_id<T: From<Uuid>>(row: &PgRow, column: &str) -> Result<T, StoreError> {
    Ok(T::from(get::<Uuid>(row, column)?))
}

fn parse<T>(row: &PgRow, column: &str) -> Result<T, StoreError>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    let text: String = get(row, column)?;
    text.parse().map_err(|e| corrupt(column, e))
}

fn get_json(row: &PgRow, column: &str) -> Result<Option<serde_json::Value>, StoreError> {
    get(row, column)
}

/// The org's override when both columns are set (a CHECK keeps them paired).
fn rate_limit(row: &PgRow) -> Result<Option<RateLimitOverride>, StoreError> {
    let burst: Option<i32> = get(row, "rate_limit_burst")?;
    let per_second: Option<f64> = get(row, "rate_limit_per_second")?;
    let (Some(burst), Some(per_second)) = (burst, per_second) else {
        return Ok(None);
    };
    let burst = u32::try_from(burst).map_err(|e| corrupt("rate_limit_burst", e))?;
    RateLimitOverride::new(burst, per_second)
        .map(Some)
        .map_err(|e| corrupt("rate limit", e))
}

/// The org's model allowlist and system prompt.
pub(crate) fn policy(row: &PgRow) -> Result<OrgPolicy, StoreError> {
    Ok(OrgPolicy {
        allowed_models: get(row, "allowed_models")?,
        system_prompt: get(row, "system_prompt")?,
    })
}

/// Token limits from two nullable columns (NULL = 0 = unlimited).
pub(crate) fn token_limits(
    row: &PgRow,
    per_minute: &str,
    per_day: &str,
) -> Result<TokenLimits, StoreError> {
    let read = |column: &str| -> Result<u64, StoreError> {
        let v: Option<i64> = get(row, column)?;
        u64::try_from(v.unwrap_or(0)).map_err(|e| corrupt(column, e))
    };
    Ok(TokenLimits {
        per_minute: read(per_minute)?,
        per_day: read(per_day)?,
    })
}

/// A usage report row: `turns, prompt_tokens, completion_tokens, cost`.
pub(crate) fn usage_totals(row: &PgRow) -> Result<UsageTotals, StoreError> {
    Ok(UsageTotals {
        turns: get(row, "turns")?,
        prompt_tokens: get::<Option<i64>>(row, "prompt_tokens")?.unwrap_or(0),
        completion_tokens: get::<Option<i64>>(row, "completion_tokens")?.unwrap_or(0),
        cost_micro_usd: get::<Option<i64>>(row, "cost_micro_usd")?.unwrap_or(0),
    })
}

/// A message's usage, when its three columns are set.
fn usage(row: &PgRow) -> Result<Option<Usage>, StoreError> {
    let prompt: Option<i64> = get(row, "prompt_tokens")?;
    let completion: Option<i64> = get(row, "completion_tokens")?;
    let source: Option<String> = get(row, "usage_source")?;
    let (Some(prompt_tokens), Some(completion_tokens), Some(source)) = (prompt, completion, source)
    else {
        return Ok(None);
    };
    Ok(Some(Usage {
        prompt_tokens,
        completion_tokens,
        source: source
            .parse::<UsageSource>()
            .map_err(|e| corrupt("usage_source", e))?,
    }))
}

pub(crate) fn org(row: &PgRow) -> Result<Org, StoreError> {
    Ok(Org {
        id: get_id(row, "id")?,
        name: get(row, "name")?,
        slug: get(row, "slug")?,
        metadata: get_json(row, "metadata")?.unwrap_or(serde_json::Value::Null),
        rate_limit: rate_limit(row)?,
        policy: policy(row)?,
        token_limits: token_limits(row, "tokens_per_minute", "tokens_per_day")?,
        created_at: get_time(row, "created_at")?,
        updated_at: get_time(row, "updated_at")?,
    })
}

pub(crate) fn user(row: &PgRow) -> Result<User, StoreError> {
    Ok(User {
        id: get_id(row, "id")?,
        org_id: get_id(row, "org_id")?,
        email: get(row, "email")?,
        name: get(row, "name")?,
        role: parse(row, "role")?,
        created_at: get_time(row, "created_at")?,
        updated_at: get_time(row, "updated_at")?,
    })
}

/// A principal from a users ⋈ orgs row: `user_id, org_id, email, role,
/// rate_limit_burst, rate_limit_per_second` and, for key lookups, `api_key_id`.
pub(crate) fn principal(row: &PgRow, api_key: bool) -> Result<Principal, StoreError> {
    Ok(Principal {
        org_id: get_id(row, "org_id")?,
        user_id: get_id(row, "user_id")?,
        email: get(row, "email")?,
        role: parse(row, "role")?,
        rate_limit: rate_limit(row)?,
        api_key: if api_key {
            Some(get_id(row, "api_key_id")?)
        } else {
            None
        },
        policy: std::sync::Arc::new(policy(row)?),
        org_tokens: token_limits(row, "org_tpm", "org_tpd")?,
        user_tokens: token_limits(row, "user_tpm", "user_tpd")?,
    })
}

pub(crate) fn api_key(row: &PgRow) -> Result<ApiKey, StoreError> {
    Ok(ApiKey {
        id: get_id(row, "id")?,
        org_id: get_id(row, "org_id")?,
        user_id: get_id(row, "user_id")?,
        prefix: get(row, "prefix")?,
        name: get(row, "name")?,
        created_at: get_time(row, "created_at")?,
        last_used_at: get_opt_time(row, "last_used_at")?,
        revoked_at: get_opt_time(row, "revoked_at")?,
    })
}

pub(crate) fn chat(row: &PgRow) -> Result<Chat, StoreError> {
    Ok(Chat {
        id: get_id(row, "id")?,
        org_id: get_id(row, "org_id")?,
        user_id: get_id(row, "user_id")?,
        title: get(row, "title")?,
        message_count: get(row, "message_count")?,
        model: get(row, "model")?,
        created_at: get_time(row, "created_at")?,
        updated_at: get_time(row, "updated_at")?,
    })
}

pub(crate) fn message(row: &PgRow) -> Result<Message, StoreError> {
    finished_message(row, get(row, "content")?)
}

/// A message from [`finished_columns`], with the `content` its final write
/// stored.
pub(crate) fn finished_message(row: &PgRow, content: String) -> Result<Message, StoreError> {
    Ok(Message {
        id: get_id(row, "id")?,
        chat_id: get_id(row, "chat_id")?,
        org_id: get_id(row, "org_id")?,
        role: parse(row, "role")?,
        content,
        status: parse(row, "status")?,
        token_count: get(row, "token_count")?,
        seq: get(row, "seq")?,
        model: get(row, "model")?,
        usage: usage(row)?,
        created_at: get_time(row, "created_at")?,
        updated_at: get_time(row, "updated_at")?,
    })
}

pub(crate) fn idempotency(row: &PgRow) -> Result<IdempotencyRecord, StoreError> {
    Ok(IdempotencyRecord {
        request_hash: get(row, "request_hash")?,
        response: get_json(row, "response")?,
        created_at: get_time(row, "created_at")?,
    })
}
