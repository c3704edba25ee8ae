//! Typed configuration: compiled defaults, then `.env`, then the environment
//! (SPEC §2). Parsed once at start-up; a bad value stops start-up with one
//! line naming the variable.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use confab_core::ratelimit::Limit;
use confab_core::turn::EngineConfig;
use confab_llm::TokenDelay;
use confab_llm::catalog::Catalog;

/// The embedded default database: a file next to where confab runs.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://confab.db";

/// A configuration value that must not appear in logs (it may hold a password).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// The URL with any password replaced by `***`.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

/// Keys whose value is a credential, in URL query strings (`?password=`)
/// and key/value DSNs (`host=db password=…`). Compared case-insensitively.
const SECRET_KEYS: &[&str] = &[
    "password",
    "sslpassword",
    "passwd",
    "pass",
    "pwd",
    "secret",
    "token",
    "auth_token",
    "api_key",
    "apikey",
    "sslkey_password",
];

/// Whether a parameter named `key` holds a credential.
pub fn is_secret_key(key: &str) -> bool {
    SECRET_KEYS
        .iter()
        .any(|k| k.eq_ignore_ascii_case(key.trim()))
}

fn redact_url(url: &str) -> String {
    redact_credentials(url)
}

/// `text` with every credential it contains replaced by `***`: the password
/// of any `scheme://user:password@host` in it, and the value of every
/// `password=`-like key (see [`SECRET_KEYS`]) after `?`, `&`, `;`, white space
/// or at the start (quoted values included). Meant for whole messages, not
/// only URLs: driver errors (sqlx, redis) may echo the URL they were given,
/// so everything that may carry one goes through here before it is printed
/// or logged.
pub fn redact_credentials(text: &str) -> String {
    redact_key_values(&redact_userinfo(text))
}

fn redact_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let authority_end = tail
            .find(|c: char| matches!(c, '/' | '?' | '#') || c.is_whitespace())
            .unwrap_or(tail.len());
        let authority = &tail[..authority_end];
        match (authority.rfind('@'), authority.find(':')) {
            (Some(at), Some(colon)) if colon < at => {
                out.push_str(&authority[..colon]);
                out.push_str(":***");
                out.push_str(&authority[at..]);
            }
            _ => out.push_str(authority),
        }
        rest = &tail[authority_end..];
    }
    out.push_str(rest);
    out
}

fn redact_key_values(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let bytes = text.as_bytes();
    let mut i = 0;
    let mut copied = 0;
    while i < bytes.len() {
        let at_boundary = i == 0
            || matches!(
                bytes[i - 1],
                b'?' | b'&' | b';' | b' ' | b'\t' | b'\n' | b'"' | b'\'' | b'(' | b','
            );
        let key = at_boundary
            .then(|| {
                SECRET_KEYS.iter().find(|k| {
                    text.get(i..i + k.len())
                        .is_some_and(|s| s.eq_ignore_ascii_case(k))
                        && text[i + k.len()..].trim_start().starts_with('=')
                })
            })
            .flatten();
        let Some(key) = key else {
            i += 1;
            continue;
        };
        let after_key = i + key.len();
        let eq = after_key + text[after_key..].find('=').unwrap_or(0);
        let mut value_start = eq + 1;
        while value_start < bytes.len() && bytes[value_start] == b' ' {
            value_start += 1;
        }
        let value_end = match bytes.get(value_start) {
            Some(&q @ (b'\'' | b'"')) => text[value_start + 1..]
                .find(q as char)
                .map_or(bytes.len(), |j| value_start + 1 + j + 1),
            _ => text[value_start..]
                .find(|c: char| {
                    matches!(c, '&' | ';' | ',' | ')' | '"' | '\'') || c.is_whitespace()
                })
                .map_or(bytes.len(), |j| value_start + j),
        };
        out.push_str(&text[copied..value_start]);
        out.push_str("***");
        copied = value_end;
        i = value_end.max(i + 1);
    }
    out.push_str(&text[copied..]);
    out
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

/// Which authenticators are on (`AUTH_MODE`, comma-separated).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuthMode {
    pub headers: bool,
    pub api_key: bool,
}

