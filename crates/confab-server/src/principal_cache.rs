//! The cache of authenticated principals.
//!
//! An entry is served without a lookup for `AUTH_CACHE_TTL_SECONDS`; from
//! half its TTL on, ONE background lookup per credential refreshes it, so a
//! credential in use is refreshed before it expires and its requests never
//! queue behind the database. The refresh replaces the entry (fresh again),
//! drops it when the credential is gone (revoked key, deleted user: the
//! next request is refused), or marks it when the lookup fails.
//!
//! Past its TTL an entry is served at once only when its last lookup failed
//! (the database is down or too slow: served for `AUTH_CACHE_GRACE_SECONDS`
//! more, so one failed lookup fails no request). Otherwise — a credential
//! that was idle — the request waits for the lookup (one per credential,
//! shared by the requests that come meanwhile, at most the lookup bound),
//! so that a revocation takes effect within the TTL however long the key
//! sat unused; a lookup that fails or runs past the bound serves the entry
//! as in an outage. Past the grace the entry is gone, and the next request
//! looks the principal up itself (coalesced: concurrent misses share one
//! lookup), answered 503 when the database cannot answer within the bound.

use std::collections::HashMap;
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

#[derive(Clone)]
struct Cached {
    principal: Principal,
    /// When the lookup that found it started.
    looked_up: Instant,
    /// Looked up again in the background from here on (half the TTL).
    refresh_from: Instant,
    /// Served without a lookup until here (the TTL).
    fresh_until: Instant,
    /// Never served past here (the TTL plus the grace).
    expires: Instant,
    /// The last lookup failed: served stale, without waiting, until
    /// `expires`.
    lookup_failed: bool,
}

impl Cached {
    fn new(principal: Principal, looked_up: Instant, ttl: Duration, grace: Duration) -> Self {
        Self {
            principal,
            looked_up,
            refresh_from: looked_up + ttl / 2,
            fresh_until: looked_up + ttl,
            expires: looked_up + ttl + grace,
            lookup_failed: false,
        }
    }
}

/// What a refresh found.
#[derive(Clone)]
enum Refresh {
    Running,
    Found(Principal),
    /// The credential is revoked, or its user deleted.
    Gone,
    /// The lookup failed or ran past its bound.
    Failed,
}

/// A refresh in progress: when it started, and what it found once it ends.
type Running = (Instant, tokio::sync::watch::Receiver<Refresh>);

pub(crate) struct PrincipalCache {
    store: Arc<dyn Store>,
    /// Entries are kept `ttl + grace` after they were last stored (each
    /// carries its own limits, see [`Cached`]).
    entries: moka::future::Cache<CacheKey, Arc<Cached>>,
    ttl: Duration,
    grace: Duration,
    /// The longest a lookup may take (taking a connection and the query):
    /// past it, it counts as failed.
    lookup: Duration,
    /// Keys whose refresh is running (at most one per key), with what tells
    /// when it has ended.
    refreshing: Arc<Mutex<HashMap<CacheKey, Running>>>,
    metrics: Arc<Metrics>,
}

/// Takes the key out of the in-flight set however the refresh ends.
struct InFlight {
    set: Arc<Mutex<HashMap<CacheKey, Running>>>,
    key: CacheKey,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut set) = self.set.lock() {
            set.remove(&self.key);
        }
    }
}

/// Look the principal up, within `bound` (a lookup stuck behind a lock or a
/// lost connection is a failed one, answered 503, not a request that hangs).
async fn fetch(
    store: &dyn Store,
    key: &CacheKey,
    bound: Duration,
) -> Result<Option<Principal>, StoreError> {
    let lookup = async {
        match key {
            CacheKey::User(id) => store.find_principal(*id).await,
            CacheKey::Key(hash) => store.find_principal_by_key(hash).await,
        }
    };
    match tokio::time::timeout(bound, lookup).await {
        Ok(found) => found,
        Err(_) => Err(StoreError::Unavailable(
            "the credential lookup took too long".into(),
        )),
    }
}

