//! The native API's JSON shapes (SPEC §5, §6, §11), each produced from one
//! type: the `POST /chat` reply (also what an idempotent retry replays), the
//! stream's events, messages and chats as `GET` returns them.

use chrono::{DateTime, Utc};
use confab_core::model::{Usage, rfc3339_millis};
use confab_core::turn::{StartedMeta, TurnSummary};
use confab_core::{Chat, ChatId, Message, MessageId, MessageRole};
use serde::Serialize;
use utoipa::ToSchema;

use crate::openapi::schema as sch;

/// `usage` of an assistant message.
#[derive(Clone, Copy, Debug, Serialize, ToSchema)]
#[schema(as = Usage)]
pub struct UsageJson {
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    #[schema(schema_with = sch::usage_source)]
    pub source: &'static str,
}

impl From<Usage> for UsageJson {
    fn from(u: Usage) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            source: u.source.as_str(),
        }
    }
}

/// `POST /chat` → 200.
#[derive(Debug, Serialize, ToSchema)]
pub struct TurnReply<'a> {
    #[schema(value_type = uuid::Uuid)]
    pub chat_id: ChatId,
    #[schema(value_type = uuid::Uuid)]
    pub message_id: MessageId,
    pub reply: &'a str,
    #[serde(with = "rfc3339_millis")]
    pub created_at: DateTime<Utc>,
    pub model: &'a str,
    pub usage: UsageJson,
}

impl<'a> TurnReply<'a> {
    pub fn new(meta: &'a StartedMeta, summary: &'a TurnSummary) -> Self {
        Self {
            chat_id: meta.chat_id,
            message_id: meta.message_id,
            reply: &summary.text,
            created_at: meta.created_at,
            model: &meta.model,
            usage: summary.usage.into(),
        }
    }
}

/// `{"token":"…","done":false}`: one per token.
#[derive(Serialize, ToSchema)]
pub struct TokenEvent<'a> {
    pub token: &'a str,
    #[schema(schema_with = sch::always_false)]
    pub done: bool,
}

/// The last event of a stream that completed (sent after the reply is stored).
#[derive(Serialize, ToSchema)]
pub struct DoneEvent<'a> {
    #[schema(schema_with = sch::empty_string)]
    pub token: &'a str,
    #[schema(schema_with = sch::always_true)]
    pub done: bool,
    #[serde(rename = "fullText")]
    pub full_text: &'a str,
    /// Always there for the native API (its turns are stored in a chat).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<uuid::Uuid>)]
    pub chat_id: Option<ChatId>,
    #[schema(value_type = uuid::Uuid)]
    pub message_id: MessageId,
    pub model: &'a str,
    pub usage: UsageJson,
}

/// The last event of a stream that failed after its first byte.
#[derive(Serialize, ToSchema)]
pub struct ErrorEvent<'a> {
    #[schema(schema_with = sch::stream_failed)]
    pub error: &'a str,
    pub message: &'a str,
}

/// `POST /chat/{chat_id}/messages/{message_id}/cancel` → 202: `status` is
/// `cancelling`, or the final status of a message that had already finished.
#[derive(Serialize, ToSchema)]
pub struct CancelReply<'a> {
    #[schema(value_type = uuid::Uuid)]
    pub chat_id: ChatId,
    #[schema(value_type = uuid::Uuid)]
    pub message_id: MessageId,
    #[schema(schema_with = sch::cancel_status)]
    pub status: &'a str,
}

/// An assistant message's additions (SPEC §11): the model, and the usage
/// (`null` while it streams).
#[derive(Serialize, ToSchema)]
pub struct AssistantFields<'a> {
    /// Assistant messages only.
    pub model: Option<&'a str>,
    /// Assistant messages only; `null` while the message streams.
    pub usage: Option<UsageJson>,
}

/// A message in `GET /chat/{id}`.
#[derive(Serialize, ToSchema)]
pub struct MessageJson<'a> {
    #[schema(value_type = uuid::Uuid)]
    pub id: MessageId,
    #[schema(schema_with = sch::message_role)]
    pub role: MessageRole,
    pub content: &'a str,
    #[schema(schema_with = sch::message_status)]
    pub status: confab_core::MessageStatus,
    #[serde(with = "rfc3339_millis")]
    pub created_at: DateTime<Utc>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = AssistantFields)]
    pub assistant: Option<AssistantFields<'a>>,
}

