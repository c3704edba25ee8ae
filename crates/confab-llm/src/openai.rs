//! Placeholder until the Chat Completions provider lands (branch `llm`).
use async_trait::async_trait;
use confab_core::provider::{ChatProvider, ChatRequest, ChunkStream, ProviderError};

use crate::HttpProviderConfig;

#[derive(Debug)]
pub struct OpenAiProvider;

impl OpenAiProvider {
    pub fn new(_config: HttpProviderConfig) -> Result<Self, String> {
        Ok(Self)
    }
}

#[async_trait]
impl ChatProvider for OpenAiProvider {
    fn kind(&self) -> &'static str {
        "openai"
    }
    async fn stream(&self, _request: &ChatRequest) -> Result<ChunkStream, ProviderError> {
        Err(ProviderError::Connect {
            detail: "not built yet".into(),
        })
    }
}
