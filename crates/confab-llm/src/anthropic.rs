//! `AnthropicProvider`: Anthropic's Messages API, streamed (also what
//! LiteLLM's `/v1/messages` and llmock's `/anthropic` speak).
//!
//! The request follows the API's rules on the conversation: the system prompt
//! is the `system` field, not a message; the first message must be `user` and
//! roles must alternate, so consecutive messages of one role are merged (a
//! cancelled or failed reply can leave two user messages in a row) and leading
//! assistant messages are dropped; empty messages are refused by the API, so
//! they are left out.
//!
//! The stream is a sequence of named events: `message_start` (input usage),
//! `content_block_*` (the text), `message_delta` (stop reason and the
//! cumulative usage), `message_stop` (the terminator); `ping` and events
//! this module does not know are ignored, `event: error` is a failure.

use std::fmt;

use async_trait::async_trait;
use confab_core::model::MessageRole;
use confab_core::provider::{
    ChatProvider, ChatRequest, Chunk, ChunkStream, ProviderError, ReportedUsage,
};
use http::{HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};

use crate::http::{
    Flow, HttpProviderConfig, Upstream, WireFormat, body_bytes, decode_sse, endpoint, label_of,
    parse_data,
};

/// The version header sent: `2023-06-01`, the one every Messages API server
/// (Anthropic, LiteLLM, llmock) accepts; newer ones buy nothing for plain
/// text.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";
/// `base_url` when none is configured.
pub const DEFAULT_BASE_URL: &str = "https://api.anthropic.com";

/// The provider for one configured Messages API model endpoint.
#[derive(Clone)]
pub struct AnthropicProvider {
    upstream: Upstream,
}

impl fmt::Debug for AnthropicProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnthropicProvider")
            .field("upstream", &self.upstream)
            .finish()
    }
}

impl AnthropicProvider {
    /// `config.base_url` is the host root, as Anthropic's SDK takes it
    /// ([`DEFAULT_BASE_URL`]; llmock: `http://127.0.0.1:P/anthropic`);
    /// `/v1/messages` is appended. The key, when set, is sent as `x-api-key`.
    /// `Err` is a one-line reason.
    pub fn new(config: HttpProviderConfig) -> Result<Self, String> {
        let url = endpoint(&config.base_url, &["v1", "messages"])?;
        let mut headers = HeaderMap::new();
        headers.insert(
            HeaderName::from_static("anthropic-version"),
            HeaderValue::from_static(ANTHROPIC_VERSION),
        );
        let upstream = Upstream::new(
            &config,
            url,
            |key| (HeaderName::from_static("x-api-key"), key.to_string()),
            headers,
        )?;
        Ok(Self { upstream })
    }

    /// Where requests go (no credentials), for logs.
    pub fn endpoint(&self) -> &str {
        self.upstream.shown()
    }
}

#[async_trait]
impl ChatProvider for AnthropicProvider {
    fn kind(&self) -> &'static str {
        "anthropic"
    }

    async fn stream(&self, request: &ChatRequest) -> Result<ChunkStream, ProviderError> {
        let response = self.upstream.post(&body(request)).await?;
        Ok(decode_sse(body_bytes(response), AnthropicWire::default()))
    }
}

#[derive(Serialize, Debug, PartialEq)]
struct MessagesBody<'a> {
    model: &'a str,
    max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<String>,
    messages: Vec<WireMessage>,
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop_sequences: &'a [String],
}

#[derive(Serialize, Debug, PartialEq)]
struct WireMessage {
    role: &'static str,
    content: String,
}

fn body(request: &ChatRequest) -> MessagesBody<'_> {
    // The contract sends only user/assistant messages; a `system` one, should
    // it come, joins the system prompt rather than break the alternation.
    let system: Vec<&str> = request
        .system
        .as_deref()
        .into_iter()
        .chain(
            request
                .messages
                .iter()
                .filter(|m| m.role == MessageRole::System)
                .map(|m| m.content.as_str()),
        )
        .filter(|s| !s.trim().is_empty())
        .collect();
    let system = (!system.is_empty()).then(|| system.join("\n\n"));
    MessagesBody {
        model: &request.upstream_model,
        max_tokens: request.max_output_tokens,
        system,
        messages: alternate(
            request
                .messages
                .iter()
                .filter(|m| m.role != MessageRole::System)
                .map(|m| (m.role, m.content.as_str())),
        ),
        stream: true,
        // OpenAI's scale is 0–2, the Messages API's 0–1: past 1 asks for
        // the most random there is, which is 1 here (sent as is, 400).
        temperature: request.sampling.temperature.map(|t| t.min(1.0)),
        // Claude models since Sonnet 4.5 refuse `temperature` and `top_p`
        // together (400, whatever the version header), and OpenAI clients
        // often send both. Anthropic's advice is to set one: the temperature.
        top_p: request
            .sampling
            .top_p
            .filter(|_| request.sampling.temperature.is_none()),
        stop_sequences: &request.sampling.stop,
    }
}

