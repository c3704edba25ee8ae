//! The cache of authenticated principals, stale-while-revalidate.
//!
//! An entry is fresh for `AUTH_CACHE_TTL_SECONDS`. After that, for another
//! `AUTH_CACHE_GRACE_SECONDS`, it is still served at once while ONE
//! background lookup per key refreshes it: requests never queue behind the
//! database for a principal they already know, so an expiry under load or
//! during a database outage costs them nothing. The refresh replaces the
//! entry (fresh again), drops it when the credential is gone (revoked key,
//! deleted user: the next request is refused), or, when the lookup fails,
//! leaves it to be served until the grace runs out — one failed lookup fails
//! no request. Past the grace the entry is gone, and the next request looks
//! the principal up itself (coalesced: concurrent misses share one lookup).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use confab_core::{Principal, Store, StoreError, UserId};
use tracing::Instrument;

use crate::metrics::Metrics;

/// How many principals are kept at most.
const CAPACITY: u64 = 100_000;

/// What a principal is cached under.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum CacheKey {
    User(UserId),
    /// The SHA-256 of an API key.
    Key(Vec<u8>),
}

struct Cached {
    principal: Principal,
    fresh_until: Instant,
}

pub(crate) struct PrincipalCache {
    store: Arc<dyn Store>,
    /// Entries live `ttl + grace`; they are fresh for `ttl`.
    entries: moka::future::Cache<CacheKey, Arc<Cached>>,
    ttl: Duration,
    /// Keys whose refresh is running: at most one per key.
    refreshing: Arc<Mutex<HashSet<CacheKey>>>,
    metrics: Arc<Metrics>,
}

/// Takes the key out of the in-flight set however the refresh ends.
struct InFlight {
    set: Arc<Mutex<HashSet<CacheKey>>>,
    key: CacheKey,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut set) = self.set.lock() {
            set.remove(&self.key);
        }
    }
}

async fn fetch(store: &dyn Store, key: &CacheKey) -> Result<Option<Principal>, StoreError> {
    match key {
        CacheKey::User(id) => store.find_principal(*id).await,
        CacheKey::Key(hash) => store.find_principal_by_key(hash).await,
    }
}

impl PrincipalCache {
    pub(crate) fn new(
        store: Arc<dyn Store>,
        ttl: Duration,
        grace: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        let entries = moka::future::Cache::builder()
            .max_capacity(CAPACITY)
            .time_to_live((ttl + grace).max(Duration::from_millis(1)))
            .build();
        Self {
            store,
            entries,
            ttl,
            refreshing: Arc::new(Mutex::new(HashSet::new())),
            metrics,
        }
    }

    /// The principal for `key`: `Ok(None)` when the credential is unknown.
    /// An error only when it is not cached (or past its grace) and the
    /// lookup failed; every request waiting for that same lookup gets it.
    pub(crate) async fn get(&self, key: CacheKey) -> Result<Option<Principal>, StoreError> {
        if let Some(hit) = self.entries.get(&key).await {
            self.metrics.auth_cache_hits.inc();
            if Instant::now() >= hit.fresh_until {
                self.metrics.auth_cache_stale.inc();
                self.refresh(key);
            }
            return Ok(Some(hit.principal.clone()));
        }
        // Single flight: the requests that miss meanwhile wait for this one
        // lookup instead of each taking a pooled connection for the same
        // row. Only positive answers are cached (an unknown credential is
        // an `Err(None)`; the caller remembers those briefly).
        let store = self.store.clone();
        let misses = self.metrics.auth_cache_misses.clone();
        let ttl = self.ttl;
        let lookup_key = key.clone();
        let found = self
            .entries
            .try_get_with(key, async move {
                misses.inc();
                match fetch(store.as_ref(), &lookup_key).await {
                    Ok(Some(principal)) => Ok(Arc::new(Cached {
                        principal,
                        fresh_until: Instant::now() + ttl,
                    })),
                    Ok(None) => Err(None),
                    Err(err) => Err(Some(err)),
                }
            })
            .await;
        match found {
            Ok(cached) => Ok(Some(cached.principal.clone())),
            Err(err) => match err.as_ref() {
                None => Ok(None),
                Some(store_error) => Err(store_error.clone()),
            },
        }
    }

    /// Whether `key` has an entry (fresh, or stale within its grace).
    pub(crate) fn contains(&self, key: &CacheKey) -> bool {
        self.entries.contains_key(key)
    }

    pub(crate) fn refreshes_running(&self) -> usize {
        self.refreshing.lock().map_or(0, |set| set.len())
    }

    /// Start the refresh of a stale entry, unless one is running for it.
    fn refresh(&self, key: CacheKey) {
        match self.refreshing.lock() {
            Ok(mut set) => {
                if !set.insert(key.clone()) {
                    return;
                }
            }
            Err(_) => return,
        }
        let in_flight = InFlight {
            set: self.refreshing.clone(),
            key: key.clone(),
        };
        let store = self.store.clone();
        let entries = self.entries.clone();
        let metrics = self.metrics.clone();
        let ttl = self.ttl;
        let task = async move {
            let _in_flight = in_flight;
            metrics.auth_cache_misses.inc();
            match fetch(store.as_ref(), &key).await {
                Ok(Some(principal)) => {
                    let fresh_until = Instant::now() + ttl;
                    entries
                        .insert(
                            key,
                            Arc::new(Cached {
                                principal,
                                fresh_until,
                            }),
                        )
                        .await;
                }
                // Revoked, deleted: refused from the next request on.
                Ok(None) => entries.invalidate(&key).await,
                Err(err) => {
                    metrics.auth_cache_refresh_errors.inc();
                    tracing::warn!(
                        error = %err,
                        "could not refresh a cached principal; it is served until AUTH_CACHE_GRACE_SECONDS runs out"
                    );
                }
            }
        };
        // The log line carries the request id of the request that noticed.
        tokio::spawn(task.instrument(tracing::Span::current()));
    }
}
