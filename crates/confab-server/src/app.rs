//! Assembly and lifecycle: connect the store and limiter, migrate, seed,
//! recover dead streams, start the background loops, serve, and shut down
//! gracefully (SPEC §10).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use confab_core::ratelimit::RateLimiter;
use confab_core::ratelimit::TokenBudget;
use confab_core::service::ChatService;
use confab_core::turn::TurnEngine;
use confab_core::{PoolConfig, Store};
use confab_llm::SimulatedModel;
use confab_ratelimit::{MemoryRateLimiter, MemoryTokenBudget, RedisLiveRelay, RedisRateLimiter};
use confab_store_postgres::PostgresStore;
use confab_store_sqlite::SqliteStore;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::readiness::Readiness;
use crate::state::{AppState, Shared};

/// How often `last_used_at` of API keys is written.
const KEY_USE_FLUSH: Duration = Duration::from_secs(30);
/// How often expired idempotency keys are purged.
const IDEMPOTENCY_PURGE: Duration = Duration::from_secs(3600);

/// Open the configured store (the URL scheme picks the backend) and migrate it.
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    let url = config.database_url.expose();
    let pool = PoolConfig {
        max_connections: config.db_pool_max,
        acquire_timeout: config.db_acquire_timeout,
        group_commit: config.db_group_commit,
    };
    let store: Arc<dyn Store> = if url.starts_with("sqlite:") {
        Arc::new(
            SqliteStore::connect_with(url, pool)
                .await
                .with_context(|| format!("opening {}", config.database_url.redacted()))?,
        )
    } else {
        Arc::new(
            PostgresStore::connect_with(url, pool)
                .await
                .with_context(|| format!("connecting to {}", config.database_url.redacted()))?,
        )
    };
    store.migrate().await.context("applying migrations")?;
    Ok(store)
}

/// The rate limiter and the token budgets: both in process, or both on the
/// one Redis connection.
pub async fn open_limiter(
    config: &Config,
) -> anyhow::Result<(Arc<dyn RateLimiter>, Arc<dyn TokenBudget>)> {
    Ok(match &config.redis_url {
        None => (
            Arc::new(MemoryRateLimiter::new()),
            Arc::new(MemoryTokenBudget::new()),
        ),
        Some(url) => {
            let redis = Arc::new(
                RedisRateLimiter::connect(url.expose(), config.redis_timeout)
                    .with_context(|| format!("configuring Redis at {}", url.redacted()))?,
            );
            (redis.clone(), redis)
        }
    })
}

/// A built application, ready to serve.
pub struct App {
    pub state: AppState,
    /// Stops the background loops (after the streams are done).
    background_stop: CancellationToken,
    /// The live-stream relay, with `REDIS_URL`.
    relay: Option<Arc<RedisLiveRelay>>,
}