/// The conversation as the Messages API accepts it: starting with `user`,
/// roles alternating (same-role neighbours joined by a blank line), no empty
/// messages.
fn alternate<'a>(messages: impl Iterator<Item = (MessageRole, &'a str)>) -> Vec<WireMessage> {
    let mut out: Vec<WireMessage> = Vec::new();
    for (role, content) in messages {
        // The API refuses empty and whitespace-only text blocks.
        if content.trim().is_empty() {
            continue;
        }
        let role = if role == MessageRole::Assistant {
            "assistant"
        } else {
            "user"
        };
        match out.last_mut() {
            Some(last) if last.role == role => {
                last.content.push_str("\n\n");
                last.content.push_str(content);
            }
            None if role == "assistant" => {}
            _ => out.push(WireMessage {
                role,
                content: content.to_string(),
            }),
        }
    }
    out
}

#[derive(Deserialize)]
struct TypeOnly {
    #[serde(rename = "type", default)]
    kind: Option<String>,
}

#[derive(Deserialize)]
struct MessageStart {
    message: StartedMessage,
}

#[derive(Deserialize)]
struct StartedMessage {
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct BlockStart {
    content_block: Block,
}

#[derive(Deserialize)]
struct BlockDelta {
    delta: Block,
}

/// A content block (`content_block_start`) or its delta: only `text` /
/// `text_delta` carry reply text (`thinking_delta`, `input_json_delta`,
/// `signature_delta` are not part of the reply).
#[derive(Deserialize)]
struct Block {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct MessageDelta {
    #[serde(default)]
    delta: Option<StopDelta>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct StopDelta {
    #[serde(default)]
    stop_reason: Option<String>,
}

#[derive(Deserialize, Default, Clone, Copy)]
struct Usage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
}

/// The Messages stream grammar. Keeps the running usage: `message_start`
/// gives the input side, `message_delta` the cumulative output (and, on some
/// servers such as LiteLLM, the input it only then knows).
#[derive(Default)]
pub(crate) struct AnthropicWire {
    usage: Usage,
}

impl AnthropicWire {
    /// Take the figures `update` has (they are cumulative: each replaces the
    /// last) and report the running totals.
    fn report(&mut self, update: Usage, out: &mut Vec<Chunk>) {
        let u = &mut self.usage;
        u.input_tokens = update.input_tokens.or(u.input_tokens);
        u.output_tokens = update.output_tokens.or(u.output_tokens);
        u.cache_creation_input_tokens = update
            .cache_creation_input_tokens
            .or(u.cache_creation_input_tokens);
        u.cache_read_input_tokens = update.cache_read_input_tokens.or(u.cache_read_input_tokens);
        // Cache writes and reads are input the model read and Anthropic bills
        // (at 1.25x and 0.1x the input price), and `input_tokens` excludes
        // them: the prompt is their sum, so that usage, budgets and the
        // context size all see the whole prompt. Pricing them apart would
        // need a third figure in `ReportedUsage`; the cost of a cached prompt
        // is over-counted rather than hidden.
        let prompt_tokens = u.input_tokens.unwrap_or(0)
            + u.cache_creation_input_tokens.unwrap_or(0)
            + u.cache_read_input_tokens.unwrap_or(0);
        out.push(Chunk::Usage(ReportedUsage {
            prompt_tokens,
            completion_tokens: u.output_tokens.unwrap_or(0),
        }));
    }
}

impl WireFormat for AnthropicWire {
    fn on_event(
        &mut self,
        event: &str,
        data: &str,
        out: &mut Vec<Chunk>,
    ) -> Result<Flow, ProviderError> {
        // The event name decides; a server that sends only `data:` lines
        // (the name defaults to "message") is read by the data's `type`.
        let named;
        let kind = if event == "message" || event.is_empty() {
            named = parse_data::<TypeOnly>("message event", data)?.kind;
            named.as_deref().unwrap_or("")
        } else {
            event
        };
        match kind {
            // Not parsed: a malformed ping (llmock's fault) harms nothing.
            "ping" | "content_block_stop" => {}
            "message_stop" => return Ok(Flow::Done),
            "error" => {
                // {"type":"error","error":{"type":"overloaded_error","message":"..."}}
                let kind = serde_json::from_str(data)
                    .ok()
                    .and_then(|v| label_of(&v))
                    .unwrap_or_else(|| "unknown".into());
                return Err(ProviderError::Upstream { kind });
            }
            "message_start" => {
                let start: MessageStart = parse_data("message_start", data)?;
                if let Some(usage) = start.message.usage {
                    self.report(usage, out);
                }
            }
            "content_block_start" => {
                let start: BlockStart = parse_data("content_block_start", data)?;
                push_text(start.content_block, "text", out);
            }
            "content_block_delta" => {
                let delta: BlockDelta = parse_data("content_block_delta", data)?;
                push_text(delta.delta, "text_delta", out);
            }
            "message_delta" => {
                let delta: MessageDelta = parse_data("message_delta", data)?;
                if let Some(reason) = delta
                    .delta
                    .and_then(|d| d.stop_reason)
                    .filter(|r| !r.is_empty())
                {
                    out.push(Chunk::Finish(reason));
                }
                if let Some(usage) = delta.usage {
                    self.report(usage, out);
                }
            }
            // New event types are additive in this API: ignored.
            _ => {}
        }
        Ok(Flow::Continue)
    }
}

fn push_text(block: Block, text_kind: &str, out: &mut Vec<Chunk>) {
    if block.kind.as_deref() == Some(text_kind)
        && let Some(text) = block.text
        && !text.is_empty()
    {
        out.push(Chunk::Delta(text));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::testing::{decode_all_splits, text_of};
    use confab_core::provider::PromptMessage;
    use std::time::Duration;

    fn decode(bytes: &[u8]) -> Vec<Result<Chunk, ProviderError>> {
        decode_all_splits(bytes, AnthropicWire::default)
    }

    fn non_text(chunks: &[Result<Chunk, ProviderError>]) -> Vec<Result<Chunk, ProviderError>> {
        chunks
            .iter()
            .filter(|c| !matches!(c, Ok(Chunk::Delta(_))))
            .cloned()
            .collect()
    }

    fn usage(prompt_tokens: u64, completion_tokens: u64) -> Result<Chunk, ProviderError> {
        Ok(Chunk::Usage(ReportedUsage {
            prompt_tokens,
            completion_tokens,
        }))
    }

    #[test]
    fn llmock_stream_decodes_at_every_split() {
        let chunks = decode(include_bytes!("../testdata/llmock-anthropic.sse"));
        assert_eq!(
            text_of(&chunks),
            "Hello! claude-sonnet-4-5 received: Say hi, caf\u{e9} \u{2615}"
        );
        assert_eq!(
            non_text(&chunks),
            vec![
                usage(5, 1),
                Ok(Chunk::Finish("end_turn".into())),
                usage(5, 12)
            ]
        );
    }

    #[test]
    fn llmock_faults() {
        // llmock's `malformed` fault cuts the `ping` data, which is not read:
        // the reply is whole.
        let chunks = decode(include_bytes!("../testdata/llmock-anthropic-malformed.sse"));
        assert_eq!(text_of(&chunks), "Hello! claude-sonnet-4-5 received: hi");
        assert_eq!(chunks.last(), Some(&usage(0, 9)));
        let chunks = decode(include_bytes!("../testdata/llmock-anthropic-truncate.sse"));
        assert_eq!(chunks, vec![usage(0, 1), Err(ProviderError::Truncated)]);
    }

    #[test]
    fn usage_is_cumulative_and_counts_cache_tokens_as_prompt() {
        let body = concat!(
            "event: message_start\n",
            "data: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"usage\":{\"input_tokens\":10,\"cache_creation_input_tokens\":100,\"cache_read_input_tokens\":1000,\"output_tokens\":1}}}\n\n",
            "event: content_block_delta\n",
            "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"a\"}}\n\n",
            "event: message_delta\n",
            "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"max_tokens\"},\"usage\":{\"output_tokens\":7}}\n\n",
            "event: message_delta\n",
            "data: {\"type\":\"message_delta\",\"delta\":{},\"usage\":{\"output_tokens\":9,\"cache_read_input_tokens\":null}}\n\n",
            "event: message_stop\n",
            "data: {\"type\":\"message_stop\"}\n\n",
        );
        let chunks = decode(body.as_bytes());
        assert_eq!(
            non_text(&chunks),
            vec![
                usage(1110, 1),
                Ok(Chunk::Finish("max_tokens".into())),
                usage(1110, 7),
                usage(1110, 9),
            ]
        );
        // LiteLLM's translation: input 0 at the start, the real figure at the end.
        let body = concat!(
            "event: message_start\n",
            "data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":0,\"output_tokens\":0}}}\n\n",
            "event: message_delta\n",
            "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"input_tokens\":12,\"output_tokens\":3}}\n\n",
            "event: message_stop\n",
            "data: {\"type\":\"message_stop\"}\n\n",
        );
        assert_eq!(
            non_text(&decode(body.as_bytes())),
            vec![
                usage(0, 0),
                Ok(Chunk::Finish("end_turn".into())),
                usage(12, 3)
            ]
        );
    }

    #[test]
    fn only_text_deltas_are_text_and_unknown_events_are_ignored() {
        let body = concat!(
            "event: content_block_start\n",
            "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"thinking\",\"thinking\":\"\"}}\n\n",
            "event: content_block_delta\n",
            "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"thinking_delta\",\"thinking\":\"hmm\"}}\n\n",
            "event: content_block_delta\n",
            "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"signature_delta\",\"signature\":\"x\"}}\n\n",
            "event: content_block_delta\n",
            "data: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\"}}\n\n",
            "event: content_block_start\n",
            "data: {\"type\":\"content_block_start\",\"index\":2,\"content_block\":{\"type\":\"text\",\"text\":\"Hi\"}}\n\n",
            "event: content_block_delta\n",
            "data: {\"type\":\"content_block_delta\",\"index\":2,\"delta\":{\"type\":\"text_delta\",\"text\":\"\"}}\n\n",
            "event: content_block_delta\n",
            "data: {\"type\":\"content_block_delta\",\"index\":2,\"delta\":{\"type\":\"text_delta\",\"text\":\" there\"}}\n\n",
            "event: brand_new_event\n",
            "data: {\"type\":\"brand_new_event\",\"whatever\":[1,2]}\n\n",
            "event: ping\n",
            "data: not even json\n\n",
            "event: message_delta\n",
            "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"refusal_v2\"}}\n\n",
            "event: message_stop\n",
            "data: {\"type\":\"message_stop\"}\n\n",
        );
        let chunks = decode(body.as_bytes());
        assert_eq!(
            chunks,
            vec![
                Ok(Chunk::Delta("Hi".into())),
                Ok(Chunk::Delta(" there".into())),
                Ok(Chunk::Finish("refusal_v2".into())),
            ]
        );
    }

    #[test]
    fn data_only_events_are_read_by_their_type() {
        let body = concat!(
            "data: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"x\"}}\n\n",
            "data: {\"type\":\"message_stop\"}\n\n",
        );
        assert_eq!(decode(body.as_bytes()), vec![Ok(Chunk::Delta("x".into()))]);
    }

    #[test]
    fn error_events_are_upstream_errors_and_bad_json_is_malformed() {
        let body = concat!(
            "event: content_block_delta\n",
            "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"par\"}}\n\n",
            "event: error\n",
            "data: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded secret\"}}\n\n",
        );
        assert_eq!(
            decode(body.as_bytes()),
            vec![
                Ok(Chunk::Delta("par".into())),
                Err(ProviderError::Upstream {
                    kind: "overloaded_error".into()
                })
            ]
        );
        assert_eq!(
            decode(b"event: error\ndata: upstream crashed\n\n"),
            vec![Err(ProviderError::Upstream {
                kind: "unknown".into()
            })]
        );
        let chunks = decode(b"event: content_block_delta\ndata: {\"delta\":{\"text\":\"secret\n\n");
        let [Err(ProviderError::Malformed { detail })] = chunks.as_slice() else {
            panic!("{chunks:?}");
        };
        assert!(!detail.contains("secret"));
        // A stream without message_stop is cut short.
        let body = "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"}}\n\n";
        assert_eq!(
            decode(body.as_bytes()),
            vec![
                Ok(Chunk::Finish("end_turn".into())),
                Err(ProviderError::Truncated)
            ]
        );
    }

