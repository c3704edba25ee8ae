//! `ChatService` owns the rules of SPEC §3/§5: who may read or write a chat,
//! how a turn is stored around the model call, and idempotent retries.
//! Handlers call it; it calls the `Store` and the `ChatProvider`.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::ids::{ChatId, MessageId};
use crate::model::{
    BegunTurn, Chat, ChatCursor, ChatTitle, FinishedMessage, IdempotencyClaim, Message,
    MessageRole, MessageStatus, MessageText, NewTurn, Principal, TurnChat,
};
use crate::provider::{ChatProvider, PromptMessage, ProviderError};
use crate::store::{Store, StoreError};

/// How long a retried request waits for the first request with the same
/// `Idempotency-Key` to finish before giving up with `IdempotencyInProgress`.
const IDEMPOTENCY_WAIT: Duration = Duration::from_secs(10);
const IDEMPOTENCY_POLL: Duration = Duration::from_millis(10);
const IDEMPOTENCY_POLL_MAX: Duration = Duration::from_millis(250);
/// How many earlier messages a provider that wants history is given.
const PROMPT_HISTORY: u32 = 50;

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
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Provider(#[from] ProviderError),
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

/// The start of a turn, or the stored response of an earlier identical request.
#[derive(Debug)]
pub enum TurnStart {
    Begun(BegunTurn),
    Replay(serde_json::Value),
}

/// The result of `POST /chat`, exactly as it goes on the wire (and is stored
/// for idempotent replays).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TurnReply {
    pub chat_id: ChatId,
    pub message_id: MessageId,
    pub reply: String,
    #[serde(with = "crate::model::rfc3339_millis")]
    pub created_at: DateTime<Utc>,
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
    provider: Arc<dyn ChatProvider>,
}