impl fmt::Display for AuthMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.headers, self.api_key) {
            (true, true) => f.write_str("headers,api_key"),
            (true, false) => f.write_str("headers"),
            (false, true) => f.write_str("api_key"),
            (false, false) => f.write_str("none"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub host: IpAddr,
    pub port: u16,
    pub app_env: String,
    pub database_url: Secret,
    pub db_pool_max: u32,
    /// How long a request waits for a pooled database connection before it
    /// is answered 503 (`DB_ACQUIRE_TIMEOUT_MS`).
    pub db_acquire_timeout: Duration,
    /// Turn writes that arrive together share PostgreSQL transactions
    /// (`DB_GROUP_COMMIT`, default on).
    pub db_group_commit: bool,
    pub redis_url: Option<Secret>,
    /// Per-request timeout for Redis calls; past it the fail-open/closed policy applies.
    pub redis_timeout: Duration,
    pub rate_limit: Limit,
    pub rate_limit_fail_open: bool,
    pub auth_mode: AuthMode,
    /// How long an authenticated principal is cached (revocation takes effect within it).
    pub auth_cache_ttl: Duration,
    /// How long past its TTL a cached principal is still served while its
    /// refresh runs or the database cannot answer.
    pub auth_cache_grace: Duration,
    /// Failed authentications allowed per client address, and how long an
    /// unknown credential is remembered.
    pub auth_failures: crate::auth::FailurePolicy,
    pub log_level: String,
    pub log_format: LogFormat,
    pub token_delay: TokenDelay,
    /// The simulated model pads replies to at least this many words.
    pub simulated_min_words: usize,
    pub shutdown_grace: Duration,
    /// After a shutdown signal, `/readyz` answers 503 and the listener keeps
    /// accepting this long before it closes (so balancers notice first).
    pub shutdown_readiness_delay: Duration,
    pub max_body_bytes: usize,
    /// The body limit of `/v1/*` (the OpenAI-compatible API).
    pub openai_max_body_bytes: usize,
    /// Longest wait for a request's head (request line and headers), from
    /// its first byte; past it the client gets 408 and the connection closes.
    pub http_header_timeout: Duration,
    /// Longest wait for a request's whole body, from the end of its head;
    /// past it the client gets 408 and the connection closes.
    pub http_body_timeout: Duration,
    /// A connection with no request in progress is closed after this long
    /// (keep-alive, or a client that connects and sends nothing).
    pub http_idle_timeout: Duration,
    /// Seed the demo tenants when the database has no org.
    pub seed_demo: bool,
    /// How often streaming replies' growing text is saved.
    pub stream_flush_interval: Duration,
    /// A `streaming` row not saved for this long belongs to a dead process.
    pub stream_stale_after: Duration,
    /// Keep-alive comment interval on idle streams.
    pub sse_keepalive: Duration,
    /// `SSE_COALESCE_MS`: a stream's writes are at least this far apart
    /// (events in between leave together; see `sse::Pacing`).
    pub sse_coalesce: Duration,
    /// `SSE_COALESCE_MAX_MS`: the window a nearly full server stretches
    /// `sse_coalesce` to (see `sse::Pacing::window`).
    pub sse_coalesce_max: Duration,
    /// A client that accepts no event for this long is treated as gone.
    pub stream_send_timeout: Duration,
    /// `STREAM_DETACH_SECONDS`: how long a generation goes on after its
    /// last reader left, waiting to be resumed; 0 = a disconnect cancels.
    pub stream_detach: Duration,
    /// The models (SPEC §11): the models file and the environment shortcuts.
    pub catalog: Catalog,
    /// Retries and timeouts of model calls (`PROVIDER_*`).
    pub engine: EngineConfig,
    pub provider_connect_timeout: Duration,
}

/// One bad variable: `NAME=value: what is wrong`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {var}: {message}")]
pub struct ConfigError {
    pub var: &'static str,
    pub message: String,
}

fn bad(var: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        var,
        message: message.into(),
    }
}

struct Source<'a> {
    lookup: &'a dyn Fn(&str) -> Option<String>,
}

