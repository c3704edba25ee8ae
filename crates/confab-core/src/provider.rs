//! The model-provider contract (SPEC §11). Providers live in `confab-llm`,
//! one module each (`simulated`, `openai`, `anthropic`); the turn engine in
//! this crate drives them and owns everything that is policy: retries,
//! timeouts, usage settlement, what a failure means for the client.
//!
//! A provider only talks to its model: it opens one upstream attempt per
//! [`ChatProvider::stream`] call and turns the upstream's wire format into
//! normalized [`Chunk`]s, judging the upstream's status codes into
//! [`ProviderError`] variants.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;

use crate::model::MessageRole;

/// One message of the conversation sent to the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromptMessage {
    pub role: MessageRole,
    pub content: String,
}

/// What a provider is asked for: one model call.
#[derive(Clone, Debug)]
pub struct ChatRequest {
    /// The id sent upstream (`upstream_model` of the models file).
    pub upstream_model: String,
    /// The system prompt, when the chat has one (providers place it where
    /// their API wants it: a `system` message, or Anthropic's `system` field).
    pub system: Option<String>,
    /// The conversation, oldest first, `user`/`assistant` only, the new user
    /// message last.
    pub messages: Vec<PromptMessage>,
    /// Sent upstream as the output cap.
    pub max_output_tokens: u32,
    /// Whether a client watches the tokens as they come. A provider that
    /// paces its output for realism (the simulated model) may answer at once
    /// when nobody watches; real providers always stream upstream, so that
    /// timeouts and cancellation work the same for both routes.
    pub interactive: bool,
    /// Sampling settings the client asked for (the OpenAI-compatible API).
    pub sampling: Sampling,
}

/// Sampling settings passed to the model as asked; `None` and an empty
/// `stop` leave the model's defaults.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sampling {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// Sequences that end the reply (at most 4, as OpenAI allows).
    pub stop: Vec<String>,
}

/// Token accounting as reported by the model: the latest figures win (a
/// provider that reports in pieces, like Anthropic's `message_start` +
/// `message_delta`, sends its running totals each time).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReportedUsage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// A normalized piece of a streamed reply.
#[derive(Clone, Debug, PartialEq)]
pub enum Chunk {
    /// More text of the reply (never empty).
    Delta(String),
    /// Token accounting, when the provider reports it.
    Usage(ReportedUsage),
    /// Why the model stopped (`"stop"`, `"length"`, `"end_turn"`, or any value
    /// the upstream invents: recorded, never an error). More chunks (usage)
    /// may follow; the reply is complete only when the stream ends.
    Finish(String),
}

/// Which of the engine's clocks ran out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeoutPhase {
    /// Establishing the connection.
    Connect,
    /// Waiting for the first token.
    FirstToken,
    /// Silence between two chunks after the first one.
    Idle,
    /// The whole reply took too long.
    Total,
}

impl TimeoutPhase {
    pub const fn as_str(self) -> &'static str {
        match self {
            TimeoutPhase::Connect => "connect",
            TimeoutPhase::FirstToken => "first_token",
            TimeoutPhase::Idle => "idle",
            TimeoutPhase::Total => "total",
        }
    }
}

/// Why a model call failed. `Display` is safe to show to a client and to log:
/// it never contains the upstream's body, its URL or a key. `detail` fields
/// are for logs only and hold no message text either (providers keep at
/// most an error `type`/`code` of the upstream's body).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ProviderError {
    /// The upstream could not be reached (refused, reset, DNS, TLS).
    #[error("could not reach the model provider")]
    Connect { detail: String },
    #[error("the model provider timed out ({})", .0.as_str())]
    Timeout(TimeoutPhase),
    /// 429.
    #[error("the model provider is rate limiting requests")]
    RateLimited {
        status: u16,
        retry_after: Option<Duration>,
    },
    /// 408, 500, 502, 503, 504, 529: worth another attempt.
    #[error("the model provider is overloaded (HTTP {status})")]
    Overloaded {
        status: u16,
        retry_after: Option<Duration>,
    },
    /// 401 / 403: the provider key is missing, wrong or not allowed.
    #[error("the model provider refused confab's credentials (HTTP {status})")]
    Auth { status: u16 },
    /// Any other 4xx: the request itself was refused (unknown upstream model,
    /// too long, ...). `reason` is a short, safe label such as the upstream
    /// error `type`.
    #[error("the model provider refused the request (HTTP {status})")]
    BadRequest { status: u16, reason: String },
    /// The stream ended without its terminator (`[DONE]`, `message_stop`).
    #[error("the model's stream ended before the reply was complete")]
    Truncated,
    /// Bytes that are not the provider's wire format.
    #[error("the model sent a reply that could not be read")]
    Malformed { detail: String },
    /// The upstream reported an error inside an open stream (an `error`
    /// object in a `data:` line, Anthropic's `event: error`).
    #[error("the model provider reported an error mid-reply")]
    Upstream { kind: String },
}