impl ChatService {
    pub fn new(store: Arc<dyn Store>, provider: Arc<dyn ChatProvider>) -> Self {
        Self { store, provider }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn provider(&self) -> &Arc<dyn ChatProvider> {
        &self.provider
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

    /// Store the user message (and a `streaming` placeholder for the reply)
    /// before the model is asked. With an idempotency key, a request that lost
    /// the race for the key waits for the winner's response and replays it.
    pub async fn begin_turn(
        &self,
        who: &Principal,
        text: &MessageText,
        chat: Option<ChatId>,
        idempotency: Option<IdempotencyClaim>,
    ) -> Result<TurnStart, ServiceError> {
        let turn_chat = match chat {
            Some(id) => {
                self.chat_for(who, id, Access::Write).await?;
                TurnChat::Existing(id)
            }
            None => TurnChat::New {
                id: ChatId::new(),
                title: text.title(),
            },
        };
        let turn = NewTurn {
            org: who.org_id,
            user: who.user_id,
            chat: turn_chat,
            user_message_id: MessageId::new(),
            content: text.as_str().to_owned(),
            assistant_message_id: MessageId::new(),
            idempotency,
        };
        let deadline = Instant::now() + IDEMPOTENCY_WAIT;
        let mut poll = IDEMPOTENCY_POLL;
        loop {
            match self.store.begin_turn(&turn).await {
                Ok(begun) => return Ok(TurnStart::Begun(begun)),
                Err(StoreError::Conflict { constraint }) if constraint == "idempotency_keys" => {}
                Err(err) => return Err(not_found_or(err)),
            }
            let Some(claim) = &turn.idempotency else {
                return Err(ServiceError::Store(StoreError::Other(
                    "idempotency conflict without a key".into(),
                )));
            };
            if let Some(record) = self.store.get_idempotency(who.user_id, &claim.key).await? {
                if record.request_hash != claim.request_hash {
                    return Err(ServiceError::IdempotencyMismatch);
                }
                if let Some(response) = record.response {
                    return Ok(TurnStart::Replay(response));
                }
            }
            // Still in progress (or released by a failed winner: claim it again).
            if Instant::now() >= deadline {
                return Err(ServiceError::IdempotencyInProgress);
            }
            tokio::time::sleep(poll).await;
            poll = (poll * 2).min(IDEMPOTENCY_POLL_MAX);
        }
    }

    /// The conversation to send to the model for a begun turn.
    pub async fn prompt(
        &self,
        who: &Principal,
        begun: &BegunTurn,
    ) -> Result<Vec<PromptMessage>, ServiceError> {
        let current = PromptMessage {
            role: MessageRole::User,
            content: begun.user_message.content.clone(),
        };
        if !self.provider.wants_history() {
            return Ok(vec![current]);
        }
        let mut earlier = self
            .store
            .list_messages(
                who.org_id,
                begun.chat_id,
                Some(begun.user_message.seq),
                PROMPT_HISTORY,
            )
            .await?;
        earlier.retain(|m| !m.content.is_empty());
        let mut prompt: Vec<PromptMessage> = earlier
            .into_iter()
            .map(|m| PromptMessage {
                role: m.role,
                content: m.content,
            })
            .collect();
        prompt.push(current);
        Ok(prompt)
    }

    /// `POST /chat`: ask the model for the whole reply and store it
    /// `complete`. On any failure the turn is abandoned (see
    /// [`ChatService::abandon_turn`]) before the error is returned. With a
    /// key, the reply is stored for replays.
    pub async fn complete_turn(
        &self,
        who: &Principal,
        begun: &BegunTurn,
        idempotency_key: Option<&str>,
    ) -> Result<TurnReply, ServiceError> {
        match self.answer(who, begun, idempotency_key).await {
            Ok(reply) => Ok(reply),
            Err(err) => {
                self.abandon_turn(who, begun, idempotency_key).await;
                Err(err)
            }
        }
    }

    async fn answer(
        &self,
        who: &Principal,
        begun: &BegunTurn,
        idempotency_key: Option<&str>,
    ) -> Result<TurnReply, ServiceError> {
        let prompt = self.prompt(who, begun).await?;
        let request = crate::provider::ChatRequest {
            upstream_model: String::new(),
            system: None,
            messages: prompt,
            max_output_tokens: 0,
            interactive: false,
        };
        let mut chunks = self.provider.stream(&request).await?;
        let mut content = String::new();
        while let Some(chunk) = futures::StreamExt::next(&mut chunks).await {
            if let crate::provider::Chunk::Delta(d) = chunk? {
                content.push_str(&d);
            }
        }
        let reply = TurnReply {
            chat_id: begun.chat_id,
            message_id: begun.assistant_message.id,
            reply: content,
            created_at: begun.assistant_message.created_at,
        };
        let idempotent_response = match idempotency_key {
            Some(key) => Some((
                who.user_id,
                key.to_owned(),
                serde_json::to_value(&reply)
                    .map_err(|e| StoreError::Other(format!("serialising reply: {e}")))?,
            )),
            None => None,
        };
        self.store
            .finish_message(&FinishedMessage {
                org: who.org_id,
                chat: begun.chat_id,
                id: begun.assistant_message.id,
                token_count: Some(count_tokens(&reply.reply)),
                content: reply.reply.clone(),
                status: MessageStatus::Complete,
                idempotent_response,
            })
            .await?;
        Ok(reply)
    }

    /// Best effort after a turn failed or its request was dropped: store the
    /// reply as `failed` (nothing stays `streaming`) and release the
    /// idempotency key, so that a retry runs again instead of waiting for a
    /// response that will never come.
    pub async fn abandon_turn(
        &self,
        who: &Principal,
        begun: &BegunTurn,
        idempotency_key: Option<&str>,
    ) {
        if let Err(err) = self
            .finish(who, begun, String::new(), MessageStatus::Failed, None)
            .await
        {
            tracing::error!(error = %err, messageId = %begun.assistant_message.id, "could not mark an abandoned reply failed");
        }
        if let Some(key) = idempotency_key
            && let Err(err) = self.store.release_idempotency(who.user_id, key).await
        {
            tracing::error!(error = %err, "could not release an idempotency key; retries wait until it is abandoned");
        }
    }

    /// Set the final state of a turn's assistant message.
    pub async fn finish(
        &self,
        who: &Principal,
        begun: &BegunTurn,
        content: String,
        status: MessageStatus,
        token_count: Option<i64>,
    ) -> Result<Message, ServiceError> {
        Ok(self
            .store
            .finish_message(&FinishedMessage {
                org: who.org_id,
                chat: begun.chat_id,
                id: begun.assistant_message.id,
                content,
                status,
                token_count,
                idempotent_response: None,
            })
            .await?)
    }
}

/// Whitespace-separated words: the simulated model's unit, and a fair
/// approximation until providers report usage.
pub fn count_tokens(text: &str) -> i64 {
    i64::try_from(text.split_whitespace().count()).unwrap_or(i64::MAX)
}