impl Source<'_> {
    /// A set, non-blank value.
    fn get(&self, var: &str) -> Option<String> {
        (self.lookup)(var).filter(|v| !v.trim().is_empty())
    }

    fn parse<T: std::str::FromStr>(
        &self,
        var: &'static str,
        default: T,
        what: &str,
    ) -> Result<T, ConfigError> {
        match self.get(var) {
            None => Ok(default),
            Some(v) => v
                .trim()
                .parse()
                .map_err(|_| bad(var, format!("{v:?} is not {what}"))),
        }
    }

    fn bool(&self, var: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.get(var).map(|v| v.trim().to_ascii_lowercase()) {
            None => Ok(default),
            Some(v) => match v.as_str() {
                "1" | "true" | "yes" | "on" => Ok(true),
                "0" | "false" | "no" | "off" => Ok(false),
                _ => Err(bad(var, format!("{v:?} is not true or false"))),
            },
        }
    }

    fn seconds(&self, var: &'static str, default: f64) -> Result<Duration, ConfigError> {
        let secs: f64 = self.parse(var, default, "a number of seconds")?;
        let duration = Duration::try_from_secs_f64(secs).map_err(|_| {
            bad(
                var,
                format!("{secs} is not a non-negative number of seconds"),
            )
        })?;
        at_most_a_year(var, duration)
    }

    fn millis(&self, var: &'static str, default: u64) -> Result<Duration, ConfigError> {
        let duration =
            Duration::from_millis(self.parse(var, default, "a whole number of milliseconds")?);
        at_most_a_year(var, duration)
    }
}

/// The longest any duration setting may be: a year is past every sensible
/// value, and far larger ones would overflow the clock's arithmetic (a
/// deadline of now + 10¹⁹ s panics) on every request that uses them.
const LONGEST_SETTING: Duration = Duration::from_secs(365 * 24 * 3600);

fn at_most_a_year(var: &'static str, duration: Duration) -> Result<Duration, ConfigError> {
    if duration > LONGEST_SETTING {
        return Err(bad(var, "at most a year (31536000 seconds)"));
    }
    Ok(duration)
}

impl Config {
    /// The largest request body a path accepts: `OPENAI_MAX_BODY_BYTES` under
    /// `/v1/` (conversations are sent whole), else `MAX_BODY_BYTES`.
    pub fn body_limit(&self, path: &str) -> usize {
        if path.starts_with("/v1/") {
            self.openai_max_body_bytes
        } else {
            self.max_body_bytes
        }
    }

    /// From the process environment (after `.env` has been loaded into it).
    pub fn from_env() -> Result<Config, ConfigError> {
        Self::from_lookup(&|var| std::env::var(var).ok())
    }

    /// From a map (tests).
    pub fn from_map(map: &HashMap<String, String>) -> Result<Config, ConfigError> {
        Self::from_lookup(&|var| map.get(var).cloned())
    }

    pub fn from_lookup(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let src = Source { lookup };
        let app_env = src
            .get("APP_ENV")
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|| "development".to_owned());
        let production = app_env == "production";

        let port: u16 = src.parse("PORT", 3000, "a port number (0-65535)")?;
        let host: IpAddr = src.parse(
            "HOST",
            IpAddr::from([0, 0, 0, 0]),
            "an IP address such as 0.0.0.0 or 127.0.0.1",
        )?;

