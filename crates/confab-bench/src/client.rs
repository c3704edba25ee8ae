//! The HTTP client every scenario uses: reqwest over HTTP/1.1 (what the
//! original service's clients speak), no proxy, and only ever 127.0.0.1.

use std::time::Duration;

use anyhow::{Context, bail};
use reqwest::RequestBuilder;

/// How a scenario authenticates.
#[derive(Clone, Debug)]
pub enum Auth {
    /// `Authorization: Bearer <key>` — how a production deployment is called.
    Key(String),
    /// The original's header auth (the embedded default's development mode).
    Headers { org: String, user: String },
}

impl Auth {
    pub fn apply(&self, request: RequestBuilder) -> RequestBuilder {
        match self {
            Auth::Key(key) => request.bearer_auth(key),
            Auth::Headers { org, user } => request
                .header("x-org-id", org.as_str())
                .header("x-user-id", user.as_str()),
        }
    }
}

/// The server's base URL, refusing anything but plain HTTP on 127.0.0.1:
/// a load generator must never be pointed at someone else's machine.
pub fn local_base(url: &str) -> anyhow::Result<String> {
    let parsed = reqwest::Url::parse(url).with_context(|| format!("invalid URL {url:?}"))?;
    if parsed.scheme() != "http" || parsed.host_str() != Some("127.0.0.1") {
        bail!("the benchmark client only talks to http://127.0.0.1:<port>, not {url}");
    }
    let port = parsed
        .port()
        .with_context(|| format!("{url} has no port"))?;
    Ok(format!("http://127.0.0.1:{port}"))
}

/// One client (one connection pool) per scenario or burst wave: a fresh
/// pool means fresh connections, as new users would open.
pub fn new_client() -> anyhow::Result<reqwest::Client> {
    client_keeping(usize::MAX)
}

/// A client that keeps no connection for reuse, for a burst, where every
/// stream opens its own connection and uses it once: a pool would only add
/// work (with thousands of requests waiting for a connection to one host,
/// the pool's list of waiters is scanned on every new connection, ≈ 3 % of
/// the client's CPU in a 5,000 burst) to the client that shares the machine
/// with the server it measures.
pub fn new_unpooled_client() -> anyhow::Result<reqwest::Client> {
    client_keeping(0)
}

fn client_keeping(idle_per_host: usize) -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(idle_per_host)
        .pool_idle_timeout(Duration::from_secs(120))
        .connect_timeout(Duration::from_secs(30))
        .build()
        .context("building the HTTP client")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_http_is_accepted() {
        assert_eq!(
            local_base("http://127.0.0.1:3000/").unwrap(),
            "http://127.0.0.1:3000"
        );
        assert!(local_base("http://localhost:3000").is_err());
        assert!(local_base("http://10.0.0.1:3000").is_err());
        assert!(local_base("https://127.0.0.1:3000").is_err());
        assert!(local_base("http://127.0.0.1").is_err());
    }
}
