//! Domain types. `New*` types are inputs (validated at construction), the
//! plain names are stored rows as the stores return them.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::{ApiKeyId, ChatId, MessageId, OrgId, UserId};

/// Longest accepted chat message, in Unicode scalar values (SPEC §5).
pub const MAX_MESSAGE_CHARS: usize = 10_000;
/// A new chat is titled with this many characters of its first message.
pub const TITLE_FROM_MESSAGE_CHARS: usize = 50;
/// A claimed `Idempotency-Key` with no stored response after this many
/// seconds, whose reply is no longer `streaming` (crash recovery marks the
/// reply of a dead process `interrupted`; a live turn's stays `streaming`
/// however long it runs), belongs to a request whose process died; a retry
/// may take it over. (Failures of a live process release their key at once.)
/// The PostgreSQL store spells this value in its SQL.
pub const ABANDONED_CLAIM_SECS: i64 = 120;
/// How long a stored answer to an `Idempotency-Key` is replayed; after it
/// the key may be used for a new request (and it is purged). The PostgreSQL
/// store spells this value in its SQL.
pub const IDEMPOTENCY_TTL_HOURS: i64 = 24;
/// Longest accepted chat title.
pub const MAX_TITLE_CHARS: usize = 255;

/// Why an input value was refused; the text is safe to show to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

impl Invalid {
    pub fn new(msg: impl Into<String>) -> Self {
        Self(msg.into())
    }
}

macro_rules! string_enum {
    ($(#[$doc:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "lowercase")]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            pub const fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = Invalid;
            fn from_str(s: &str) -> Result<Self, Invalid> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(Invalid(format!(
                        concat!("invalid ", stringify!($name), " {:?}: expected one of {}"),
                        other,
                        [$($text),+].join(", ")
                    ))),
                }
            }
        }
    };
}

string_enum!(
    /// A user's role inside their org.
    Role { Owner => "owner", Admin => "admin", Member => "member" }
);
string_enum!(
    /// Who wrote a message.
    MessageRole { User => "user", Assistant => "assistant", System => "system" }
);
string_enum!(
    /// Lifecycle of a message. User messages are always `complete`; an
    /// assistant message is `streaming` until it reaches one of the others.
    MessageStatus {
        Streaming => "streaming",
        Complete => "complete",
        Cancelled => "cancelled",
        Failed => "failed",
        Interrupted => "interrupted",
    }
);

string_enum!(
    /// Where a message's token figures come from (SPEC §11): reported by the
    /// model, or counted by confab because the model reported nothing.
    UsageSource { Provider => "provider", Estimated => "estimated" }
);

/// Tokens of one turn, as stored on its assistant message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub source: UsageSource,
}

/// What an org has chosen about models (admin CLI), read with the principal
/// so that a turn needs no extra query for it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OrgPolicy {
    /// Model names the org may use; `None` = every configured model.
    pub allowed_models: Option<Vec<String>>,
    /// System prompt for chats that have none of their own.
    pub system_prompt: Option<String>,
}

impl OrgPolicy {
    pub fn allows(&self, model: &str) -> bool {
        self.allowed_models
            .as_ref()
            .is_none_or(|names| names.iter().any(|n| n == model))
    }
}

/// Token limits of an org or a user (SPEC §12); 0 = unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenLimits {
    pub per_minute: u64,
    pub per_day: u64,
}

/// What one finished turn adds to the usage ledger besides what the
/// message row holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LedgerCost {
    /// From the model's prices: USD per million tokens is micro-USD per token.
    pub cost_micro_usd: i64,
}

/// How `GET /usage` groups its rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UsageGroup {
    Model,
    User,
    Day,
}

/// Ledger totals of a set of turns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsageTotals {
    pub turns: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost_micro_usd: i64,
}

/// The ledger over a time range: totals, and per group when asked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UsageReport {
    pub totals: UsageTotals,
    /// `(key, totals)`, ordered by key.
    pub groups: Vec<(String, UsageTotals)>,
}

/// Longest accepted system prompt, in characters (SPEC §11).
pub const MAX_SYSTEM_CHARS: usize = 10_000;

/// A system prompt: at most [`MAX_SYSTEM_CHARS`] characters, no NUL; blank
/// means none.
pub fn parse_system_prompt(s: &str) -> Result<Option<String>, Invalid> {
    if s.contains('\0') {
        return Err(Invalid::new("system must not contain NUL characters"));
    }
    if s.chars().count() > MAX_SYSTEM_CHARS {
        return Err(Invalid(format!(
            "system must be at most {MAX_SYSTEM_CHARS} characters"
        )));
    }
    Ok((!s.trim().is_empty()).then(|| s.to_owned()))
}

