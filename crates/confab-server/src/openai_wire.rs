//! The OpenAI-compatible API's wire format (SPEC §13): every body of
//! `/v1/*` is produced from (or read into) these types, as the native API's
//! are from `wire.rs`. Field names and values follow OpenAI's Chat
//! Completions API, so that its SDKs read them unchanged.

use confab_core::model::Usage;
use serde::{Deserialize, Serialize, Serializer};

/// `POST /v1/chat/completions`. Unknown fields are ignored (SPEC §13).
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub messages: Vec<InMessage>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub stop: Option<Stop>,
    /// The client's end-user id; accepted and not used.
    #[serde(default)]
    pub user: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct InMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

/// A non-streamed reply.
#[derive(Serialize)]
pub struct Completion<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: i64,
    pub model: &'a str,
    pub choices: [Choice<'a>; 1],
    pub usage: UsageOut,
    pub system_fingerprint: Option<&'static str>,
}

#[derive(Serialize)]
pub struct Choice<'a> {
    pub index: u32,
    pub message: OutMessage<'a>,
    pub logprobs: Option<()>,
    pub finish_reason: &'static str,
}

#[derive(Serialize)]
pub struct OutMessage<'a> {
    pub role: &'static str,
    pub content: &'a str,
    pub refusal: Option<()>,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct UsageOut {
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
}

impl From<Usage> for UsageOut {
    fn from(u: Usage) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens.saturating_add(u.completion_tokens),
        }
    }
}

/// One `data:` line of a stream.
#[derive(Serialize)]
pub struct CompletionChunk<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: i64,
    pub model: &'a str,
    pub system_fingerprint: Option<&'static str>,
    pub choices: &'a [ChunkChoice<'a>],
    /// `null` on every chunk when the client asked for usage, the figures on
    /// the last one (whose `choices` is empty); absent otherwise.
    #[serde(skip_serializing_if = "UsageSlot::is_absent")]
    pub usage: UsageSlot,
}

#[derive(Serialize)]
pub struct ChunkChoice<'a> {
    pub index: u32,
    pub delta: Delta<'a>,
    pub logprobs: Option<()>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Default, Serialize)]
pub struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<&'a str>,
}

#[derive(Clone, Copy, Debug)]
pub enum UsageSlot {
    Absent,
    Null,
    Usage(UsageOut),
}

impl UsageSlot {
    fn is_absent(&self) -> bool {
        matches!(self, UsageSlot::Absent)
    }
}

impl Serialize for UsageSlot {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            UsageSlot::Absent | UsageSlot::Null => s.serialize_none(),
            UsageSlot::Usage(u) => u.serialize(s),
        }
    }
}

/// `GET /v1/models`.
#[derive(Serialize)]
pub struct ModelList<'a> {
    pub object: &'static str,
    pub data: Vec<ModelOut<'a>>,
}

#[derive(Serialize)]
pub struct ModelOut<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: i64,
    pub owned_by: &'static str,
}

/// `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    pub error: ErrorObject<'a>,
}

#[derive(Debug, Serialize)]
pub struct ErrorObject<'a> {
    pub message: &'a str,
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub param: Option<&'a str>,
    pub code: Option<&'a str>,
}