impl App {
    pub async fn build(config: Config) -> anyhow::Result<App> {
        // Every reqwest client in the process (the model providers', and any
        // other) needs rustls' process-wide crypto provider: reqwest is built
        // with `rustls-no-provider` and panics without one.
        confab_llm::install_tls_provider();
        let config = Arc::new(config);
        let store = open_store(&config).await?;
        if config.seed_demo && !store.has_orgs().await? {
            let created = crate::seed::seed_demo(store.as_ref()).await?;
            tracing::info!(rows = created, "seeded the demo tenants");
        }
        let (limiter, budget) = open_limiter(&config).await?;
        let mut metrics = Metrics::new();
        metrics.watch_store(store.clone());
        let metrics = Arc::new(metrics);
        metrics
            .turns_max_concurrent
            .set(i64::try_from(config.engine.max_concurrent_turns).unwrap_or(i64::MAX));
        let simulated = SimulatedModel::new(config.token_delay, config.simulated_min_words);
        let models = config
            .catalog
            .build(&simulated, config.provider_connect_timeout)
            .context("setting up the models")?;
        for model in models.all() {
            // Load the model's tokenizer off the runtime now, so that the
            // first turn does not wait for it.
            let (kind, upstream) = (model.provider.kind(), model.upstream_model.clone());
            tokio::task::spawn_blocking(move || confab_llm::tokenizer::preload(kind, &upstream));
            tracing::info!(
                model = %model.name,
                provider = model.provider.kind(),
                upstream_model = %model.upstream_model,
                context_tokens = model.context_tokens,
                max_output_tokens = model.max_output_tokens,
                tokenizer = model.tokenizer.name(),
                default = model.name == models.default_model().name,
                "model available"
            );
        }
        let tasks = TaskTracker::new();
        let hard_stop = CancellationToken::new();
        let engine = TurnEngine::new(
            store.clone(),
            budget,
            models,
            metrics.clone(),
            config.engine.clone(),
            tasks.clone(),
            hard_stop.clone(),
        );
        let background_stop = CancellationToken::new();
        // Live streams cross instances on their own Redis connection, so
        // that relayed tokens never queue behind rate-limit decisions.
        let relay = match &config.redis_url {
            None => None,
            Some(url) => {
                let redis = Arc::new(
                    RedisRateLimiter::connect(url.expose(), config.redis_timeout)
                        .with_context(|| format!("configuring Redis at {}", url.redacted()))?,
                );
                let (relay, writer) =
                    RedisLiveRelay::new(redis, metrics.clone(), background_stop.clone());
                tasks.spawn(writer);
                Some(relay)
            }
        };
        engine.live().configure(
            relay
                .clone()
                .map(|r| r as Arc<dyn confab_core::live::LiveRelay>),
            config.stream_detach,
        );
        let service = ChatService::new(store.clone());
        let auth = Arc::new(Authenticator::new(
            store.clone(),
            config.auth_mode,
            crate::auth::CachePolicy {
                ttl: config.auth_cache_ttl,
                grace: config.auth_cache_grace,
                lookup: config.db_acquire_timeout,
            },
            config.auth_failures,
            metrics.clone(),
        ));
        let state = AppState::new(Shared {
            config: config.clone(),
            store: store.clone(),
            limiter,
            service,
            engine,
            auth,
            metrics,
            hard_stop,
            tasks,
            readiness: Readiness::new(),
            started_at: Utc::now(),
        });
        recover_dead_streams(&state).await;
        let app = App {
            state,
            background_stop,
            relay,
        };
        app.start_background();
        Ok(app)
    }