        let database_url = src
            .get("DATABASE_URL")
            .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned());
        if !(database_url.starts_with("postgres://")
            || database_url.starts_with("postgresql://")
            || database_url.starts_with("sqlite:"))
        {
            return Err(bad(
                "DATABASE_URL",
                format!(
                    "{} must start with postgres://, postgresql:// or sqlite:",
                    redact_url(&database_url)
                ),
            ));
        }
        let db_pool_max: u32 = src.parse("DB_POOL_MAX", 10, "a whole number")?;
        if !(1..=1000).contains(&db_pool_max) {
            return Err(bad("DB_POOL_MAX", "must be between 1 and 1000"));
        }

        let db_acquire_timeout = src.millis("DB_ACQUIRE_TIMEOUT_MS", 1000)?;
        let db_group_commit = src.bool("DB_GROUP_COMMIT", true)?;
        if db_acquire_timeout.is_zero() || db_acquire_timeout > Duration::from_secs(60) {
            return Err(bad("DB_ACQUIRE_TIMEOUT_MS", "must be between 1 and 60000"));
        }
        let max_concurrent_streams: usize = src.parse(
            "MAX_CONCURRENT_STREAMS",
            default_max_concurrent_streams(available_cores(), db_pool_max, memory_limit()),
            "a whole number",
        )?;
        if max_concurrent_streams == 0 {
            return Err(bad("MAX_CONCURRENT_STREAMS", "must be at least 1"));
        }

        let redis_url = src.get("REDIS_URL").map(|v| v.trim().to_owned());
        if let Some(url) = &redis_url
            && !(url.starts_with("redis://") || url.starts_with("rediss://"))
        {
            return Err(bad(
                "REDIS_URL",
                format!("{} must start with redis:// or rediss://", redact_url(url)),
            ));
        }

        let burst: u32 = src.parse("RATE_LIMIT_BURST", 20, "a whole number")?;
        if burst == 0 {
            return Err(bad("RATE_LIMIT_BURST", "must be at least 1"));
        }
        let per_second: f64 = src.parse("RATE_LIMIT_PER_SECOND", 1.0, "a number")?;
        if !(per_second.is_finite() && per_second > 0.0) {
            return Err(bad("RATE_LIMIT_PER_SECOND", "must be a positive number"));
        }

        let auth_mode = match src.get("AUTH_MODE") {
            None => AuthMode {
                headers: !production,
                api_key: true,
            },
            Some(v) => parse_auth_mode(&v)?,
        };

        let log_level = src
            .get("LOG_LEVEL")
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|| "info".to_owned());
        if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
            return Err(bad(
                "LOG_LEVEL",
                format!("{log_level:?} is not a level (error, warn, info, debug, trace) or filter"),
            ));
        }
        let log_format = match src.get("LOG_FORMAT").map(|v| v.trim().to_ascii_lowercase()) {
            None => LogFormat::Json,
            Some(v) if v == "json" => LogFormat::Json,
            Some(v) if v == "pretty" => LogFormat::Pretty,
            Some(v) => return Err(bad("LOG_FORMAT", format!("{v:?} is not json or pretty"))),
        };

        let token_delay = match src.get("SIMULATED_TOKEN_DELAY_MS") {
            None => TokenDelay {
                min_ms: 10,
                max_ms: 30,
            },
            Some(v) => v
                .parse::<TokenDelay>()
                .map_err(|e| bad("SIMULATED_TOKEN_DELAY_MS", e))?,
        };

        let max_body_bytes: usize = src.parse("MAX_BODY_BYTES", 65_536, "a number of bytes")?;
        if max_body_bytes < 64 {
            return Err(bad("MAX_BODY_BYTES", "must be at least 64"));
        }
        // An OpenAI client sends the whole conversation with every turn.
        let openai_max_body_bytes: usize =
            src.parse("OPENAI_MAX_BODY_BYTES", 1_048_576, "a number of bytes")?;
        if openai_max_body_bytes < 64 {
            return Err(bad("OPENAI_MAX_BODY_BYTES", "must be at least 64"));
        }

        let stream_flush_interval = src.millis("STREAM_FLUSH_MS", 1000)?;
        if stream_flush_interval.is_zero() || stream_flush_interval > Duration::from_secs(60) {
            return Err(bad("STREAM_FLUSH_MS", "must be between 1 and 60000"));
        }
        let stream_stale_after = src.seconds("STREAM_STALE_SECONDS", 10.0)?;
        if stream_stale_after < stream_flush_interval * 2 {
            return Err(bad(
                "STREAM_STALE_SECONDS",
                "must be at least twice STREAM_FLUSH_MS, or live streams would be taken for dead ones",
            ));
        }

        // MODELS_FILE names a file that must exist; without it, a
        // `models.toml` in the working directory is used when there is one.
        let (models_file, models_file_required) = match src.get("MODELS_FILE") {
            Some(path) => (std::path::PathBuf::from(path.trim()), true),
            None => (std::path::PathBuf::from("models.toml"), false),
        };
        let catalog = Catalog::load(Some(&models_file), models_file_required, lookup)
            .map_err(|e| bad("MODELS_FILE", e.0))?;
        let stream_send_timeout = src.seconds("STREAM_SEND_TIMEOUT_SECONDS", 30.0)?;
        let stream_detach = src.seconds("STREAM_DETACH_SECONDS", 0.0)?;
        if stream_detach > Duration::from_secs(3600) {
            return Err(bad("STREAM_DETACH_SECONDS", "must be at most 3600"));
        }
        let sse_coalesce = src.millis("SSE_COALESCE_MS", 100)?;
        if sse_coalesce > Duration::from_secs(1) {
            return Err(bad("SSE_COALESCE_MS", "must be at most 1000"));
        }
        let sse_coalesce_max = src.millis("SSE_COALESCE_MAX_MS", 250)?;
        if sse_coalesce_max > Duration::from_secs(1) {
            return Err(bad("SSE_COALESCE_MAX_MS", "must be at most 1000"));
        }
        let rate_limit_fail_open = src.bool("RATE_LIMIT_FAIL_OPEN", true)?;
        let max_retries: u32 = src.parse("PROVIDER_MAX_RETRIES", 2, "a whole number")?;
        if max_retries > 10 {
            return Err(bad("PROVIDER_MAX_RETRIES", "must be at most 10"));
        }
        let positive = |var: &'static str, d: Duration| {
            if d.is_zero() {
                Err(bad(var, "must be more than 0"))
            } else {
                Ok(d)
            }
        };
        let engine = EngineConfig {
            max_retries,
            max_retry_wait: src.millis("PROVIDER_MAX_RETRY_WAIT_MS", 10_000)?,
            retry_base: src.millis("PROVIDER_RETRY_BASE_MS", 250)?,
            first_token_timeout: positive(
                "PROVIDER_FIRST_TOKEN_TIMEOUT_MS",
                src.millis("PROVIDER_FIRST_TOKEN_TIMEOUT_MS", 60_000)?,
            )?,
            idle_timeout: positive(
                "PROVIDER_IDLE_TIMEOUT_MS",
                src.millis("PROVIDER_IDLE_TIMEOUT_MS", 60_000)?,
            )?,
            total_timeout: positive(
                "PROVIDER_TOTAL_TIMEOUT_SECONDS",
                src.seconds("PROVIDER_TOTAL_TIMEOUT_SECONDS", 600.0)?,
            )?,
            send_timeout: stream_send_timeout,
            budget_fail_open: rate_limit_fail_open,
            max_concurrent_turns: max_concurrent_streams,
        };
        let provider_connect_timeout = positive(
            "PROVIDER_CONNECT_TIMEOUT_MS",
            src.millis("PROVIDER_CONNECT_TIMEOUT_MS", 5000)?,
        )?;

        let failure_burst: u32 = src.parse("AUTH_FAILURE_BURST", 20, "a whole number")?;
        if failure_burst == 0 {
            return Err(bad("AUTH_FAILURE_BURST", "must be at least 1"));
        }
        let failure_per_second: f64 = src.parse("AUTH_FAILURE_PER_SECOND", 1.0, "a number")?;
        if !(failure_per_second.is_finite() && failure_per_second > 0.0) {
            return Err(bad("AUTH_FAILURE_PER_SECOND", "must be a positive number"));
        }
        let auth_failures = crate::auth::FailurePolicy {
            limit: Limit {
                burst: failure_burst,
                per_second: failure_per_second,
            },
            negative_ttl: src.seconds("AUTH_NEGATIVE_CACHE_SECONDS", 2.0)?,
        };
        let http_timeout = |var: &'static str, default: u64| {
            let d = src.millis(var, default)?;
            if d.is_zero() || d > Duration::from_secs(3600) {
                return Err(bad(var, "must be between 1 and 3600000"));
            }
            Ok(d)
        };
        let http_header_timeout = http_timeout("HTTP_HEADER_TIMEOUT_MS", 10_000)?;
        let http_body_timeout = http_timeout("HTTP_BODY_TIMEOUT_MS", 30_000)?;
        let http_idle_timeout = http_timeout("HTTP_IDLE_TIMEOUT_MS", 75_000)?;
        let shutdown_grace = src.seconds("SHUTDOWN_GRACE_SECONDS", 30.0)?;
        let default_delay = if production {
            Duration::from_secs(5).min(shutdown_grace)
        } else {
            Duration::ZERO
        };
        let shutdown_readiness_delay = src.millis(
            "SHUTDOWN_READINESS_DELAY_MS",
            u64::try_from(default_delay.as_millis()).unwrap_or(0),
        )?;
        if shutdown_readiness_delay > shutdown_grace {
            return Err(bad(
                "SHUTDOWN_READINESS_DELAY_MS",
                "must not exceed SHUTDOWN_GRACE_SECONDS (the grace period counts from the signal)",
            ));
        }

        Ok(Config {
            auth_failures,
            catalog,
            engine,
            provider_connect_timeout,
            host,
            port,
            database_url: Secret::new(database_url),
            db_pool_max,
            db_acquire_timeout,
            db_group_commit,
            redis_url: redis_url.map(Secret::new),
            redis_timeout: src.millis("REDIS_TIMEOUT_MS", 250)?,
            rate_limit: Limit { burst, per_second },
            rate_limit_fail_open,
            auth_mode,
            auth_cache_ttl: src.seconds("AUTH_CACHE_TTL_SECONDS", 5.0)?,
            auth_cache_grace: src.seconds("AUTH_CACHE_GRACE_SECONDS", 60.0)?,
            log_level,
            log_format,
            token_delay,
            simulated_min_words: src.parse("SIMULATED_MIN_WORDS", 0, "a whole number")?,
            shutdown_grace,
            shutdown_readiness_delay,
            max_body_bytes,
            openai_max_body_bytes,
            http_header_timeout,
            http_body_timeout,
            http_idle_timeout,
            seed_demo: src.bool("SEED_DEMO", !production)?,
            stream_flush_interval,
            stream_stale_after,
            sse_keepalive: src.seconds("SSE_KEEPALIVE_SECONDS", 15.0)?,
            sse_coalesce,
            sse_coalesce_max,
            stream_send_timeout,
            stream_detach,
            app_env,
        })
    }

    pub fn is_production(&self) -> bool {
        self.app_env == "production"
    }
}

