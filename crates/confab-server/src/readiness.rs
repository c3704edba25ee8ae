//! Liveness and readiness (SPEC §15): whether this instance should get new
//! traffic. Not ready while the database is unreachable or while draining
//! after SIGTERM/SIGINT.
//!
//! A background probe pings the database (and Redis, when configured) every
//! [`PROBE_INTERVAL`] with a [`PROBE_TIMEOUT`] deadline, so a change shows in
//! `/readyz` within interval + timeout (< 1 s) and in the `dependency_up`
//! gauge that alerts watch. `/readyz` reads the last result instead of
//! pinging itself: a fleet of balancers probing every instance then costs the
//! database nothing extra, and an alert on `dependency_up` fires even when no
//! balancer asks.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use confab_core::Store;
use confab_core::ratelimit::RateLimiter;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

pub const PROBE_INTERVAL: Duration = Duration::from_millis(250);
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// Ping the database with a deadline: the one check `/health` and the
/// readiness probe share.
pub async fn database_reachable(store: &dyn Store, timeout: Duration) -> bool {
    matches!(
        tokio::time::timeout(timeout, store.ping()).await,
        Ok(Ok(()))
    )
}

/// Ping Redis (through the limiter) with a deadline.
pub async fn redis_reachable(limiter: &dyn RateLimiter, timeout: Duration) -> bool {
    matches!(
        tokio::time::timeout(timeout, limiter.ping()).await,
        Ok(Ok(()))
    )
}

pub struct Readiness {
    database_up: AtomicBool,
    /// Cancelled when a shutdown signal arrives: `/readyz` answers 503 from
    /// then on, while the listener still accepts for
    /// `SHUTDOWN_READINESS_DELAY_MS`.
    draining: CancellationToken,
}

/// What `/readyz` reports.
#[derive(Debug, Clone, Copy)]
pub struct ReadyState {
    pub database_up: bool,
    pub draining: bool,
}

impl ReadyState {
    pub fn ready(self) -> bool {
        self.database_up && !self.draining
    }
}

impl Readiness {
    /// Starts up: the store was just connected and migrated.
    pub fn new() -> Arc<Readiness> {
        Arc::new(Readiness {
            database_up: AtomicBool::new(true),
            draining: CancellationToken::new(),
        })
    }

    pub fn state(&self) -> ReadyState {
        ReadyState {
            database_up: self.database_up.load(Ordering::Relaxed),
            draining: self.draining.is_cancelled(),
        }
    }

    pub fn start_draining(&self) {
        self.draining.cancel();
    }

    /// A token cancelled when draining starts.
    pub fn draining(&self) -> CancellationToken {
        self.draining.clone()
    }

    /// Probe once and record the results (flag and gauges).
    pub async fn probe(
        &self,
        store: &dyn Store,
        limiter: Option<&dyn RateLimiter>,
        metrics: &Metrics,
    ) {
        let db = database_reachable(store, PROBE_TIMEOUT).await;
        let was = self.database_up.swap(db, Ordering::Relaxed);
        if was != db {
            if db {
                tracing::info!("database reachable again: ready");
            } else {
                tracing::warn!("database unreachable: not ready");
            }
        }
        metrics.set_dependency_up("database", db);
        if let Some(limiter) = limiter {
            metrics.set_dependency_up("redis", redis_reachable(limiter, PROBE_TIMEOUT).await);
        }
    }

    /// Probe every [`PROBE_INTERVAL`] until `stop`.
    pub async fn run(
        self: Arc<Self>,
        store: Arc<dyn Store>,
        limiter: Option<Arc<dyn RateLimiter>>,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) {
        let mut ticker = tokio::time::interval(PROBE_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = ticker.tick() => {
                    self.probe(store.as_ref(), limiter.as_deref(), &metrics).await;
                }
            }
        }
    }
}
