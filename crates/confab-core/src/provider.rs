//! The model-provider contract. The simulated model lives in `confab-llm`;
//! real providers (OpenAI-compatible, Anthropic) are added there as modules.

use async_trait::async_trait;
use futures::stream::BoxStream;

use crate::model::MessageRole;

/// One message of the conversation sent to the model.
#[derive(Clone, Debug)]
pub struct PromptMessage {
    pub role: MessageRole,
    pub content: String,
}

/// A normalized piece of a streamed reply.
#[derive(Clone, Debug, PartialEq)]
pub enum Chunk {
    /// More text of the reply.
    Delta(String),
    /// Token accounting, when the provider reports it.
    Usage {
        prompt_tokens: u64,
        completion_tokens: u64,
    },
    /// The model finished on its own (`"stop"`, `"length"`, ...).
    Finish(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("model unavailable: {0}")]
    Unavailable(String),
    #[error("model error: {0}")]
    Failed(String),
}

pub type ChunkStream = BoxStream<'static, Result<Chunk, ProviderError>>;

#[async_trait]
pub trait ChatProvider: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    /// Whether the model should be sent the earlier messages of the chat
    /// (costs a query per turn; the simulated model does not need them).
    fn wants_history(&self) -> bool {
        true
    }

    /// Start generating a reply to `messages` (oldest first, the new user
    /// message last). Dropping the returned stream must stop the upstream work.
    async fn stream(&self, messages: Vec<PromptMessage>) -> Result<ChunkStream, ProviderError>;

    /// The whole reply at once (for `POST /chat`). Providers that pace their
    /// output for realism may answer faster here.
    async fn complete(&self, messages: Vec<PromptMessage>) -> Result<String, ProviderError> {
        use futures::StreamExt;
        let mut stream = self.stream(messages).await?;
        let mut text = String::new();
        while let Some(chunk) = stream.next().await {
            if let Chunk::Delta(delta) = chunk? {
                text.push_str(&delta);
            }
        }
        Ok(text)
    }
}
