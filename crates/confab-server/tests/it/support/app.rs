//! `spawn_app`: a real confab server (the library, in-process) on a random
//! port, on a fresh database, with a reqwest client and helpers per endpoint.

use std::collections::HashMap;
use std::net::SocketAddr;

use confab_server::state::AppState;
use confab_server::{App, Config};
use reqwest::{Method, RequestBuilder, Response};
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{Db, TestDb};

pub const ACME: &str = "00000000-0000-0000-0000-000000000001";
pub const TECH: &str = "00000000-0000-0000-0000-000000000002";
pub const ALICE: &str = "00000000-0000-0000-0001-000000000001";
pub const BOB: &str = "00000000-0000-0000-0001-000000000002";
pub const CHARLIE: &str = "00000000-0000-0000-0002-000000000001";

/// Who a request is sent as.
#[derive(Clone, Debug)]
pub enum As {
    Nobody,
    /// `x-org-id` + `x-user-id`.
    Headers(String, String),
    /// `Authorization: Bearer …`.
    Key(String),
}

impl As {
    pub fn alice() -> As {
        As::Headers(ACME.into(), ALICE.into())
    }
    pub fn bob() -> As {
        As::Headers(ACME.into(), BOB.into())
    }
    pub fn charlie() -> As {
        As::Headers(TECH.into(), CHARLIE.into())
    }
}

pub struct TestApp {
    pub base: String,
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    pub state: AppState,
    pub db: TestDb,
    stop: CancellationToken,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

/// Settings every test app gets unless the test overrides them: fast model,
/// a limit high enough never to refuse, quick shutdown.
const TEST_DEFAULTS: &[(&str, &str)] = &[
    ("HOST", "127.0.0.1"),
    ("PORT", "0"),
    ("SIMULATED_TOKEN_DELAY_MS", "0"),
    ("RATE_LIMIT_BURST", "100000"),
    ("RATE_LIMIT_PER_SECOND", "1000"),
    ("SHUTDOWN_GRACE_SECONDS", "2"),
    ("LOG_LEVEL", "warn"),
    // Correctness tests share two cores with the whole suite: a request
    // waits for a database connection as long as it takes (the overload
    // tests set their own, short, wait).
    ("DB_ACQUIRE_TIMEOUT_MS", "10000"),
];

/// The head of Alice's `POST {path}` with a JSON body of `content_length`
/// bytes (header auth), for tests that write to the socket themselves.
pub fn raw_post_head(addr: SocketAddr, path: &str, content_length: usize) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\nx-org-id: {ACME}\r\nx-user-id: {ALICE}\r\n\
         content-type: application/json\r\ncontent-length: {content_length}\r\n\r\n"
    )
}

pub async fn spawn_app(db: Db) -> TestApp {
    spawn_app_with(db, &[]).await
}

/// Spawn with extra settings (`("RATE_LIMIT_BURST", "5")`, `("REDIS_URL", …)`).
pub async fn spawn_app_with(db: Db, env: &[(&str, &str)]) -> TestApp {
    let db = TestDb::new(db).await;
    spawn_on(db, env).await
}

/// Spawn on an existing database (e.g. to restart over the same data).
pub async fn spawn_on(db: TestDb, env: &[(&str, &str)]) -> TestApp {
    let mut map: HashMap<String, String> = TEST_DEFAULTS
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    map.insert("DATABASE_URL".into(), db.url.clone());
    for (k, v) in env {
        map.insert(k.to_string(), v.to_string());
    }
    let config = Config::from_map(&map).expect("test config");
    let app = App::build(config).await.expect("build app");
    let state = app.state.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    let signal = stop.clone();
    let handle = tokio::spawn(app.serve(listener, async move { signal.cancelled().await }));
    TestApp {
        base: format!("http://{addr}"),
        addr,
        client: reqwest::Client::new(),
        state,
        db,
        stop,
        handle: Some(handle),
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn request(&self, method: Method, path: &str, who: &As) -> RequestBuilder {
        let req = self.client.request(method, self.url(path));
        match who {
            As::Nobody => req,
            As::Headers(org, user) => req.header("x-org-id", org).header("x-user-id", user),
            As::Key(key) => req.header("authorization", format!("Bearer {key}")),
        }
    }

    pub async fn get(&self, path: &str, who: &As) -> Response {
        self.request(Method::GET, path, who)
            .send()
            .await
            .expect("request")
    }

    pub async fn post_json(&self, path: &str, who: &As, body: &Value) -> Response {
        self.request(Method::POST, path, who)
            .json(body)
            .send()
            .await
            .expect("request")
    }

    /// Give the Acme org a daily token limit (SPEC §12; 0 = unlimited),
    /// straight in the store.
    pub async fn limit_acme_per_day(&self, tokens: u64) {
        self.state
            .store
            .set_org_token_limits(
                ACME.parse().unwrap(),
                confab_core::model::TokenLimits {
                    per_minute: 0,
                    per_day: tokens,
                },
            )
            .await
            .unwrap();
    }

    /// `POST /chat` and the JSON reply, asserting 200.
    pub async fn chat(&self, who: &As, message: &str, chat_id: Option<&str>) -> Value {
        let mut body = serde_json::json!({ "message": message });
        if let Some(id) = chat_id {
            body["chat_id"] = Value::from(id);
        }
        let res = self.post_json("/chat", who, &body).await;
        assert_eq!(res.status(), 200, "POST /chat");
        res.json().await.expect("json")
    }

    pub async fn get_json(&self, path: &str, who: &As) -> (u16, Value) {
        let res = self.get(path, who).await;
        let status = res.status().as_u16();
        let body = res.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    /// Graceful shutdown; returns the server's result.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.stop.cancel();
        match self.handle.take() {
            Some(h) => h.await.expect("server task"),
            None => Ok(()),
        }
    }

    /// Stop the server and hand back its database (for restart tests).
    pub async fn stop_and_keep_db(mut self) -> TestDb {
        self.stop.cancel();
        if let Some(h) = self.handle.take() {
            let _ = h.await;
        }
        // Move the database out; the rest is dropped.
        std::mem::replace(&mut self.db, TestDb::placeholder())
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The JSON error shape every error response has.
pub async fn assert_error(res: Response, status: u16, reason: &str) -> String {
    assert_eq!(res.status().as_u16(), status);
    let ct = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    assert!(ct.starts_with("application/json"), "content-type {ct}");
    let body: Value = res.json().await.expect("json error body");
    assert_eq!(body["error"], reason, "{body}");
    body["message"]
        .as_str()
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| panic!("error body without message: {body}"))
        .to_owned()
}
