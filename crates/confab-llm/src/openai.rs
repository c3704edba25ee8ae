//! `OpenAiProvider`: any Chat Completions server (OpenAI, vLLM, Ollama's
//! `/v1`, llama.cpp's server, LM Studio, OpenRouter, LiteLLM), streamed.
//!
//! The stream is parsed with lenient types of our own rather than
//! async-openai's: those reject `finish_reason` values they do not know and
//! turn a mid-stream `error` object into a deserialize error, and the servers
//! above all differ a little (STACK-NOTES, "Real LLM APIs"):
//! - the usage chunk comes with `choices: []` (OpenAI, llmock), with
//!   `choices: [{"index":0,"delta":{}}]` (LiteLLM) or beside content;
//!   `usage: null` on every other chunk; `prompt_tokens` may be 0 (llmock);
//! - `delta.content` is null or absent on role-only, tool-call and
//!   `reasoning_content` chunks: only text is kept, empty text is dropped;
//! - a failure after the 200 is a `data:` line holding an `error` object
//!   (LiteLLM), or an `error` string (Ollama), and then the body just ends.

use std::fmt;

use async_trait::async_trait;
use confab_core::provider::{
    ChatProvider, ChatRequest, Chunk, ChunkStream, ProviderError, ReportedUsage,
};
use http::HeaderMap;
use serde::{Deserialize, Serialize};

use crate::http::{
    Flow, HttpProviderConfig, Upstream, WireFormat, body_bytes, decode_sse, endpoint, label_of,
    parse_data,
};

/// The provider for one configured Chat Completions model endpoint.
#[derive(Clone)]
pub struct OpenAiProvider {
    upstream: Upstream,
    /// The output cap goes in `max_completion_tokens` instead of `max_tokens`.
    completion_cap: bool,
}

impl fmt::Debug for OpenAiProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiProvider")
            .field("upstream", &self.upstream)
            .finish()
    }
}

impl OpenAiProvider {
    /// `config.base_url` ends in `/v1`, as the OpenAI SDK takes it
    /// (`https://api.openai.com/v1`, `http://127.0.0.1:11434/v1`);
    /// `/chat/completions` is appended. The key, when set, is sent as
    /// `Authorization: Bearer`. `Err` is a one-line reason.
    pub fn new(config: HttpProviderConfig) -> Result<Self, String> {
        let url = endpoint(&config.base_url, &["chat", "completions"])?;
        // api.openai.com refuses `max_tokens` on its reasoning models (o1, o3,
        // o4-mini, gpt-5: "Unsupported parameter ... use
        // 'max_completion_tokens'"), and takes `max_completion_tokens` on every
        // chat model. Other servers do not all know the newer field (older
        // vLLM, Ollama and llama.cpp read only `max_tokens`), so it is sent
        // only to OpenAI itself. Sending both was rejected: OpenAI refuses a
        // request that has both.
        let completion_cap = url.host_str() == Some("api.openai.com");
        let upstream = Upstream::new(
            &config,
            url,
            |key| (http::header::AUTHORIZATION, format!("Bearer {key}")),
            HeaderMap::new(),
        )?;
        Ok(Self {
            upstream,
            completion_cap,
        })
    }

    fn body<'a>(&self, request: &'a ChatRequest) -> ChatBody<'a> {
        let system = request.system.as_deref().map(|content| WireMessage {
            role: "system",
            content,
        });
        let messages = system
            .into_iter()
            .chain(request.messages.iter().map(|m| WireMessage {
                role: m.role.as_str(),
                content: &m.content,
            }))
            .collect();
        let cap = Some(request.max_output_tokens);
        ChatBody {
            model: &request.upstream_model,
            messages,
            stream: true,
            stream_options: StreamOptions {
                include_usage: true,
            },
            max_tokens: cap.filter(|_| !self.completion_cap),
            max_completion_tokens: cap.filter(|_| self.completion_cap),
            temperature: request.sampling.temperature,
            top_p: request.sampling.top_p,
            stop: &request.sampling.stop,
        }
    }
}