impl<'a> From<&'a Message> for MessageJson<'a> {
    fn from(m: &'a Message) -> Self {
        Self {
            id: m.id,
            role: m.role,
            content: &m.content,
            status: m.status,
            created_at: m.created_at,
            assistant: (m.role == MessageRole::Assistant).then(|| AssistantFields {
                model: m.model.as_deref(),
                usage: m.usage.map(UsageJson::from),
            }),
        }
    }
}

/// A chat in `GET /chats`.
#[derive(Serialize, ToSchema)]
pub struct ChatSummary<'a> {
    #[schema(value_type = uuid::Uuid)]
    pub id: ChatId,
    pub title: &'a str,
    #[serde(with = "rfc3339_millis")]
    pub created_at: DateTime<Utc>,
    #[serde(with = "rfc3339_millis")]
    pub updated_at: DateTime<Utc>,
    #[schema(required = true)]
    pub model: Option<&'a str>,
}

impl<'a> From<&'a Chat> for ChatSummary<'a> {
    fn from(c: &'a Chat) -> Self {
        Self {
            id: c.id,
            title: &c.title,
            created_at: c.created_at,
            updated_at: c.updated_at,
            model: c.model.as_deref(),
        }
    }
}

/// The chat itself, as `GET /chat/{id}` and `PATCH /chat/{id}` answer it.
#[derive(Serialize, ToSchema)]
pub struct ChatJson<'a> {
    #[schema(value_type = uuid::Uuid)]
    pub chat_id: ChatId,
    pub title: &'a str,
    #[serde(with = "rfc3339_millis")]
    pub created_at: DateTime<Utc>,
    #[serde(with = "rfc3339_millis")]
    pub updated_at: DateTime<Utc>,
    pub message_count: i64,
    #[schema(required = true)]
    pub model: Option<&'a str>,
}

impl<'a> From<&'a Chat> for ChatJson<'a> {
    fn from(c: &'a Chat) -> Self {
        Self {
            chat_id: c.id,
            title: &c.title,
            created_at: c.created_at,
            updated_at: c.updated_at,
            message_count: c.message_count,
            model: c.model.as_deref(),
        }
    }
}

/// `GET /chat/{id}`.
#[derive(Serialize, ToSchema)]
pub struct HistoryJson<'a> {
    #[serde(flatten)]
    pub chat: ChatJson<'a>,
    pub messages: Vec<MessageJson<'a>>,
    #[schema(required = true)]
    pub older_cursor: Option<String>,
}

/// `GET /chats`.
#[derive(Serialize, ToSchema)]
pub struct ChatListJson<'a> {
    pub chats: Vec<ChatSummary<'a>>,
    pub count: usize,
    #[schema(required = true)]
    pub next_cursor: Option<String>,
}

/// One entry of `GET /models`.
#[derive(Serialize, ToSchema)]
pub struct ModelJson<'a> {
    pub name: &'a str,
    /// `openai`, `anthropic` or `simulated`.
    pub provider: &'static str,
    pub context_tokens: u32,
    pub max_output_tokens: u32,
}

/// `GET /models`.
#[derive(Serialize, ToSchema)]
pub struct ModelListJson<'a> {
    pub models: Vec<ModelJson<'a>>,
    /// The model a turn uses when it names none; `null` only when the org
    /// may use none of this server's models (its allowlist names only
    /// models the models file no longer has).
    pub default: Option<&'a str>,
}

/// Ledger totals as `GET /usage` and `confab usage` print them.
#[derive(Serialize, ToSchema)]
pub struct UsageTotalsJson {
    pub turns: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost_usd: f64,
}

