//! The state every handler gets: one `Arc`, so a clone (several per
//! request: the router, each middleware, each extractor) is one atomic
//! increment rather than one per field.

use std::ops::Deref;
use std::sync::Arc;

use confab_core::Store;
use confab_core::ratelimit::RateLimiter;
use confab_core::service::ChatService;
use confab_core::turn::TurnEngine;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::readiness::Readiness;

#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }
}

impl Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What [`AppState`] shares.
pub struct Shared {
    pub config: Arc<Config>,
    pub store: Arc<dyn Store>,
    pub limiter: Arc<dyn RateLimiter>,
    /// Chats and their history: the reads and changes that involve no model.
    pub service: ChatService,
    /// Runs every turn (SPEC §6, §11); the routes only format its events.
    pub engine: TurnEngine,
    pub auth: Arc<Authenticator>,
    pub metrics: Arc<Metrics>,
    /// Cancelled when the shutdown grace period has run out: turns still
    /// running then end with the error event and are stored `interrupted`.
    pub hard_stop: CancellationToken,
    /// Every spawned task (turns, background loops), so shutdown can wait
    /// for them.
    pub tasks: TaskTracker,
    /// What `/readyz` answers: database reachable, not draining.
    pub readiness: Arc<Readiness>,
    /// When this process started (`created` of `GET /v1/models`).
    pub started_at: chrono::DateTime<chrono::Utc>,
}