#[async_trait]
impl ChatProvider for OpenAiProvider {
    fn kind(&self) -> &'static str {
        "openai"
    }

    async fn stream(&self, request: &ChatRequest) -> Result<ChunkStream, ProviderError> {
        let response = self.upstream.post(&self.body(request)).await?;
        Ok(decode_sse(body_bytes(response), OpenAiWire))
    }
}

#[derive(Serialize)]
struct ChatBody<'a> {
    model: &'a str,
    messages: Vec<WireMessage<'a>>,
    stream: bool,
    stream_options: StreamOptions,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_completion_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
}

#[derive(Serialize)]
struct WireMessage<'a> {
    role: &'a str,
    content: &'a str,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

/// One `data:` line. Every field is optional and unknown fields are ignored:
/// only what we use has to have the expected shape.
#[derive(Deserialize)]
struct StreamChunk {
    #[serde(default)]
    choices: Option<Vec<Choice>>,
    #[serde(default)]
    usage: Option<Usage>,
    /// An object (OpenAI, LiteLLM) or a string (Ollama); `null` is no error.
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    index: Option<u64>,
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Delta {
    /// Null on role-only and tool-call chunks; `reasoning_content`,
    /// `tool_calls` and the like are not read at all.
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
}

/// The Chat Completions stream grammar (stateless: usage is reported whole).
pub(crate) struct OpenAiWire;

impl WireFormat for OpenAiWire {
    fn on_event(
        &mut self,
        event: &str,
        data: &str,
        out: &mut Vec<Chunk>,
    ) -> Result<Flow, ProviderError> {
        let data = data.trim();
        if data == "[DONE]" {
            return Ok(Flow::Done);
        }
        if event == "error" {
            // Not OpenAI's own format, but some gateways name the event.
            let kind = serde_json::from_str(data)
                .ok()
                .and_then(|v| label_of(&v))
                .unwrap_or_else(unknown);
            return Err(ProviderError::Upstream { kind });
        }
        let chunk: StreamChunk = parse_data("chat completion chunk", data)?;
        if let Some(error) = chunk.error.filter(|e| !e.is_null()) {
            // `label_of` reads `error.code` / `error.type`; a bare string is
            // message text and is not kept.
            let kind = label_of(&serde_json::json!({ "error": error })).unwrap_or_else(unknown);
            return Err(ProviderError::Upstream { kind });
        }
        // Only the first choice: confab asks for one (no `n`).
        for choice in chunk.choices.into_iter().flatten() {
            if choice.index.unwrap_or(0) != 0 {
                continue;
            }
            if let Some(text) = choice.delta.and_then(|d| d.content)
                && !text.is_empty()
            {
                out.push(Chunk::Delta(text));
            }
            if let Some(reason) = choice.finish_reason.filter(|r| !r.is_empty()) {
                out.push(Chunk::Finish(reason));
            }
        }
        // An empty `usage: {}` would report zeros over nothing: skipped.
        if let Some(usage) = chunk.usage
            && (usage.prompt_tokens.is_some() || usage.completion_tokens.is_some())
        {
            out.push(Chunk::Usage(ReportedUsage {
                prompt_tokens: usage.prompt_tokens.unwrap_or(0),
                completion_tokens: usage.completion_tokens.unwrap_or(0),
            }));
        }
        Ok(Flow::Continue)
    }
}

fn unknown() -> String {
    "unknown".into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::testing::{decode_all_splits, text_of};
    use confab_core::model::MessageRole;
    use confab_core::provider::PromptMessage;
    use std::time::Duration;

    fn decode(bytes: &[u8]) -> Vec<Result<Chunk, ProviderError>> {
        decode_all_splits(bytes, || OpenAiWire)
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
        let chunks = decode(include_bytes!("../testdata/llmock-openai.sse"));
        assert_eq!(
            text_of(&chunks),
            "gpt-4o-mini mock reply: I saw 'Be brief. Say hi, caf\u{e9} \u{2615}'."
        );
        assert_eq!(
            non_text(&chunks),
            vec![Ok(Chunk::Finish("stop".into())), usage(5, 14)]
        );
        assert!(
            chunks
                .iter()
                .all(|c| !matches!(c, Ok(Chunk::Delta(d)) if d.is_empty()))
        );
    }

    #[test]
    fn llmock_faults_are_failures() {
        // `stream_fault` malformed: a JSON line cut in the middle.
        let chunks = decode(include_bytes!("../testdata/llmock-openai-malformed.sse"));
        assert_eq!(text_of(&chunks), "Simulated ");
        let Some(Err(ProviderError::Malformed { detail })) = chunks.last() else {
            panic!("{chunks:?}");
        };
        assert!(!detail.contains("chatcmpl"), "{detail}");
        // `stream_fault` truncate: the body ends without `[DONE]`.
        let chunks = decode(include_bytes!("../testdata/llmock-openai-truncate.sse"));
        assert_eq!(chunks.last(), Some(&Err(ProviderError::Truncated)));
        assert_eq!(text_of(&chunks), "Simulated ");
    }

    #[test]
    fn litellm_usage_with_an_empty_delta_and_its_mid_stream_error() {
        // LiteLLM 1.108 mock_response: 3-character deltas, the usage chunk with
        // an empty delta in choices, then [DONE].
        let body = concat!(
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hel\"}}]}\n\n",
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo!\"}}]}\n\n",
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{}}],\"usage\":{\"completion_tokens\":2,\"prompt_tokens\":9,\"total_tokens\":11}}\n\n",
            "data: [DONE]\n\n",
        );
        let chunks = decode(body.as_bytes());
        assert_eq!(text_of(&chunks), "Hello!");
        assert_eq!(
            non_text(&chunks),
            vec![Ok(Chunk::Finish("stop".into())), usage(9, 2)]
        );
        // Mid-stream upstream failure: HTTP 200, an error object, no [DONE].
        let body = concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}]}\n\n",
            "data: {\"error\":{\"message\":\"litellm.APIConnectionError: secret upstream text\",\"type\":\"None\",\"param\":\"None\",\"code\":\"500\"}}\n\n",
        );
        let chunks = decode(body.as_bytes());
        assert_eq!(
            chunks,
            vec![
                Ok(Chunk::Delta("Hel".into())),
                Err(ProviderError::Upstream {
                    kind: "unknown".into()
                })
            ]
        );
    }

    #[test]
    fn error_objects_and_strings_mid_stream_are_upstream_errors() {
        let cases = [
            (
                r#"{"error":{"message":"The server had an error","type":"server_error","code":null}}"#,
                "server_error",
            ),
            (
                r#"{"error":{"message":"x","type":"invalid_request_error","code":"context_length_exceeded"}}"#,
                "context_length_exceeded",
            ),
            // Ollama: a plain string (message text, not kept).
            (
                r#"{"error":"an error was encountered while running the model"}"#,
                "unknown",
            ),
        ];
        for (line, kind) in cases {
            let body = format!("data: {line}\n\n");
            let chunks = decode(body.as_bytes());
            assert_eq!(
                chunks,
                vec![Err(ProviderError::Upstream { kind: kind.into() })],
                "{line}"
            );
        }
        // `error: null` is not an error.
        let chunks = decode(b"data: {\"error\":null,\"choices\":[]}\n\ndata: [DONE]\n\n");
        assert_eq!(chunks, vec![]);
        // A named `event: error`, JSON or not.
        let chunks = decode(b"event: error\ndata: {\"type\":\"overloaded_error\"}\n\n");
        assert_eq!(
            chunks,
            vec![Err(ProviderError::Upstream {
                kind: "overloaded_error".into()
            })]
        );
        let chunks = decode(b"event: error\ndata: boom\n\n");
        assert_eq!(
            chunks,
            vec![Err(ProviderError::Upstream {
                kind: "unknown".into()
            })]
        );
    }

    #[test]
    fn usage_variants() {
        // OpenAI / llmock: `choices: []`, prompt_tokens 0 is reported as sent.
        let chunks = decode(
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":0,\"completion_tokens\":8,\"total_tokens\":8}}\n\ndata: [DONE]\n\n",
        );
        assert_eq!(chunks, vec![usage(0, 8)]);
        // Usage beside the last content and the finish reason (some vLLM / llama.cpp).
        let chunks = decode(
            b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"end\"},\"finish_reason\":\"length\"}],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\ndata: [DONE]\n\n",
        );
        assert_eq!(
            chunks,
            vec![
                Ok(Chunk::Delta("end".into())),
                Ok(Chunk::Finish("length".into())),
                usage(3, 4)
            ]
        );
        // `usage: null`, `usage: {}` and no usage at all report nothing.
        let chunks = decode(
            b"data: {\"choices\":[],\"usage\":null}\n\ndata: {\"choices\":[],\"usage\":{}}\n\ndata: {\"choices\":null}\n\ndata: [DONE]\n\n",
        );
        assert_eq!(chunks, vec![]);
    }

    #[test]
    fn deltas_without_text_are_skipped_and_unknown_finish_reasons_kept() {
        let body = concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\"}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":null,\"reasoning_content\":\"hmm\"}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"name\":\"f\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\"}}]}\n\n",
            "data: {\"choices\":[{\"index\":1,\"delta\":{\"content\":\"other choice\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"ok\"},\"finish_reason\":null}]}\n\n",
            ": keep-alive comment\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"content_filter_v9\"}],\"new_field\":{\"x\":1}}\n\n",
            "data: [DONE]\n\n",
        );
        let chunks = decode(body.as_bytes());
        assert_eq!(
            chunks,
            vec![
                Ok(Chunk::Delta("ok".into())),
                Ok(Chunk::Finish("content_filter_v9".into())),
            ]
        );
    }

    #[test]
    fn malformed_json_is_malformed_without_its_text() {
        for line in [
            "{\"choices\":[{\"delta\":{\"content\":\"secret text",
            "not json at all secret",
            "{\"choices\":\"secret\"}",
            "{\"choices\":[{\"delta\":{\"content\":42}}],\"secret\":1}",
        ] {
            let body = format!("data: {line}\n\ndata: [DONE]\n\n");
            let chunks = decode(body.as_bytes());
            let [Err(ProviderError::Malformed { detail })] = chunks.as_slice() else {
                panic!("{line}: {chunks:?}");
            };
            assert!(!detail.contains("secret"), "{detail}");
        }
    }

    fn request(messages: &[(MessageRole, &str)], system: Option<&str>) -> ChatRequest {
        ChatRequest {
            upstream_model: "gpt-4o-mini".into(),
            system: system.map(str::to_string),
            messages: messages
                .iter()
                .map(|(role, content)| PromptMessage {
                    role: *role,
                    content: content.to_string(),
                })
                .collect(),
            max_output_tokens: 256,
            interactive: true,
            sampling: Default::default(),
        }
    }

    fn provider(base_url: &str) -> OpenAiProvider {
        OpenAiProvider::new(HttpProviderConfig {
            base_url: base_url.into(),
            api_key: Some("sk-do-not-show".into()),
            connect_timeout: Duration::from_secs(5),
        })
        .unwrap()
    }

    #[test]
    fn body_puts_the_system_prompt_first_and_the_cap_where_the_host_wants_it() {
        let req = request(
            &[
                (MessageRole::User, "hi"),
                (MessageRole::Assistant, "hello"),
                (MessageRole::User, "again"),
            ],
            Some("Be brief."),
        );
        let local = provider("http://127.0.0.1:11434/v1/");
        let body = serde_json::to_value(local.body(&req)).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "model": "gpt-4o-mini",
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "again"},
                ],
                "stream": true,
                "stream_options": {"include_usage": true},
                "max_tokens": 256,
            })
        );
        let openai = provider("https://api.openai.com/v1");
        let body =
            serde_json::to_value(openai.body(&request(&[(MessageRole::User, "x")], None))).unwrap();
        assert_eq!(body["max_completion_tokens"], 256);
        assert!(body.get("max_tokens").is_none());
        assert_eq!(body["messages"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn constructor_refuses_bad_urls_and_debug_hides_the_key() {
        let err = OpenAiProvider::new(HttpProviderConfig {
            base_url: "localhost:8000/v1".into(),
            api_key: None,
            connect_timeout: Duration::from_secs(5),
        })
        .unwrap_err();
        assert!(err.contains("base_url"), "{err}");
        let p = provider("https://api.openai.com/v1");
        assert_eq!(p.kind(), "openai");
        let shown = format!("{p:?}");
        assert!(!shown.contains("sk-do-not-show"), "{shown}");
        assert!(shown.contains("https://api.openai.com/v1/chat/completions"));
    }
}
