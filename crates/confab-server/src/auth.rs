//! Authentication (SPEC §3): the original's header auth (`x-org-id` +
//! `x-user-id`) and API keys (`Authorization: Bearer cfb_…`). Both produce the
//! same `Principal`, so routes and the rate limiter cannot tell them apart.
//!
//! Principals are cached for `AUTH_CACHE_TTL_SECONDS` so the hot path does not
//! query the database on every request; a revoked key or deleted user is
//! therefore refused within that TTL (per instance), not instantly. A stale
//! entry is served while one refresh runs, and for `AUTH_CACHE_GRACE_SECONDS`
//! while the database cannot answer (see [`crate::principal_cache`]).
//!
//! Failures are not free either: an unknown key or user is remembered for
//! `AUTH_NEGATIVE_CACHE_SECONDS` (so a flood of one bad credential costs one
//! lookup), and each client address may fail only `AUTH_FAILURE_BURST` times
//! (refilling at `AUTH_FAILURE_PER_SECOND`) before its credentialed requests
//! get 429 without any lookup (random keys never hit a cache).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use base64::Engine;
use chrono::{DateTime, Utc};
use confab_core::ratelimit::{Limit, RateLimiter};
use confab_core::{ApiKeyId, OrgId, Principal, Store, UserId};
use confab_ratelimit::MemoryRateLimiter;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::config::AuthMode;
use crate::error::ApiError;
use crate::metrics::{Metrics, ReasonLabels};
use crate::principal_cache::{CacheKey, PrincipalCache};

/// Every key starts with this, so leaked keys are recognisable (secret scanners).
pub const KEY_PREFIX: &str = "cfb_";
/// Random bytes per key: 192 bits of entropy.
const KEY_RANDOM_BYTES: usize = 24;
/// How many characters after `cfb_` are kept as the key's public prefix.
const PUBLIC_PREFIX_CHARS: usize = 8;

pub const MISSING_HEADERS: &str = "Missing x-org-id or x-user-id headers";
pub const NOT_IN_ORG: &str = "User does not belong to specified organization";

/// A freshly generated key: the secret (shown once), its public prefix and its hash.
pub struct GeneratedKey {
    pub secret: String,
    pub prefix: String,
    pub hash: Vec<u8>,
}

/// Generate a new API key from the OS's CSPRNG.
pub fn generate_key() -> GeneratedKey {
    let mut bytes = [0u8; KEY_RANDOM_BYTES];
    rand::rng().fill_bytes(&mut bytes);
    let body = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let secret = format!("{KEY_PREFIX}{body}");
    let prefix = secret[..KEY_PREFIX.len() + PUBLIC_PREFIX_CHARS].to_owned();
    let hash = hash_key(&secret);
    GeneratedKey {
        secret,
        prefix,
        hash,
    }
}

/// SHA-256 of the whole key. A plain fast hash is right here, unlike for
/// passwords: the key carries 192 random bits, so there is no dictionary to
/// try and brute force is out of reach however fast the hash; a slow hash
/// (argon2, bcrypt) would only add ~100 ms to every request. Being
/// deterministic, the hash is also the lookup key (a unique index).
pub fn hash_key(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// How many unknown credentials are remembered at most.
const UNKNOWN_CACHE_CAPACITY: u64 = 10_000;

/// How authenticated principals are cached (`AUTH_CACHE_TTL_SECONDS`,
/// `AUTH_CACHE_GRACE_SECONDS`; see [`crate::principal_cache`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CachePolicy {
    pub ttl: Duration,
    pub grace: Duration,
    /// The longest a lookup may take (`DB_ACQUIRE_TIMEOUT_MS`).
    pub lookup: Duration,
}

/// What failed authentications cost (`AUTH_FAILURE_*`, `AUTH_NEGATIVE_CACHE_SECONDS`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FailurePolicy {
    /// Failures per client address: burst, and refill per second.
    pub limit: Limit,
    /// How long an unknown key or user is answered from memory.
    pub negative_ttl: Duration,
}