impl From<&confab_core::model::UsageTotals> for UsageTotalsJson {
    fn from(t: &confab_core::model::UsageTotals) -> Self {
        Self {
            turns: t.turns,
            prompt_tokens: t.prompt_tokens,
            completion_tokens: t.completion_tokens,
            // micro-USD → USD (exact for every sum below 2^53 micro-USD).
            cost_usd: t.cost_micro_usd as f64 / 1_000_000.0,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct UsageGroupJson<'a> {
    pub key: &'a str,
    #[serde(flatten)]
    pub totals: UsageTotalsJson,
}

/// `GET /usage` (SPEC §12), also the output of `confab usage`.
#[derive(Serialize, ToSchema)]
pub struct UsageReportJson<'a> {
    #[serde(with = "rfc3339_millis")]
    pub from: DateTime<Utc>,
    #[serde(with = "rfc3339_millis")]
    pub to: DateTime<Utc>,
    pub totals: UsageTotalsJson,
    pub groups: Vec<UsageGroupJson<'a>>,
}

impl<'a> UsageReportJson<'a> {
    pub fn new(
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        report: &'a confab_core::model::UsageReport,
    ) -> Self {
        Self {
            from,
            to,
            totals: (&report.totals).into(),
            groups: report
                .groups
                .iter()
                .map(|(key, totals)| UsageGroupJson {
                    key,
                    totals: totals.into(),
                })
                .collect(),
        }
    }
}

/// `POST /chat` and `POST /chat/stream` (SPEC §5, §11). The schema of the
/// body; [`parse_turn_request`] reads it field by field so that every
/// refusal keeps SPEC's message (`message is required`, `chat_id must be a
/// UUID`, …), and gives the same values as this type.
///
/// [`parse_turn_request`]: crate::routes::chats::parse_turn_request
#[derive(Debug, ToSchema)]
pub struct TurnRequestBody {
    /// The user's message: not blank, no NUL, at most 10,000 characters.
    #[schema(schema_with = sch::message_text)]
    pub message: String,
    /// Continue this chat (one the caller may write); absent: a new chat.
    #[schema(value_type = Option<uuid::Uuid>)]
    pub chat_id: Option<ChatId>,
    /// A model of `GET /models`; absent: the chat's model, or the default.
    #[schema(schema_with = sch::model_name)]
    pub model: Option<String>,
    /// The system prompt of a new chat (not with `chat_id`); blank: none.
    #[schema(schema_with = sch::system_prompt)]
    pub system: Option<String>,
}

/// `PATCH /chat/{id}`.
#[derive(Debug, ToSchema)]
pub struct RenameRequestBody {
    /// 1-255 characters once trimmed, no NUL.
    #[schema(schema_with = sch::chat_title)]
    pub title: String,
}

/// Every native error: `{"error": "<HTTP reason>", "message": "<what is wrong>"}`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Error)]
pub struct ErrorJson<'a> {
    /// The status's reason phrase, e.g. `Bad Request`.
    pub error: &'a str,
    pub message: &'a str,
}

/// 429 of the request rate limit (SPEC §4) and of a token limit (SPEC §12).
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = LimitError)]
pub struct LimitErrorJson<'a> {
    #[schema(schema_with = sch::too_many_requests)]
    pub error: &'a str,
    pub message: &'a str,
    pub limit: u64,
    pub remaining: u64,
    /// When the bucket or window is full again.
    #[serde(rename = "resetAt")]
    #[schema(value_type = chrono::DateTime<Utc>)]
    pub reset_at: String,
}

/// The caller, as `/` and `/health` echo it when credentials were sent.
#[derive(Debug, Serialize, ToSchema)]
pub struct UserJson<'a> {
    #[schema(value_type = uuid::Uuid)]
    pub id: confab_core::UserId,
    pub email: &'a str,
    #[schema(schema_with = sch::user_role)]
    pub role: confab_core::Role,
}

/// `rateLimit` of `GET /` (peeked: no token taken).
#[derive(Debug, Serialize, ToSchema)]
pub struct RateLimitJson {
    pub limit: u64,
    pub remaining: u64,
    #[serde(rename = "resetAt")]
    #[schema(value_type = chrono::DateTime<Utc>)]
    pub reset_at: String,
}

/// `GET /` (SPEC §7).
#[derive(Debug, Serialize, ToSchema)]
pub struct RootJson<'a> {
    pub message: &'a str,
    #[schema(value_type = chrono::DateTime<Utc>)]
    pub timestamp: String,
    #[serde(rename = "requestId")]
    pub request_id: &'a str,
    /// With credentials only.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<uuid::Uuid>)]
    pub org: Option<confab_core::OrgId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<UserJson<'a>>,
    /// With credentials only; `null` when the limiter cannot be asked.
    #[serde(
        rename = "rateLimit",
        skip_serializing_if = "Option::is_none",
        with = "serde_with_null"
    )]
    #[schema(value_type = Option<RateLimitJson>)]
    pub rate_limit: Option<Option<RateLimitJson>>,
}

/// `services` of `GET /health`.
#[derive(Debug, Serialize, ToSchema)]
pub struct HealthServicesJson {
    #[schema(schema_with = sch::connection_state)]
    pub database: &'static str,
    #[schema(schema_with = sch::redis_state)]
    pub redis: &'static str,
}