    fn start_background(&self) {
        let s = &self.state;
        let stop = self.background_stop.clone();
        if let Some(relay) = &self.relay {
            s.tasks
                .spawn(relay.listen(s.engine.live().clone(), stop.clone()));
        }
        let redis = s.config.redis_url.is_some().then(|| s.limiter.clone());
        s.tasks.spawn(s.readiness.clone().run(
            s.store.clone(),
            redis,
            s.metrics.clone(),
            stop.clone(),
        ));
        s.tasks.spawn(s.engine.flusher().clone().run(
            s.store.clone(),
            s.metrics.clone(),
            s.config.stream_flush_interval,
            s.config.stream_stale_after,
            stop.clone(),
        ));
        let every = |period: Duration, state: AppState, stop: CancellationToken, job: Job| async move {
            let mut ticker = tokio::time::interval(period);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker.tick().await;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = ticker.tick() => job.run(&state).await,
                }
            }
        };
        s.tasks.spawn(every(
            (s.config.stream_stale_after / 2).max(Duration::from_secs(1)),
            s.clone(),
            stop.clone(),
            Job::RecoverStreams,
        ));
        s.tasks.spawn(every(
            KEY_USE_FLUSH,
            s.clone(),
            stop.clone(),
            Job::FlushKeyUses,
        ));
        s.tasks.spawn(every(
            IDEMPOTENCY_PURGE,
            s.clone(),
            stop,
            Job::PurgeIdempotency,
        ));
    }

    pub fn router(&self) -> axum::Router {
        crate::routes::router(self.state.clone())
    }

    /// Serve until `shutdown` resolves, then: stop accepting, give in-flight
    /// requests and streams `SHUTDOWN_GRACE_SECONDS`, interrupt what is left
    /// (error event + `interrupted`), stop background work, close the pool.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let state = self.state.clone();
        let grace = state.config.shutdown_grace;
        let readiness_delay = state.config.shutdown_readiness_delay;
        let hard_stop = state.hard_stop.clone();
        let readiness = state.readiness.clone();
        // The server stops accepting as soon as this future resolves, so a
        // balancer could never see `/readyz` answer 503. Readiness therefore
        // flips first, and the listener keeps accepting (and serving) for
        // SHUTDOWN_READINESS_DELAY_MS, long enough for the balancer's next
        // probe to take the instance out of rotation.
        let graceful = async move {
            shutdown.await;
            readiness.start_draining();
            tracing::info!(
                grace_seconds = grace.as_secs_f64(),
                readiness_delay_ms = readiness_delay.as_millis() as u64,
                "shutting down: /readyz answers 503; still accepting for the readiness delay"
            );
            tokio::time::sleep(readiness_delay).await;
            tracing::info!("no new connections; waiting for requests and streams");
        };
        // After the grace period (counted from the signal), streams still
        // running are interrupted.
        let timer_stop = hard_stop.clone();
        let drain_wait = state.readiness.draining();
        let grace_timer = tokio::spawn(async move {
            drain_wait.cancelled().await;
            tokio::time::sleep(grace).await;
            tracing::warn!("shutdown grace period over: interrupting remaining streams");
            timer_stop.cancel();
        });

        // Served through hyper directly (crate::conn) for the connection
        // timeouts, the JSON answers to unparsable requests and half-closed
        // clients. The future ends when every connection has closed; after
        // the hard stop, streams close within a couple of seconds. A
        // connection that still lingers (a client that never reads) must not
        // keep the process alive forever: 5 s later the rest are dropped.
        let abort = CancellationToken::new();
        let server = crate::conn::serve(
            listener,
            self.router(),
            state.metrics.clone(),
            crate::conn::Timeouts {
                header: state.config.http_header_timeout,
                idle: state.config.http_idle_timeout,
            },
            graceful,
            abort.clone(),
        );
        let serve_result: anyhow::Result<()> = tokio::select! {
            () = server => Ok(()),
            _ = async {
                hard_stop.cancelled().await;
                tokio::time::sleep(Duration::from_secs(5)).await;
            } => {
                tracing::warn!("connections still open 5 s after the grace period; closing them");
                abort.cancel();
                Ok(())
            }
        };
        grace_timer.abort();
        // Streams and their final writes first, then the background loops.
        hard_stop.cancel();
        self.background_stop.cancel();
        state.tasks.close();
        if tokio::time::timeout(Duration::from_secs(10), state.tasks.wait())
            .await
            .is_err()
        {
            tracing::error!("background tasks did not finish within 10 s of shutdown");
        }
        state.auth.flush_key_uses().await;
        state.store.close().await;
        tracing::info!("shutdown complete");
        serve_result
    }
}

#[derive(Clone, Copy)]
enum Job {
    RecoverStreams,
    FlushKeyUses,
    PurgeIdempotency,
}

impl Job {
    async fn run(self, state: &AppState) {
        match self {
            Job::RecoverStreams => {
                // Save every live stream of this process first: however late
                // an overloaded runtime ran the regular heartbeats, the sweep
                // below then never takes this process's own streams for dead.
                state
                    .engine
                    .flusher()
                    .flush(state.store.as_ref(), state.metrics.as_ref(), Duration::ZERO)
                    .await;
                recover_dead_streams(state).await;
            }
            Job::FlushKeyUses => state.auth.flush_key_uses().await,
            Job::PurgeIdempotency => {
                let cutoff =
                    Utc::now() - chrono::Duration::hours(confab_core::model::IDEMPOTENCY_TTL_HOURS);
                match state.store.purge_idempotency(cutoff).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(keys = n, "purged expired idempotency keys"),
                    Err(err) => tracing::warn!(error = %err, "could not purge idempotency keys"),
                }
            }
        }
    }
}

/// Mark `streaming` messages not saved for `STREAM_STALE_SECONDS` as
/// `interrupted`: their process died. Fresh rows are left alone — another
/// instance may be streaming them right now.
async fn recover_dead_streams(state: &AppState) {
    match state
        .store
        .interrupt_stale_streams(state.config.stream_stale_after)
        .await
    {
        Ok(0) => {}
        Ok(n) => {
            state.metrics.streams_recovered.inc_by(n);
            tracing::warn!(
                messages = n,
                "marked streams of a dead process as interrupted"
            );
        }
        Err(err) => tracing::warn!(error = %err, "could not recover dead streams"),
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!(signal = "SIGINT", "signal received"),
        _ = term => tracing::info!(signal = "SIGTERM", "signal received"),
    }
}
