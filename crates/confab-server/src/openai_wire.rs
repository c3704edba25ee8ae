//! The OpenAI-compatible API's wire format (SPEC §13): every body of
//! `/v1/*` is produced from (or read into) these types, as the native API's
//! are from `wire.rs`. Field names and values follow OpenAI's Chat
//! Completions API, so that its SDKs read them unchanged.

use confab_core::model::Usage;
use serde::{Deserialize, Serialize, Serializer};
use utoipa::ToSchema;

use crate::openapi::schema as sch;

/// `POST /v1/chat/completions`. Unknown fields are ignored (SPEC §13).
#[derive(Debug, Deserialize, ToSchema)]
#[schema(as = ChatCompletionRequest)]
pub struct CompletionRequest {
    /// A model of `GET /v1/models`.
    #[schema(schema_with = sch::openai_model_name)]
    pub model: String,
    /// The conversation; the last `user` message is the turn's message
    /// (not blank; at most 10,000 characters when the turn is stored into a
    /// chat with `X-Confab-Chat-Id`, as the system prompt). No NUL anywhere.
    #[schema(min_items = 1)]
    pub messages: Vec<InMessage>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    #[schema(minimum = 1)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    #[schema(minimum = 1)]
    pub max_completion_tokens: Option<u32>,
    #[serde(default)]
    #[schema(minimum = 0, maximum = 2)]
    pub temperature: Option<f64>,
    #[serde(default)]
    #[schema(minimum = 0, maximum = 1)]
    pub top_p: Option<f64>,
    #[serde(default)]
    #[schema(schema_with = sch::stop)]
    pub stop: Option<Stop>,
    /// The client's end-user id; accepted and not used.
    #[serde(default)]
    pub user: Option<String>,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// At most 4 non-empty strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize, ToSchema)]
#[schema(as = ChatCompletionMessage)]
pub struct InMessage {
    /// `system` and `developer` are joined into the system prompt.
    #[schema(schema_with = sch::openai_role)]
    pub role: String,
    /// Text, or text parts.
    #[serde(default)]
    #[schema(schema_with = sch::message_content)]
    pub content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// Only text parts are supported.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(as = ChatCompletionContentPart)]
pub struct ContentPart {
    #[serde(rename = "type")]
    #[schema(schema_with = sch::text_part_type)]
    pub kind: String,
    #[serde(default)]
    #[schema(schema_with = sch::no_nul_text, required = true)]
    pub text: Option<String>,
}

/// A non-streamed reply.
#[derive(Serialize, ToSchema)]
#[schema(as = ChatCompletion)]
pub struct Completion<'a> {
    pub id: &'a str,
    #[schema(schema_with = sch::chat_completion_object)]
    pub object: &'static str,
    pub created: i64,
    pub model: &'a str,
    #[schema(value_type = Vec<Choice>, min_items = 1, max_items = 1)]
    pub choices: [Choice<'a>; 1],
    pub usage: UsageOut,
    #[schema(schema_with = sch::null_value)]
    pub system_fingerprint: Option<&'static str>,
}

#[derive(Serialize, ToSchema)]
#[schema(as = ChatCompletionChoice)]
pub struct Choice<'a> {
    pub index: u32,
    pub message: OutMessage<'a>,
    #[schema(schema_with = sch::null_value)]
    pub logprobs: Option<()>,
    #[schema(schema_with = sch::finish_reason)]
    pub finish_reason: &'static str,
}

#[derive(Serialize, ToSchema)]
#[schema(as = ChatCompletionReplyMessage)]
pub struct OutMessage<'a> {
    #[schema(schema_with = sch::assistant_role)]
    pub role: &'static str,
    pub content: &'a str,
    #[schema(schema_with = sch::null_value)]
    pub refusal: Option<()>,
}

#[derive(Clone, Copy, Debug, Serialize, ToSchema)]
#[schema(as = CompletionUsage)]
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
#[derive(Serialize, ToSchema)]
#[schema(as = ChatCompletionChunk)]
pub struct CompletionChunk<'a> {
    pub id: &'a str,
    #[schema(schema_with = sch::chat_completion_chunk_object)]
    pub object: &'static str,
    pub created: i64,
    pub model: &'a str,
    #[schema(schema_with = sch::null_value)]
    pub system_fingerprint: Option<&'static str>,
    /// Empty on the usage chunk.
    #[schema(value_type = Vec<ChunkChoice>, max_items = 1)]
    pub choices: &'a [ChunkChoice<'a>],
    /// `null` on every chunk when the client asked for usage, the figures on
    /// the last one (whose `choices` is empty); absent otherwise.
    #[serde(skip_serializing_if = "UsageSlot::is_absent")]
    #[schema(value_type = Option<UsageOut>)]
    pub usage: UsageSlot,
}

#[derive(Serialize, ToSchema)]
#[schema(as = ChatCompletionChunkChoice)]
pub struct ChunkChoice<'a> {
    pub index: u32,
    pub delta: Delta<'a>,
    #[schema(schema_with = sch::null_value)]
    pub logprobs: Option<()>,
    /// On the last choice only.
    #[schema(schema_with = sch::chunk_finish_reason)]
    pub finish_reason: Option<&'static str>,
}

#[derive(Default, Serialize, ToSchema)]
#[schema(as = ChatCompletionDelta)]
pub struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = sch::assistant_role)]
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
#[derive(Serialize, ToSchema)]
#[schema(as = OpenAiModelList)]
pub struct ModelList<'a> {
    #[schema(schema_with = sch::list_object)]
    pub object: &'static str,
    pub data: Vec<ModelOut<'a>>,
}

#[derive(Serialize, ToSchema)]
#[schema(as = OpenAiModel)]
pub struct ModelOut<'a> {
    pub id: &'a str,
    #[schema(schema_with = sch::model_object)]
    pub object: &'static str,
    pub created: i64,
    pub owned_by: &'static str,
}

/// `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = OpenAiError)]
pub struct ErrorBody<'a> {
    pub error: ErrorObject<'a>,
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(as = OpenAiErrorObject)]
pub struct ErrorObject<'a> {
    pub message: &'a str,
    /// `invalid_request_error`, `requests`, `tokens`, `server_error`.
    #[serde(rename = "type")]
    pub kind: &'a str,
    #[schema(required = true)]
    pub param: Option<&'a str>,
    #[schema(required = true)]
    pub code: Option<&'a str>,
}

/// One event of a `/v1/chat/completions` stream: a chunk, an error object
/// (a failure after the first byte, then the stream ends), or `[DONE]`.
pub struct CompletionStreamEvent;

impl utoipa::PartialSchema for CompletionStreamEvent {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        sch::openai_sse_event(vec![
            sch::component_ref::<CompletionChunk>(),
            sch::component_ref::<ErrorBody>(),
        ])
    }
}

impl ToSchema for CompletionStreamEvent {
    fn schemas(
        schemas: &mut Vec<(
            String,
            utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>,
        )>,
    ) {
        sch::register::<CompletionChunk>(schemas);
        sch::register::<ErrorBody>(schemas);
    }
}