pub struct Authenticator {
    store: Arc<dyn Store>,
    mode: AuthMode,
    cache: PrincipalCache,
    /// Credentials found unknown a moment ago (bounded, short TTL).
    unknown: moka::future::Cache<CacheKey, ()>,
    /// Failed authentications per client address (in memory, per instance).
    failures: MemoryRateLimiter,
    failure_limit: Limit,
    /// Keys used since the last flush, with the time of their last use:
    /// `last_used_at` is written in batches, not once per request.
    key_uses: Mutex<HashMap<ApiKeyId, DateTime<Utc>>>,
    metrics: Arc<Metrics>,
}

impl Authenticator {
    pub fn new(
        store: Arc<dyn Store>,
        mode: AuthMode,
        cache: CachePolicy,
        failures: FailurePolicy,
        metrics: Arc<Metrics>,
    ) -> Self {
        let cache = PrincipalCache::new(
            store.clone(),
            cache.ttl,
            cache.grace,
            cache.lookup,
            metrics.clone(),
        );
        let unknown = moka::future::Cache::builder()
            .max_capacity(UNKNOWN_CACHE_CAPACITY)
            .time_to_live(failures.negative_ttl.max(Duration::from_millis(1)))
            .build();
        Self {
            store,
            mode,
            cache,
            unknown,
            failures: MemoryRateLimiter::new(),
            failure_limit: failures.limit,
            key_uses: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// The message for a request that sent no credentials at all.
    pub fn missing_message(&self) -> &'static str {
        if self.mode.headers {
            MISSING_HEADERS
        } else {
            "Missing Authorization header: send Authorization: Bearer <API key>"
        }
    }

    fn refuse(&self, reason: &'static str, err: ApiError) -> ApiError {
        self.metrics
            .auth_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
        err
    }

    /// The caller's principal; `Ok(None)` when the request carries no
    /// credentials at all. A request with a key is judged by the key alone.
    /// `client` is the peer address: past its failure budget, requests with
    /// credentials get 429 (`TooManyRequests`) without a lookup.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        client: Option<IpAddr>,
    ) -> Result<Option<Principal>, ApiError> {
        let Some(ip) = client else {
            return self.judge(headers, None).await;
        };
        let key = format!("authfail:{ip}");
        // Past the address's failure budget, only credentials already in the
        // cache are accepted: behind a proxy many clients share an address,
        // and one of them trying bad keys must not lock the others out.
        let throttled = match self.failures.peek(&key, self.failure_limit).await {
            Ok(d) if !d.allowed => Some(
                d.retry_after
                    .map(|r| r.as_secs_f64().ceil() as u64)
                    .unwrap_or(1)
                    .max(1),
            ),
            _ => None,
        };
        let result = self.judge(headers, throttled).await;
        if matches!(result, Err(ApiError::Unauthorized(_))) {
            let _ = self.failures.acquire(&key, self.failure_limit, 1).await;
        }
        result
    }

    /// `throttled`: the address is past its failure budget (`Retry-After`
    /// seconds); only cached credentials are judged, the others get 429.
    async fn judge(
        &self,
        headers: &HeaderMap,
        throttled: Option<u64>,
    ) -> Result<Option<Principal>, ApiError> {
        let authorization = headers.get(AUTHORIZATION);
        if let Some(value) = authorization
            && self.mode.api_key
        {
            return self.by_key(value.as_bytes(), throttled).await.map(Some);
        }
        let org = headers.get("x-org-id");
        let user = headers.get("x-user-id");
        if org.is_none() && user.is_none() {
            if authorization.is_some() {
                return Err(self.refuse(
                    "disabled",
                    ApiError::Unauthorized(
                        "API key authentication is disabled on this server".into(),
                    ),
                ));
            }
            return Ok(None);
        }
        if !self.mode.headers {
            return Err(self.refuse(
                "disabled",
                ApiError::Unauthorized(
                    "Header authentication is disabled; send Authorization: Bearer <API key>"
                        .into(),
                ),
            ));
        }
        let (Some(org), Some(user)) = (org, user) else {
            return Err(self.refuse("missing", ApiError::Unauthorized(MISSING_HEADERS.into())));
        };
        let (Some(org), Some(user)) = (header_id::<OrgId>(org), header_id::<UserId>(user)) else {
            return Err(self.refuse(
                "malformed",
                ApiError::Unauthorized(
                    "Invalid x-org-id or x-user-id header: each must be a UUID".into(),
                ),
            ));
        };
        let Some(principal) = self.lookup(CacheKey::User(user), throttled).await? else {
            return Err(self.refuse(
                "unknown_user",
                ApiError::Unauthorized("Unknown user".into()),
            ));
        };
        if principal.org_id != org {
            return Err(self.refuse("wrong_org", ApiError::Forbidden(NOT_IN_ORG.into())));
        }
        Ok(Some(principal))
    }