    fn msg(role: MessageRole, content: &str) -> PromptMessage {
        PromptMessage {
            role,
            content: content.into(),
        }
    }

    #[test]
    fn conversation_starts_with_user_and_alternates() {
        use MessageRole::{Assistant, System, User};
        let request = ChatRequest {
            upstream_model: "claude-sonnet-4-5".into(),
            system: Some("Be brief.".into()),
            messages: vec![
                msg(Assistant, "leading reply, dropped"),
                msg(Assistant, "another, dropped"),
                msg(User, "first"),
                msg(User, "second"),
                msg(Assistant, "   "),
                msg(User, "third"),
                msg(Assistant, "a1"),
                msg(System, "Also formal."),
                msg(Assistant, "a2"),
                msg(User, "last"),
            ],
            max_output_tokens: 300,
            interactive: false,
            sampling: Default::default(),
        };
        let body = serde_json::to_value(body(&request)).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "model": "claude-sonnet-4-5",
                "max_tokens": 300,
                "system": "Be brief.\n\nAlso formal.",
                "messages": [
                    {"role": "user", "content": "first\n\nsecond\n\nthird"},
                    {"role": "assistant", "content": "a1\n\na2"},
                    {"role": "user", "content": "last"},
                ],
                "stream": true,
            })
        );
        let bare = ChatRequest {
            system: None,
            messages: vec![msg(User, "hi")],
            ..request
        };
        let body = serde_json::to_value(super::body(&bare)).unwrap();
        assert!(body.get("system").is_none());
    }

    /// OpenAI clients' sampling, as the Messages API takes it: temperature
    /// on its 0–1 scale, and never with `top_p` (newer Claude models refuse
    /// the pair with a 400).
    #[test]
    fn openai_sampling_is_sent_as_anthropic_accepts_it() {
        let sampled = |temperature: Option<f64>, top_p: Option<f64>| {
            let request = ChatRequest {
                upstream_model: "claude-sonnet-4-5".into(),
                system: None,
                messages: vec![msg(MessageRole::User, "hi")],
                max_output_tokens: 10,
                interactive: false,
                sampling: confab_core::provider::Sampling {
                    temperature,
                    top_p,
                    stop: Vec::new(),
                },
            };
            let body = serde_json::to_value(body(&request)).unwrap();
            (body.get("temperature").cloned(), body.get("top_p").cloned())
        };
        let json = |v: f64| Some(serde_json::json!(v));
        assert_eq!(sampled(Some(1.7), None), (json(1.0), None));
        assert_eq!(sampled(Some(0.3), None), (json(0.3), None));
        assert_eq!(sampled(Some(0.7), Some(0.9)), (json(0.7), None));
        assert_eq!(sampled(None, Some(0.9)), (None, json(0.9)));
        assert_eq!(sampled(None, None), (None, None));
    }

    #[test]
    fn constructor_and_debug() {
        let p = AnthropicProvider::new(HttpProviderConfig {
            base_url: "http://127.0.0.1:9/anthropic/".into(),
            api_key: Some("sk-ant-do-not-show".into()),
            connect_timeout: Duration::from_secs(5),
        })
        .unwrap();
        assert_eq!(p.kind(), "anthropic");
        assert_eq!(p.endpoint(), "http://127.0.0.1:9/anthropic/v1/messages");
        assert!(!format!("{p:?}").contains("sk-ant"));
        let p = AnthropicProvider::new(HttpProviderConfig {
            base_url: DEFAULT_BASE_URL.into(),
            api_key: None,
            connect_timeout: Duration::from_secs(5),
        })
        .unwrap();
        assert_eq!(p.endpoint(), "https://api.anthropic.com/v1/messages");
        assert!(
            AnthropicProvider::new(HttpProviderConfig {
                base_url: "api.anthropic.com".into(),
                api_key: None,
                connect_timeout: Duration::from_secs(5),
            })
            .is_err()
        );
    }
}