impl PrincipalCache {
    pub(crate) fn new(
        store: Arc<dyn Store>,
        ttl: Duration,
        grace: Duration,
        lookup: Duration,
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
            grace,
            lookup,
            refreshing: Arc::new(Mutex::new(HashMap::new())),
            metrics,
        }
    }

    /// The principal for `key`: `Ok(None)` when the credential is unknown.
    /// An error only when it is not cached (or past its grace) and the
    /// lookup failed; every request waiting for that same lookup gets it.
    pub(crate) async fn get(&self, key: CacheKey) -> Result<Option<Principal>, StoreError> {
        if let Some(hit) = self.entries.get(&key).await {
            let now = Instant::now();
            if now < hit.fresh_until {
                self.metrics.auth_cache_hits.inc();
                if now >= hit.refresh_from {
                    self.refresh(key);
                }
                return Ok(Some(hit.principal.clone()));
            }
            if now < hit.expires {
                // Served from the cache (a hit) only when it does not wait
                // for the lookup.
                let stale = || {
                    self.metrics.auth_cache_hits.inc();
                    self.metrics.auth_cache_stale.inc();
                    Some(hit.principal.clone())
                };
                let running = self.refresh(key.clone());
                let Some((started, mut done)) = running.filter(|_| !hit.lookup_failed) else {
                    // The database could not answer: served as it was.
                    return Ok(stale());
                };
                if started < hit.fresh_until {
                    // Refreshed ahead of its expiry, for a request while it
                    // was fresh: a credential in use, served during that
                    // one lookup (itself bounded).
                    return Ok(stale());
                }
                // Idle past its TTL: what the lookup finds decides (a
                // revoked key is refused now), unless it fails or takes
                // longer than the bound (then as in an outage).
                let ended = done.wait_for(|r| !matches!(r, Refresh::Running));
                let found = match tokio::time::timeout(self.lookup, ended).await {
                    Ok(Ok(found)) => found.clone(),
                    // Past the bound, or the refresh was dropped (shutdown).
                    _ => Refresh::Failed,
                };
                return Ok(match found {
                    Refresh::Found(principal) => Some(principal),
                    Refresh::Gone => None,
                    // As in an outage.
                    Refresh::Failed | Refresh::Running => stale(),
                });
            }
            self.entries.invalidate(&key).await;
        }
        // Single flight: the requests that miss meanwhile wait for this one
        // lookup instead of each taking a pooled connection for the same
        // row. Only positive answers are cached (an unknown credential is
        // an `Err(None)`; the caller remembers those briefly).
        let store = self.store.clone();
        let misses = self.metrics.auth_cache_misses.clone();
        let (ttl, grace, bound) = (self.ttl, self.grace, self.lookup);
        let lookup_key = key.clone();
        let found = self
            .entries
            .try_get_with(key, async move {
                misses.inc();
                let started = Instant::now();
                match fetch(store.as_ref(), &lookup_key, bound).await {
                    Ok(Some(principal)) => {
                        Ok(Arc::new(Cached::new(principal, started, ttl, grace)))
                    }
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

    /// Start the refresh of an entry, unless one is running for it; the
    /// running one.
    fn refresh(&self, key: CacheKey) -> Option<Running> {
        let ended = tokio::sync::watch::channel(Refresh::Running);
        let started = Instant::now();
        match self.refreshing.lock() {
            Ok(mut set) => {
                if let Some(running) = set.get(&key) {
                    return Some(running.clone());
                }
                set.insert(key.clone(), (started, ended.1.clone()));
            }
            Err(_) => return None,
        }
        let in_flight = InFlight {
            set: self.refreshing.clone(),
            key: key.clone(),
        };
        let store = self.store.clone();
        let entries = self.entries.clone();
        let metrics = self.metrics.clone();
        let (ttl, grace, bound) = (self.ttl, self.grace, self.lookup);
        let task = async move {
            let _in_flight = in_flight;
            metrics.auth_cache_misses.inc();
            // What this lookup finds replaces only an entry looked up before
            // it started: a request's own lookup may have stored a newer one
            // (or found the key gone) meanwhile.
            let older = |entry: &Cached| entry.looked_up <= started;
            let found = match fetch(store.as_ref(), &key, bound).await {
                Ok(Some(principal)) => {
                    if entries.get(&key).await.is_some_and(|e| older(&e)) {
                        let fresh = Cached::new(principal.clone(), started, ttl, grace);
                        entries.insert(key, Arc::new(fresh)).await;
                    }
                    Refresh::Found(principal)
                }
                // Revoked, deleted: refused from the next request on.
                Ok(None) => {
                    entries.invalidate(&key).await;
                    Refresh::Gone
                }
                Err(err) => {
                    metrics.auth_cache_refresh_errors.inc();
                    tracing::warn!(
                        error = %err,
                        "could not refresh a cached principal; it is served until AUTH_CACHE_GRACE_SECONDS runs out"
                    );
                    // Served without waiting from now on, within its grace.
                    if let Some(old) = entries.get(&key).await
                        && older(&old)
                        && !old.lookup_failed
                        && Instant::now() < old.expires
                    {
                        let failed = Cached {
                            lookup_failed: true,
                            ..Cached::clone(&old)
                        };
                        entries.insert(key, Arc::new(failed)).await;
                    }
                    Refresh::Failed
                }
            };
            // After the entry changed (the in-flight mark goes after this).
            let _ = ended.0.send(found);
        };
        // The log line carries the request id of the request that noticed.
        tokio::spawn(task.instrument(tracing::Span::current()));
        Some((started, ended.1))
    }
}