    async fn by_key(&self, header: &[u8], throttled: Option<u64>) -> Result<Principal, ApiError> {
        let malformed = || {
            self.refuse(
                "malformed",
                ApiError::Unauthorized(
                    "Malformed Authorization header: expected 'Bearer <API key>'".into(),
                ),
            )
        };
        let text = std::str::from_utf8(header).map_err(|_| malformed())?;
        let mut parts = text.split_whitespace();
        let (Some(scheme), Some(key), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(malformed());
        };
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(malformed());
        }
        // Never say which part of a key was wrong: unknown, revoked and
        // mistyped keys all get the same answer.
        let invalid = || {
            self.refuse(
                "invalid_key",
                ApiError::Unauthorized("Invalid or revoked API key".into()),
            )
        };
        if !key.starts_with(KEY_PREFIX) || key.len() > 200 {
            return Err(invalid());
        }
        let Some(principal) = self.lookup(CacheKey::Key(hash_key(key)), throttled).await? else {
            return Err(invalid());
        };
        if let Some(id) = principal.api_key
            && let Ok(mut uses) = self.key_uses.lock()
        {
            uses.insert(id, Utc::now());
        }
        Ok(principal)
    }

    async fn lookup(
        &self,
        key: CacheKey,
        throttled: Option<u64>,
    ) -> Result<Option<Principal>, ApiError> {
        if let Some(retry_after) = throttled
            && !self.cache.contains(&key)
        {
            self.metrics
                .auth_failures
                .get_or_create(&ReasonLabels {
                    reason: "throttled",
                })
                .inc();
            return Err(ApiError::TooManyRequests {
                message: "Too many failed authentication attempts; try again later".into(),
                retry_after,
            });
        }
        if self.unknown.contains_key(&key) {
            self.metrics.auth_cache_hits.inc();
            return Ok(None);
        }
        // Unknown credentials go to the short-lived `unknown` cache, so a key
        // or user created a moment ago works within AUTH_NEGATIVE_CACHE_SECONDS.
        match self.cache.get(key.clone()).await? {
            Some(principal) => Ok(Some(principal)),
            None => {
                self.unknown.insert(key, ()).await;
                Ok(None)
            }
        }
    }

    /// Write the batched `last_used_at` times. Called periodically and at shutdown.
    pub async fn flush_key_uses(&self) {
        let uses: Vec<(ApiKeyId, DateTime<Utc>)> = match self.key_uses.lock() {
            Ok(mut uses) => uses.drain().collect(),
            Err(_) => return,
        };
        if uses.is_empty() {
            return;
        }
        if let Err(err) = self.store.touch_api_keys(&uses).await {
            tracing::warn!(error = %err, keys = uses.len(), "could not record API key use");
        }
    }
}

fn header_id<T: std::str::FromStr>(value: &axum::http::HeaderValue) -> Option<T> {
    value.to_str().ok().and_then(|s| s.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_unique_prefixed_and_hashed() {
        let a = generate_key();
        let b = generate_key();
        assert_ne!(a.secret, b.secret);
        assert!(a.secret.starts_with(KEY_PREFIX));
        assert!(a.secret.starts_with(&a.prefix));
        assert_eq!(a.prefix.len(), KEY_PREFIX.len() + PUBLIC_PREFIX_CHARS);
        assert_eq!(a.hash, hash_key(&a.secret));
        assert_eq!(a.hash.len(), 32);
        assert!(a.secret.len() >= KEY_PREFIX.len() + 32);
    }
}
