//! `ChatService` owns the rules of SPEC §3/§5: who may read or write a chat,
//! and the reads and changes of chats that involve no model. Turns are run by
//! the [`crate::turn::TurnEngine`], which uses it for the access rule.

use std::sync::Arc;

use crate::ids::ChatId;
use crate::model::{Chat, ChatCursor, ChatTitle, Message, MessageRole, Principal};
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Unknown, deleted, another org's, or a colleague's chat (indistinguishable).
    #[error("Chat not found")]
    NotFound,
    /// The caller can read the chat but not write it (an admin on a member's chat).
    #[error("You can read this chat but not change it")]
    Forbidden,
    #[error("Idempotency-Key was already used for a different request")]
    IdempotencyMismatch,
    #[error("A request with this Idempotency-Key is still being processed")]
    IdempotencyInProgress,
    /// The model does not exist or the org may not use it (one answer for both).
    #[error("Unknown model: {0}")]
    UnknownModel(String),
    /// The new message alone does not fit in the model's context.
    #[error("Message too long for model {0}")]
    MessageTooLong(String),
    /// The turn's reservation does not fit in a token limit (SPEC §12).
    #[error("Token budget exceeded")]
    TokenBudgetExceeded(crate::ratelimit::BudgetState),
    /// The request's rate-limit token was refused (SPEC §4), where the turn
    /// engine took it (with the turn's reservation).
    #[error("Rate limit exceeded")]
    RateLimited(crate::ratelimit::Decision),
    /// The rate limiter is unreachable and the policy is fail-closed.
    #[error("Rate limiting is temporarily unavailable; try again shortly")]
    RateLimitUnavailable,
    /// The token budget backend is unreachable and the policy is fail-closed.
    #[error("Token budgets are unavailable; try again shortly")]
    BudgetUnavailable,
    /// `max_concurrent_turns` turns are running already (admission control).
    #[error("The server is at capacity; try again shortly")]
    AtCapacity,
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn not_found_or(err: StoreError) -> ServiceError {
    match err {
        StoreError::NotFound => ServiceError::NotFound,
        other => ServiceError::Store(other),
    }
}

/// What a caller wants to do with a chat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// A page of a chat's history.
#[derive(Debug)]
pub struct History {
    pub chat: Chat,
    /// Conversation order.
    pub messages: Vec<Message>,
    /// `seq` to pass as `before` for the previous page, when there is one.
    pub older: Option<i64>,
}

#[derive(Clone)]
pub struct ChatService {
    store: Arc<dyn Store>,
}

impl ChatService {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The chat if `who` may access it that way. The creator reads and writes;
    /// org owners and admins read every chat of their org (and get `Forbidden`
    /// writing one that is not theirs); everyone else gets `NotFound`.
    pub async fn chat_for(
        &self,
        who: &Principal,
        id: ChatId,
        access: Access,
    ) -> Result<Chat, ServiceError> {
        let chat = self
            .store
            .get_chat(who.org_id, id)
            .await
            .map_err(not_found_or)?;
        if chat.user_id == who.user_id {
            return Ok(chat);
        }
        if !who.role.reads_whole_org() {
            return Err(ServiceError::NotFound);
        }
        match access {
            Access::Read => Ok(chat),
            Access::Write => Err(ServiceError::Forbidden),
        }
    }

    /// The newest `limit` messages before `before` (a `seq`), in order.
    pub async fn history(
        &self,
        who: &Principal,
        id: ChatId,
        limit: u32,
        before: Option<i64>,
    ) -> Result<History, ServiceError> {
        let chat = self.chat_for(who, id, Access::Read).await?;
        let messages = self
            .store
            .list_messages(who.org_id, id, before, limit)
            .await
            .map_err(not_found_or)?;
        let older = messages
            .first()
            .filter(|first| first.seq > 1)
            .map(|first| first.seq);
        Ok(History {
            chat,
            messages,
            older,
        })
    }

    /// The caller's own chats, most recently updated first; one more than
    /// `limit` is fetched to know whether there is a next page.
    pub async fn list_chats(
        &self,
        who: &Principal,
        after: Option<ChatCursor>,
        limit: u32,
    ) -> Result<(Vec<Chat>, Option<ChatCursor>), ServiceError> {
        let mut chats = self
            .store
            .list_chats(who.org_id, who.user_id, after, limit.saturating_add(1))
            .await?;
        let next = if chats.len() > limit as usize {
            chats.truncate(limit as usize);
            chats.last().map(|c| ChatCursor {
                updated_at: c.updated_at,
                id: c.id,
            })
        } else {
            None
        };
        Ok((chats, next))
    }

    pub async fn rename(
        &self,
        who: &Principal,
        id: ChatId,
        title: &ChatTitle,
    ) -> Result<Chat, ServiceError> {
        self.chat_for(who, id, Access::Write).await?;
        self.store
            .rename_chat(who.org_id, id, title)
            .await
            .map_err(not_found_or)
    }

    pub async fn delete(&self, who: &Principal, id: ChatId) -> Result<(), ServiceError> {
        self.chat_for(who, id, Access::Write).await?;
        self.store
            .delete_chat(who.org_id, id)
            .await
            .map_err(not_found_or)
    }

    /// The chat's own system prompt (its first message, when that is a
    /// `system` one). The caller has already checked access.
    pub async fn system_prompt(
        &self,
        who: &Principal,
        chat: ChatId,
    ) -> Result<Option<String>, ServiceError> {
        let first = self
            .store
            .list_messages(who.org_id, chat, Some(2), 1)
            .await
            .map_err(not_found_or)?;
        Ok(first
            .into_iter()
            .find(|m| m.role == MessageRole::System)
            .map(|m| m.content))
    }
}
