//! The state every handler gets: cheap to clone, everything behind `Arc`.

use std::sync::Arc;

use confab_core::Store;
use confab_core::ratelimit::RateLimiter;
use confab_core::service::ChatService;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::streaming::Flusher;

#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub store: Arc<dyn Store>,
    pub limiter: Arc<dyn RateLimiter>,
    pub service: ChatService,
    pub auth: Arc<Authenticator>,
    pub metrics: Arc<Metrics>,
    pub flusher: Flusher,
    /// Cancelled when the shutdown grace period has run out: streams still
    /// running then end with the error event and are stored `interrupted`.
    pub hard_stop: CancellationToken,
    /// Every spawned task (stream generators, background loops), so shutdown
    /// can wait for them.
    pub tasks: TaskTracker,
}