impl Role {
    /// Owners and admins may read (never write) every chat of their org.
    pub const fn reads_whole_org(self) -> bool {
        matches!(self, Role::Owner | Role::Admin)
    }
}

/// Per-org override of the rate limit, stored with the org.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RateLimitOverride {
    pub burst: u32,
    pub per_second: f64,
}

impl RateLimitOverride {
    pub fn new(burst: u32, per_second: f64) -> Result<Self, Invalid> {
        if burst == 0 {
            return Err(Invalid::new("burst must be at least 1"));
        }
        if !(per_second.is_finite() && per_second > 0.0) {
            return Err(Invalid::new("per-second refill must be a positive number"));
        }
        Ok(Self { burst, per_second })
    }
}

/// An org slug: `^[a-z0-9-]+$`, at most 63 characters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slug(String);

impl Slug {
    pub fn parse(s: &str) -> Result<Self, Invalid> {
        let ok = !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(Invalid(format!(
                "invalid slug {s:?}: use 1-63 characters of a-z, 0-9 and '-'"
            )))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An email address, lower-cased; only the shape `local@domain` is checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Email(String);

impl Email {
    pub fn parse(s: &str) -> Result<Self, Invalid> {
        let s = s.trim();
        let valid = s.len() <= 254
            && !s.chars().any(|c| c.is_whitespace() || c.is_control())
            && matches!(s.split_once('@'), Some((local, domain)) if !local.is_empty() && domain.contains('.') && !domain.contains('@') && !domain.starts_with('.') && !domain.ends_with('.'));
        if valid {
            Ok(Self(s.to_lowercase()))
        } else {
            Err(Invalid(format!("invalid email address {s:?}")))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A chat message as a client may send it: non-blank, no NUL (PostgreSQL
/// cannot store it, and the original answered 500), and at most
/// [`MAX_MESSAGE_CHARS`] characters when built by [`MessageText::parse`] —
/// every message that is stored. [`MessageText::parse_unstored`] (a
/// stateless `/v1` turn, never stored) has no length limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageText(String);

impl MessageText {
    pub fn parse(s: String) -> Result<Self, Invalid> {
        let s = Self::parse_unstored(s)?;
        if s.0.chars().count() > MAX_MESSAGE_CHARS {
            return Err(Invalid(format!(
                "message must be at most {MAX_MESSAGE_CHARS} characters"
            )));
        }
        Ok(s)
    }
    /// As [`parse`](Self::parse) without its length limit: for a message
    /// sent to the model and stored nowhere (a stateless `/v1` turn), which
    /// the request body's limit and the model's context bound instead.
    pub fn parse_unstored(s: String) -> Result<Self, Invalid> {
        if s.trim().is_empty() {
            return Err(Invalid::new("message must not be empty"));
        }
        if s.contains('\0') {
            return Err(Invalid::new("message must not contain NUL characters"));
        }
        Ok(Self(s))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The title of a chat started by this message: its first
    /// [`TITLE_FROM_MESSAGE_CHARS`] characters (never a split character).
    pub fn title(&self) -> String {
        let title: String = self
            .0
            .trim()
            .chars()
            .take(TITLE_FROM_MESSAGE_CHARS)
            .collect();
        title
    }
}

/// A chat title: 1 to [`MAX_TITLE_CHARS`] characters after trimming, no NUL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatTitle(String);

impl ChatTitle {
    pub fn parse(s: &str) -> Result<Self, Invalid> {
        let s = s.trim();
        if s.is_empty() {
            return Err(Invalid::new("title must not be empty"));
        }
        if s.contains('\0') {
            return Err(Invalid::new("title must not contain NUL characters"));
        }
        if s.chars().count() > MAX_TITLE_CHARS {
            return Err(Invalid(format!(
                "title must be at most {MAX_TITLE_CHARS} characters"
            )));
        }
        Ok(Self(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Org {
    pub id: OrgId,
    pub name: String,
    pub slug: String,
    pub metadata: serde_json::Value,
    pub rate_limit: Option<RateLimitOverride>,
    pub policy: OrgPolicy,
    pub token_limits: TokenLimits,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Clone, Debug)]
pub struct NewOrg {
    pub id: OrgId,
    pub name: String,
    pub slug: Slug,
    pub metadata: serde_json::Value,
}

#[derive(Clone, Debug, PartialEq)]
pub struct User {
    pub id: UserId,
    pub org_id: OrgId,
    pub email: String,
    pub name: String,
    pub role: Role,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Clone, Debug)]
pub struct NewUser {
    pub id: UserId,
    pub org_id: OrgId,
    pub email: Email,
    pub name: String,
    pub role: Role,
}

/// Who is making a request, whichever authenticator found them. Every route
/// and the rate limiter see only this.
#[derive(Clone, Debug, PartialEq)]
pub struct Principal {
    pub org_id: OrgId,
    pub user_id: UserId,
    pub email: String,
    pub role: Role,
    /// The org's own rate limit, when it has one.
    pub rate_limit: Option<RateLimitOverride>,
    /// Set when the request was authenticated by an API key.
    pub api_key: Option<ApiKeyId>,
    /// The org's model allowlist and default system prompt.
    pub policy: std::sync::Arc<OrgPolicy>,
    /// The org's token limits, and the user's own.
    pub org_tokens: TokenLimits,
    pub user_tokens: TokenLimits,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ApiKey {
    pub id: ApiKeyId,
    pub org_id: OrgId,
    pub user_id: UserId,
    /// The public, non-secret start of the key (e.g. `cfb_1a2b3c4d`).
    pub prefix: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

#[derive(Clone, Debug)]
pub struct NewApiKey {
    pub id: ApiKeyId,
    pub org_id: OrgId,
    pub user_id: UserId,
    /// SHA-256 of the whole secret key; the secret itself is never stored.
    pub hash: Vec<u8>,
    pub prefix: String,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Chat {
    pub id: ChatId,
    pub org_id: OrgId,
    pub user_id: UserId,
    pub title: String,
    pub message_count: i64,
    /// The model the chat's next turn uses unless the request names one
    /// (`None` for chats from before models existed: the default then).
    pub model: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    pub id: MessageId,
    pub chat_id: ChatId,
    pub org_id: OrgId,
    pub role: MessageRole,
    pub content: String,
    pub status: MessageStatus,
    pub token_count: Option<i64>,
    /// Position in the chat, 1-based, gap-free, assigned at insert.
    pub seq: i64,
    /// The model that wrote an assistant message.
    pub model: Option<String>,
    /// An assistant message's tokens; `None` while it is streaming.
    pub usage: Option<Usage>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Keyset position in a user's chat list (most recently updated first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChatCursor {
    pub updated_at: DateTime<Utc>,
    pub id: ChatId,
}

/// Which chat a turn goes to.
#[derive(Clone, Debug)]
pub enum TurnChat {
    /// An existing chat; the caller has already checked the user may write it.
    Existing(ChatId),
    /// A chat to create with this id and title.
    New { id: ChatId, title: String },
}

/// A claimed `Idempotency-Key` (per user).
#[derive(Clone, Debug)]
pub struct IdempotencyClaim {
    pub key: String,
    /// Hash of the request body, so a key reused for another request is refused.
    pub request_hash: String,
}

/// The first half of a turn, stored in one transaction before the model is asked.
#[derive(Clone, Debug)]
pub struct NewTurn {
    pub org: OrgId,
    pub user: UserId,
    pub chat: TurnChat,
    pub user_message_id: MessageId,
    pub content: String,
    /// The assistant reply, created `streaming` with empty content.
    pub assistant_message_id: MessageId,
    pub idempotency: Option<IdempotencyClaim>,
    /// The model of this turn; recorded on the assistant message and, from
    /// this turn on, on the chat.
    pub model: String,
    /// For a new chat: its system prompt, stored as its first message.
    pub system: Option<String>,
}

#[derive(Clone, Debug)]
pub struct BegunTurn {
    pub chat_id: ChatId,
    pub user_message: Message,
    pub assistant_message: Message,
}

impl NewTurn {
    /// The chat the turn is written to.
    pub fn chat_id(&self) -> ChatId {
        match &self.chat {
            TurnChat::New { id, .. } | TurnChat::Existing(id) => *id,
        }
    }

    /// This turn as begun, from messages read back (a store's answer to a
    /// begin): its user and assistant messages, by their ids, in its chat,
    /// the reply still `streaming`. `None` unless both are there so.
    pub fn begun_from(&self, messages: impl IntoIterator<Item = Message>) -> Option<BegunTurn> {
        let (mut user_message, mut assistant_message) = (None, None);
        for message in messages {
            if message.chat_id != self.chat_id() {
                continue;
            }
            if message.id == self.user_message_id && message.role == MessageRole::User {
                user_message = Some(message);
            } else if message.id == self.assistant_message_id
                && message.role == MessageRole::Assistant
                && message.status == MessageStatus::Streaming
            {
                assistant_message = Some(message);
            }
        }
        Some(BegunTurn {
            chat_id: self.chat_id(),
            user_message: user_message?,
            assistant_message: assistant_message?,
        })
    }
}

/// The final state of an assistant message.
#[derive(Clone, Debug)]
pub struct FinishedMessage {
    pub org: OrgId,
    pub chat: ChatId,
    pub id: MessageId,
    pub content: String,
    pub status: MessageStatus,
    pub usage: Usage,
    /// Written to the usage ledger with the final status.
    pub cost: LedgerCost,
    /// For an idempotent `POST /chat`: the response to replay for this key.
    pub idempotent_response: Option<(UserId, String, serde_json::Value)>,
    /// Where each token event ends in `content` ([`crate::live::EventLengths`]),
    /// so a resumed stream replays the same events with the same ids.
    pub event_lengths: Vec<u8>,
}

/// The growing text of a `streaming` message, as the flusher saves it.
#[derive(Clone, Debug, PartialEq)]
pub struct PartialText {
    pub id: MessageId,
    pub content: String,
    /// The token events `content` is made of ([`crate::live::EventLengths`]).
    pub event_lengths: Vec<u8>,
    /// The prompt's tokens once the model has it (the provider's figure
    /// when it reported one, else confab's count); 0 until then. A turn
    /// found `streaming` after a crash is counted with it.
    pub prompt_tokens: i64,
}

/// A message with the event boundaries of its text: what a resumed stream
/// replays (SPEC §14). `event_lengths` is `None` for messages stored before
/// event boundaries were kept (replayed as one token event).
#[derive(Clone, Debug, PartialEq)]
pub struct StoredStream {
    pub message: Message,
    pub event_lengths: Option<Vec<u8>>,
}

/// The ledger row of a turn stored in no chat (the OpenAI-compatible API's
/// stateless turns, SPEC §13): counted like any other, keyed by the turn's
/// own id. A turn stored in a chat is counted by [`FinishedMessage`] instead.
#[derive(Clone, Debug)]
pub struct LedgerEntry {
    pub turn: MessageId,
    pub org: OrgId,
    pub user: UserId,
    pub model: String,
    pub status: MessageStatus,
    pub usage: Usage,
    pub cost: LedgerCost,
}

/// A stored idempotency key.
#[derive(Clone, Debug, PartialEq)]
pub struct IdempotencyRecord {
    pub request_hash: String,
    /// `None` while the first request is still being served.
    pub response: Option<serde_json::Value>,
    pub created_at: DateTime<Utc>,
}

/// RFC 3339 in UTC with millisecond precision (`2026-11-26T04:12:06.123Z`),
/// the timestamp format of every JSON body.
pub mod rfc3339_millis {
    use chrono::{DateTime, SecondsFormat, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn format(t: &DateTime<Utc>) -> String {
        t.to_rfc3339_opts(SecondsFormat::Millis, true)
    }

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let s = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_text_rules() {
        assert!(MessageText::parse("hi".into()).is_ok());
        assert!(MessageText::parse("   \n\t".into()).is_err());
        assert!(MessageText::parse("a\0b".into()).is_err());
        assert!(MessageText::parse("é".repeat(MAX_MESSAGE_CHARS)).is_ok());
        assert!(MessageText::parse("é".repeat(MAX_MESSAGE_CHARS + 1)).is_err());
    }

    #[test]
    fn title_never_splits_a_character() {
        let text = MessageText::parse("ü".repeat(60)).unwrap();
        assert_eq!(text.title().chars().count(), TITLE_FROM_MESSAGE_CHARS);
        assert!(text.title().chars().all(|c| c == 'ü'));
    }

    #[test]
    fn slug_rules() {
        assert!(Slug::parse("acme-corp").is_ok());
        assert!(Slug::parse("Acme").is_err());
        assert!(Slug::parse("").is_err());
        assert!(Slug::parse("a b").is_err());
    }

    #[test]
    fn role_round_trips() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>().unwrap(), *role);
        }
        assert!("root".parse::<Role>().is_err());
    }

    #[test]
    fn email_rules() {
        assert_eq!(Email::parse("A@B.com").unwrap().as_str(), "a@b.com");
        assert!(Email::parse("nope").is_err());
        assert!(Email::parse("a@b").is_err());
    }
}
