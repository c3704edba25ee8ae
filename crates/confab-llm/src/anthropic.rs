//! Placeholder until the Messages API provider lands (branch `llm`).
use async_trait::async_trait;
use confab_core::provider::{ChatProvider, ChatRequest, ChunkStream, ProviderError};

use crate::HttpProviderConfig;

#[derive(Debug)]
pub struct AnthropicProvider;

impl AnthropicProvider {
    pub fn new(_config: HttpProviderConfig) -> Result<Self, String> {
        Ok(Self)
    }
}

#[async_trait]
impl ChatProvider for AnthropicProvider {
    fn kind(&self) -> &'static str {
        "anthropic"
    }
    async fn stream(&self, _request: &ChatRequest) -> Result<ChunkStream, ProviderError> {
        Err(ProviderError::Connect {
            detail: "not built yet".into(),
        })
    }
}