/// `GET /health` (SPEC §7): 200 `ok`, 503 `degraded`.
#[derive(Debug, Serialize, ToSchema)]
pub struct HealthJson<'a> {
    #[schema(schema_with = sch::health_status)]
    pub status: &'static str,
    pub env: &'a str,
    #[schema(value_type = chrono::DateTime<Utc>)]
    pub timestamp: String,
    #[serde(rename = "requestId")]
    pub request_id: &'a str,
    pub services: HealthServicesJson,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<uuid::Uuid>)]
    pub org: Option<confab_core::OrgId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<UserJson<'a>>,
}

/// `GET /livez`.
#[derive(Debug, Serialize, ToSchema)]
pub struct LivezJson {
    #[schema(schema_with = sch::ok_status)]
    pub status: &'static str,
    #[schema(value_type = chrono::DateTime<Utc>)]
    pub timestamp: String,
}

/// `GET /readyz`: 200 `ready`, 503 `not ready`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReadyzJson {
    #[schema(schema_with = sch::ready_status)]
    pub status: &'static str,
    #[schema(value_type = chrono::DateTime<Utc>)]
    pub timestamp: String,
    #[schema(schema_with = sch::connection_state)]
    pub database: &'static str,
    pub draining: bool,
}

/// `Some(None)` as `null` (a field that is there, empty); `None` is skipped.
mod serde_with_null {
    use serde::{Serialize, Serializer};

    pub fn serialize<T: Serialize, S: Serializer>(
        value: &Option<Option<T>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(Some(v)) => v.serialize(s),
            _ => s.serialize_none(),
        }
    }
}

/// `[from, to)` and the grouping of a usage report.
pub type UsageQuery = (
    DateTime<Utc>,
    DateTime<Utc>,
    Option<confab_core::model::UsageGroup>,
);

/// The range and grouping of a usage query, checked: RFC 3339 instants
/// (default: the current UTC month), `from` before `to`, `group_by` one of
/// `model`, `user`, `day`.
pub fn usage_query(
    from: Option<&str>,
    to: Option<&str>,
    group_by: Option<&str>,
) -> Result<UsageQuery, String> {
    use chrono::{Datelike, TimeZone};
    use confab_core::model::UsageGroup;
    let parse = |name: &str, v: &str| {
        DateTime::parse_from_rfc3339(v.trim())
            .map(|t| t.with_timezone(&Utc))
            .map_err(|_| format!("{name} must be an RFC 3339 time such as 2026-12-01T00:00:00Z"))
    };
    let now = Utc::now();
    let month_start = Utc
        .with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0)
        .single()
        .unwrap_or(now);
    let next_month = if now.month() == 12 {
        Utc.with_ymd_and_hms(now.year() + 1, 1, 1, 0, 0, 0)
    } else {
        Utc.with_ymd_and_hms(now.year(), now.month() + 1, 1, 0, 0, 0)
    }
    .single()
    .unwrap_or(now);
    let from = from
        .map(|v| parse("from", v))
        .transpose()?
        .unwrap_or(month_start);
    let to = to
        .map(|v| parse("to", v))
        .transpose()?
        .unwrap_or(next_month);
    if from >= to {
        return Err("from must be before to".into());
    }
    let group = match group_by.map(str::trim) {
        None | Some("") => None,
        Some("model") => Some(UsageGroup::Model),
        Some("user") => Some(UsageGroup::User),
        Some("day") => Some(UsageGroup::Day),
        Some(_) => return Err("group_by must be model, user or day".into()),
    };
    Ok((from, to, group))
}

/// One event of a native stream (`POST /chat/stream`, resume), as an SSE
/// parser sees it. OpenAPI 3.1 describes a `text/event-stream` body by the
/// schema of one event: `id` is its number, `data` one of the JSON events.
pub struct ChatStreamEvent;

impl utoipa::PartialSchema for ChatStreamEvent {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        sch::sse_event(vec![
            sch::component_ref::<TokenEvent>(),
            sch::component_ref::<DoneEvent>(),
            sch::component_ref::<ErrorEvent>(),
        ])
    }
}

impl ToSchema for ChatStreamEvent {
    fn schemas(
        schemas: &mut Vec<(
            String,
            utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>,
        )>,
    ) {
        sch::register::<TokenEvent>(schemas);
        sch::register::<DoneEvent>(schemas);
        sch::register::<ErrorEvent>(schemas);
    }
}