/// Streams one core carries at a real model's pace. Measured with sse-10k
/// (10,000 streams of 300 words at 100 ms/token started over 10 s, on 2
/// cores shared with the client and PostgreSQL; BENCHMARKS.md): at 5,000
/// admitted the streams kept their pace (stretch 1.001) and refusals took
/// p99 10–73 ms (runs differ); at 7,000 they still kept it but refusals
/// queued behind them (p99 0.6 s). 2,500 per core also admits a burst of 5,000 short replies
/// whole on 2 cores (README "Overload").
pub const STREAMS_PER_CORE: usize = 2500;
/// Turns one pooled connection keeps going: a turn commits twice (begin and
/// final write) at ≈ 2 ms per commit under load, so a connection turns over
/// ≈ 250 turns/s, and turns last ≥ 2 s.
pub const STREAMS_PER_CONNECTION: usize = 500;
/// What one open stream may cost in memory, for the memory bound: peak RSS
/// grew by ≈ 35 KB per stream in a burst of 5,000 short replies and by
/// ≈ 55 KB per stream with 5,000 replies of 300 words open; with headroom.
pub const STREAM_MEMORY_BYTES: u64 = 64 * 1024;

/// The default of `MAX_CONCURRENT_STREAMS`: what the CPU, the pool and (when
/// a cgroup limits this process's memory) half of that memory can each
/// carry, whichever is least (README "Overload").
pub fn default_max_concurrent_streams(
    cores: usize,
    db_pool_max: u32,
    memory_limit: Option<u64>,
) -> usize {
    let by_cpu = STREAMS_PER_CORE.saturating_mul(cores.max(1));
    let by_pool = STREAMS_PER_CONNECTION.saturating_mul(db_pool_max.max(1) as usize);
    let by_memory = memory_limit.map_or(usize::MAX, |bytes| {
        usize::try_from(bytes / 2 / STREAM_MEMORY_BYTES)
            .unwrap_or(usize::MAX)
            .max(1)
    });
    by_cpu.min(by_pool).min(by_memory)
}

