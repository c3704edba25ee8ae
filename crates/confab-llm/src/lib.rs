//! Model providers behind `confab_core::provider::ChatProvider`, and the
//! token counters the turn engine fits context with.
//!
//! - [`simulated`]: the deterministic built-in model (the default).
//! - [`openai`]: any Chat Completions server (OpenAI, vLLM, Ollama, llama.cpp,
//!   LM Studio, OpenRouter, LiteLLM).
//! - [`anthropic`]: Anthropic's Messages API.
//! - [`http`]: what the two HTTP providers share (client, TLS, status and
//!   header judging, the SSE decoder).
//! - [`tokenizer`]: [`tokenizer_for`] a model: OpenAI BPEs or an estimate.
//! - [`catalog`]: the models file and environment shortcuts, built into the
//!   core's model registry.
//!
//! Providers only translate: one upstream attempt per `stream` call, no
//! retries and no first-token/idle/total clocks (the turn engine in
//! `confab-core` owns those, around the stream). The server's `main` calls
//! [`install_tls_provider`] once at start-up.

pub mod anthropic;
pub mod catalog;
pub mod http;
pub mod openai;
pub mod simulated;
pub mod tokenizer;

pub use anthropic::AnthropicProvider;
pub use http::{HttpProviderConfig, install_tls_provider};
pub use openai::OpenAiProvider;
pub use simulated::{SimulatedModel, TokenDelay};
pub use tokenizer::tokenizer_for;
