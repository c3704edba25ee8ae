//! The native API's JSON shapes (SPEC §5, §6, §11), each produced from one
//! type: the `POST /chat` reply (also what an idempotent retry replays), the
//! stream's events, messages and chats as `GET` returns them.

use chrono::{DateTime, Utc};
use confab_core::model::{Usage, rfc3339_millis};
use confab_core::turn::{StartedMeta, TurnSummary};
use confab_core::{Chat, ChatId, Message, MessageId, MessageRole};
use serde::Serialize;

/// `usage` of an assistant message.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct UsageJson {
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
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
#[derive(Debug, Serialize)]
pub struct TurnReply<'a> {
    pub chat_id: ChatId,
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
#[derive(Serialize)]
pub struct TokenEvent<'a> {
    pub token: &'a str,
    pub done: bool,
}

/// The last event of a stream that completed (sent after the reply is stored).
#[derive(Serialize)]
pub struct DoneEvent<'a> {
    pub token: &'a str,
    pub done: bool,
    #[serde(rename = "fullText")]
    pub full_text: &'a str,
    /// Always there for the native API (its turns are stored in a chat).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chat_id: Option<ChatId>,
    pub message_id: MessageId,
    pub model: &'a str,
    pub usage: UsageJson,
}

/// The last event of a stream that failed after its first byte.
#[derive(Serialize)]
pub struct ErrorEvent<'a> {
    pub error: &'a str,
    pub message: &'a str,
}

/// `POST /chat/{chat_id}/messages/{message_id}/cancel` → 202: `status` is
/// `cancelling`, or the final status of a message that had already finished.
#[derive(Serialize)]
pub struct CancelReply<'a> {
    pub chat_id: ChatId,
    pub message_id: MessageId,
    pub status: &'a str,
}

/// An assistant message's additions (SPEC §11): the model, and the usage
/// (`null` while it streams).
#[derive(Serialize)]
pub struct AssistantFields<'a> {
    pub model: Option<&'a str>,
    pub usage: Option<UsageJson>,
}

/// A message in `GET /chat/{id}`.
#[derive(Serialize)]
pub struct MessageJson<'a> {
    pub id: MessageId,
    pub role: MessageRole,
    pub content: &'a str,
    pub status: confab_core::MessageStatus,
    #[serde(with = "rfc3339_millis")]
    pub created_at: DateTime<Utc>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
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
#[derive(Serialize)]
pub struct ChatSummary<'a> {
    pub id: ChatId,
    pub title: &'a str,
    #[serde(with = "rfc3339_millis")]
    pub created_at: DateTime<Utc>,
    #[serde(with = "rfc3339_millis")]
    pub updated_at: DateTime<Utc>,
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
#[derive(Serialize)]
pub struct ChatJson<'a> {
    pub chat_id: ChatId,
    pub title: &'a str,
    #[serde(with = "rfc3339_millis")]
    pub created_at: DateTime<Utc>,
    #[serde(with = "rfc3339_millis")]
    pub updated_at: DateTime<Utc>,
    pub message_count: i64,
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
#[derive(Serialize)]
pub struct HistoryJson<'a> {
    #[serde(flatten)]
    pub chat: ChatJson<'a>,
    pub messages: Vec<MessageJson<'a>>,
    pub older_cursor: Option<String>,
}

/// `GET /chats`.
#[derive(Serialize)]
pub struct ChatListJson<'a> {
    pub chats: Vec<ChatSummary<'a>>,
    pub count: usize,
    pub next_cursor: Option<String>,
}

/// One entry of `GET /models`.
#[derive(Serialize)]
pub struct ModelJson<'a> {
    pub name: &'a str,
    pub provider: &'static str,
    pub context_tokens: u32,
    pub max_output_tokens: u32,
}

/// `GET /models`.
#[derive(Serialize)]
pub struct ModelListJson<'a> {
    pub models: Vec<ModelJson<'a>>,
    pub default: &'a str,
}

/// Ledger totals as `GET /usage` and `confab usage` print them.
#[derive(Serialize)]
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

#[derive(Serialize)]
pub struct UsageGroupJson<'a> {
    pub key: &'a str,
    #[serde(flatten)]
    pub totals: UsageTotalsJson,
}

/// `GET /usage` (SPEC §12), also the output of `confab usage`.
#[derive(Serialize)]
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