/// The memory limit of this process's cgroup (v2 `memory.max`, else v1
/// `memory.limit_in_bytes`), when there is one.
pub fn memory_limit() -> Option<u64> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let limit = read("/sys/fs/cgroup/memory.max")
        .or_else(|| read("/sys/fs/cgroup/memory/memory.limit_in_bytes"))?;
    parse_memory_limit(&limit)
}

/// A cgroup memory limit as written in its file: `max` (v2) or a number
/// near `i64::MAX` (v1) mean none.
fn parse_memory_limit(text: &str) -> Option<u64> {
    let bytes: u64 = text.trim().parse().ok()?;
    (bytes < 1 << 60).then_some(bytes)
}

/// The cores this process may run on (cgroup and affinity limits included).
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

fn parse_auth_mode(v: &str) -> Result<AuthMode, ConfigError> {
    let mut mode = AuthMode {
        headers: false,
        api_key: false,
    };
    for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part {
            "headers" => mode.headers = true,
            "api_key" | "api_keys" => mode.api_key = true,
            other => {
                return Err(bad(
                    "AUTH_MODE",
                    format!("{other:?} is not an authenticator (use headers, api_key or both)"),
                ));
            }
        }
    }
    if !(mode.headers || mode.api_key) {
        return Err(bad(
            "AUTH_MODE",
            "at least one of headers, api_key is needed",
        ));
    }
    Ok(mode)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_map(&map)
    }

    #[test]
    fn defaults_are_the_embedded_development_setup() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.port, 3000);
        assert_eq!(c.database_url.expose(), DEFAULT_DATABASE_URL);
        assert!(c.redis_url.is_none());
        assert_eq!(
            c.rate_limit,
            Limit {
                burst: 20,
                per_second: 1.0
            }
        );
        assert!(c.auth_mode.headers && c.auth_mode.api_key);
        assert!(c.seed_demo);
        assert_eq!(c.max_body_bytes, 65_536);
        assert_eq!(c.http_header_timeout, Duration::from_secs(10));
        assert_eq!(c.http_body_timeout, Duration::from_secs(30));
        assert_eq!(c.http_idle_timeout, Duration::from_secs(75));
    }

    #[test]
    fn the_concurrency_bound_follows_the_cores_and_the_pool() {
        // 2 cores, the default pool, no memory limit: 5,000.
        assert_eq!(default_max_concurrent_streams(2, 10, None), 5000);
        // 1 core: the CPU bounds it.
        assert_eq!(default_max_concurrent_streams(1, 10, None), 2500);
        // A small pool bounds it instead.
        assert_eq!(default_max_concurrent_streams(8, 2, None), 1000);
        assert_eq!(default_max_concurrent_streams(0, 0, None), 500);
        // A 256 MiB container: half of it at 64 KiB a stream.
        assert_eq!(default_max_concurrent_streams(2, 10, Some(256 << 20)), 2048);
        assert_eq!(default_max_concurrent_streams(2, 10, Some(1)), 1);
        assert_eq!(parse_memory_limit("max\n"), None);
        assert_eq!(parse_memory_limit("9223372036854771712\n"), None);
        assert_eq!(parse_memory_limit("536870912\n"), Some(512 << 20));
        let c = cfg(&[("DB_POOL_MAX", "3")]).unwrap();
        assert_eq!(
            c.engine.max_concurrent_turns,
            default_max_concurrent_streams(available_cores(), 3, memory_limit())
        );
        assert_eq!(c.db_acquire_timeout, Duration::from_secs(1));
        assert!(c.db_group_commit);
        let c = cfg(&[("MAX_CONCURRENT_STREAMS", "7")]).unwrap();
        assert_eq!(c.engine.max_concurrent_turns, 7);
    }

    #[test]
    fn production_turns_off_header_auth_and_seeding() {
        let c = cfg(&[("APP_ENV", "production")]).unwrap();
        assert!(!c.auth_mode.headers && c.auth_mode.api_key);
        assert!(!c.seed_demo);
        let c = cfg(&[("APP_ENV", "production"), ("AUTH_MODE", "headers,api_key")]).unwrap();
        assert!(c.auth_mode.headers);
    }

    #[test]
    fn readiness_delay_is_off_in_development_and_within_the_grace_in_production() {
        assert_eq!(cfg(&[]).unwrap().shutdown_readiness_delay, Duration::ZERO);
        let prod = cfg(&[("APP_ENV", "production")]).unwrap();
        assert_eq!(prod.shutdown_readiness_delay, Duration::from_secs(5));
        let short = cfg(&[("APP_ENV", "production"), ("SHUTDOWN_GRACE_SECONDS", "2")]).unwrap();
        assert_eq!(short.shutdown_readiness_delay, Duration::from_secs(2));
        let err = cfg(&[
            ("SHUTDOWN_GRACE_SECONDS", "1"),
            ("SHUTDOWN_READINESS_DELAY_MS", "1500"),
        ])
        .unwrap_err();
        assert_eq!(err.var, "SHUTDOWN_READINESS_DELAY_MS");
    }

    #[test]
    fn a_bad_value_names_its_variable() {
        for (var, value) in [
            ("PORT", "http"),
            ("DATABASE_URL", "mysql://x"),
            ("REDIS_URL", "localhost:6379"),
            ("RATE_LIMIT_BURST", "0"),
            ("RATE_LIMIT_PER_SECOND", "-1"),
            ("AUTH_MODE", "magic"),
            ("LOG_FORMAT", "xml"),
            ("SIMULATED_TOKEN_DELAY_MS", "30-10"),
            ("RATE_LIMIT_FAIL_OPEN", "maybe"),
            ("SHUTDOWN_GRACE_SECONDS", "-3"),
            ("HTTP_HEADER_TIMEOUT_MS", "0"),
            ("HTTP_BODY_TIMEOUT_MS", "1.5"),
            ("HTTP_IDLE_TIMEOUT_MS", "3600001"),
            ("STREAM_DETACH_SECONDS", "7200"),
            ("STREAM_DETACH_SECONDS", "soon"),
            ("SSE_COALESCE_MS", "1001"),
            ("SSE_COALESCE_MS", "-5"),
            ("SSE_COALESCE_MAX_MS", "1001"),
            ("MAX_CONCURRENT_STREAMS", "0"),
            ("DB_ACQUIRE_TIMEOUT_MS", "0"),
            ("DB_GROUP_COMMIT", "sometimes"),
            ("SSE_KEEPALIVE_SECONDS", "1e19"),
            ("AUTH_CACHE_GRACE_SECONDS", "31536001"),
            ("REDIS_TIMEOUT_MS", "18446744073709551615"),
        ] {
            let err = cfg(&[(var, value)]).unwrap_err();
            assert_eq!(err.var, var, "{err}");
        }
    }

    #[test]
    fn urls_are_redacted() {
        let s = Secret::new("postgres://app:hunter2@db:5432/confab");
        assert_eq!(s.redacted(), "postgres://app:***@db:5432/confab");
        assert!(!format!("{s:?}").contains("hunter2"));
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
    }

    #[test]
    fn every_credential_form_is_redacted() {
        let cases = [
            (
                "postgres://app@db/confab?password=hunter2&sslmode=require",
                "postgres://app@db/confab?password=***&sslmode=require",
            ),
            (
                "postgres://db/confab?sslmode=verify-full&sslpassword=hunter2",
                "postgres://db/confab?sslmode=verify-full&sslpassword=***",
            ),
            (
                "host=db user=app password=hunter2 dbname=confab",
                "host=db user=app password=*** dbname=confab",
            ),
            (
                "host=db password='hunter2 x' dbname=confab",
                "host=db password=*** dbname=confab",
            ),
            ("redis://:hunter2@cache:6379/0", "redis://:***@cache:6379/0"),
            (
                "redis://cache/?PASSWORD=hunter2",
                "redis://cache/?PASSWORD=***",
            ),
            (
                "error connecting to postgres://app:hunter2@db:5432/x: refused (os error 111)",
                "error connecting to postgres://app:***@db:5432/x: refused (os error 111)",
            ),
            ("sqlite://confab.db", "sqlite://confab.db"),
            ("compass=north bypass=1", "compass=north bypass=1"),
        ];
        for (input, redacted) in cases {
            assert_eq!(redact_credentials(input), redacted, "{input}");
        }
        for prefix in ["", " ", "password=a&", "?password=b;", "password = "] {
            // Never panics on odd input, never leaves the secret.
            let s = redact_credentials(&format!("{prefix}password=hunter2"));
            assert!(!s.contains("hunter2"), "{s}");
        }
    }
}