impl ProviderError {
    /// Worth another attempt, if no token has been forwarded yet (SPEC §11).
    /// A stream cut before any text is a connection error as far as the
    /// client can tell; an overload or rate limit reported inside an opened
    /// stream (Anthropic's `event: error` after its 200) is one too.
    pub fn is_retryable(&self) -> bool {
        match self {
            ProviderError::Connect { .. }
            | ProviderError::RateLimited { .. }
            | ProviderError::Overloaded { .. }
            | ProviderError::Truncated => true,
            ProviderError::Upstream { kind } => {
                matches!(kind.as_str(), "overloaded_error" | "rate_limit_error")
            }
            ProviderError::Timeout(phase) => {
                matches!(phase, TimeoutPhase::Connect | TimeoutPhase::FirstToken)
            }
            _ => false,
        }
    }

    /// What the upstream asked us to wait, when it said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::RateLimited { retry_after, .. }
            | ProviderError::Overloaded { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The upstream HTTP status, when there was one.
    pub fn status(&self) -> Option<u16> {
        match self {
            ProviderError::RateLimited { status, .. }
            | ProviderError::Overloaded { status, .. }
            | ProviderError::Auth { status }
            | ProviderError::BadRequest { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// A short label for metrics and logs (bounded set).
    pub const fn label(&self) -> &'static str {
        match self {
            ProviderError::Connect { .. } => "connect",
            ProviderError::Timeout(TimeoutPhase::Connect) => "timeout_connect",
            ProviderError::Timeout(TimeoutPhase::FirstToken) => "timeout_first_token",
            ProviderError::Timeout(TimeoutPhase::Idle) => "timeout_idle",
            ProviderError::Timeout(TimeoutPhase::Total) => "timeout_total",
            ProviderError::RateLimited { .. } => "rate_limited",
            ProviderError::Overloaded { .. } => "overloaded",
            ProviderError::Auth { .. } => "auth",
            ProviderError::BadRequest { .. } => "bad_request",
            ProviderError::Truncated => "truncated",
            ProviderError::Malformed { .. } => "malformed",
            ProviderError::Upstream { .. } => "upstream_error",
        }
    }

    /// Judge an upstream HTTP status that is not a success. `retry_after`
    /// comes from the `retry-after-ms` / `retry-after` headers.
    pub fn from_status(status: u16, retry_after: Option<Duration>, reason: String) -> Self {
        match status {
            429 => ProviderError::RateLimited {
                status,
                retry_after,
            },
            408 | 500 | 502 | 503 | 504 | 529 => ProviderError::Overloaded {
                status,
                retry_after,
            },
            401 | 403 => ProviderError::Auth { status },
            _ => ProviderError::BadRequest { status, reason },
        }
    }
}

pub type ChunkStream = BoxStream<'static, Result<Chunk, ProviderError>>;

/// A model API. Dyn-compatible; one instance per configured model.
#[async_trait]
pub trait ChatProvider: Send + Sync + 'static {
    /// The provider kind (`"openai"`, `"anthropic"`, `"simulated"`).
    fn kind(&self) -> &'static str;

    /// Whether the model should be sent the earlier messages of the chat
    /// (costs a query per turn; the simulated model does not need them).
    fn wants_history(&self) -> bool {
        true
    }

    /// Open one upstream attempt. Resolves once the upstream has answered
    /// with a success status (or with the error it answered); the stream then
    /// yields the reply and ends after the upstream's terminator; a body that
    /// ends without one yields [`ProviderError::Truncated`]. Dropping the
    /// stream (or this future) must close the upstream request at once.
    async fn stream(&self, request: &ChatRequest) -> Result<ChunkStream, ProviderError>;
}

/// Counts tokens the way a model family does (or estimates them).
pub trait TokenCounter: Send + Sync + 'static {
    /// The tokenizer's name, for logs (`"o200k_base"`, `"estimate"`, ...).
    fn name(&self) -> &'static str;
    fn count(&self, text: &str) -> u64;
}

impl fmt::Debug for dyn TokenCounter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_judged_as_spec_says() {
        for status in [408, 500, 502, 503, 504, 529] {
            let err = ProviderError::from_status(status, None, String::new());
            assert!(err.is_retryable(), "{status}");
            assert_eq!(err.label(), "overloaded");
        }
        let limited = ProviderError::from_status(429, Some(Duration::from_secs(2)), String::new());
        assert!(limited.is_retryable());
        assert_eq!(limited.retry_after(), Some(Duration::from_secs(2)));
        for status in [400, 401, 403, 404, 422] {
            assert!(!ProviderError::from_status(status, None, String::new()).is_retryable());
        }
        assert!(ProviderError::Timeout(TimeoutPhase::FirstToken).is_retryable());
        assert!(!ProviderError::Timeout(TimeoutPhase::Idle).is_retryable());
        assert!(ProviderError::Truncated.is_retryable());
        assert!(
            ProviderError::Upstream {
                kind: "overloaded_error".into()
            }
            .is_retryable()
        );
        assert!(
            !ProviderError::Upstream {
                kind: "invalid_request_error".into()
            }
            .is_retryable()
        );
    }

    #[test]
    fn display_never_carries_details() {
        let err = ProviderError::Connect {
            detail: "http://user:secret@host/".into(),
        };
        assert!(!err.to_string().contains("secret"));
        let err = ProviderError::BadRequest {
            status: 400,
            reason: "invalid_request_error".into(),
        };
        assert!(!err.to_string().contains("invalid_request_error"));
    }
}
