//! Issue #14 hardening, seen from outside: bounded log lines, credentials
//! never printed, generic 5xx bodies.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::per_store;
use crate::support::process::Confab;
use crate::support::{Db, TestDb};

per_store!(
    database_failures_answer_plain_words_and_retry_after,
    failed_authentications_are_cached_and_limited_per_address,
    message_text_never_reaches_the_log,
);

/// The `request completed` log line whose `status` is `status`, waiting for it.
async fn completed_line(app: &Confab, status: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(line) = app
            .log_lines()
            .into_iter()
            .find(|l| l["message"] == "request completed" && l["status"] == status)
        {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "no request line with status {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_controlled_log_fields_are_bounded_even_for_404s() {
    crate::support::init();
    let db = TestDb::new(Db::Sqlite).await;
    let app = Confab::start(&[("DATABASE_URL", &db.url), ("SIMULATED_TOKEN_DELAY_MS", "0")]).await;
    let agent = "A".repeat(100_000);
    let path = format!("/{}", "p".repeat(20_000));
    let res = reqwest::Client::new()
        .get(app.url(&path))
        .header("user-agent", &agent)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    let line = completed_line(&app, 404).await;
    for field in ["userAgent", "url"] {
        let value = line[field]
            .as_str()
            .unwrap_or_else(|| panic!("{field} missing"));
        assert!(
            value.chars().count() <= 300,
            "{field} is {} chars",
            value.len()
        );
        assert!(
            value.contains("bytes]"),
            "{field} truncation is not marked: {value}"
        );
    }
    assert!(line["userAgent"].as_str().unwrap().starts_with("AAAA"));
    assert!(
        line.to_string().len() < 2_000,
        "log line of {} bytes",
        line.to_string().len()
    );
}

/// Run `confab serve` until it exits (it must: the configuration is bad or
/// the database unreachable) and return stdout + stderr.
async fn failed_start_output(env: &[(&str, &str)]) -> String {
    let child = crate::support::process::command(env)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn confab");
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("confab kept running with a bad database URL")
        .expect("wait for confab");
    assert!(!out.status.success(), "confab started");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_passwords_are_never_printed_in_any_url_or_dsn_form() {
    crate::support::init();
    for url in [
        "postgres://confab@127.0.0.1:1/confab?password=hunter2&sslpassword=s3cr3tkey&connect_timeout=1",
        "postgres://confab:hunter2@127.0.0.1:1/confab?connect_timeout=1",
        "host=127.0.0.1 port=1 user=confab password=hunter2 sslpassword=s3cr3tkey",
    ] {
        let output = failed_start_output(&[("DATABASE_URL", url)]).await;
        assert!(!output.is_empty(), "no error was printed for {url}");
        for secret in ["hunter2", "s3cr3tkey"] {
            assert!(
                !output.contains(secret),
                "{secret} printed for {url}:\n{output}"
            );
        }
    }
}

/// Make the test database unusable from outside the app: PostgreSQL refuses
/// new connections and its existing ones are terminated; SQLite is locked by
/// another connection holding an exclusive transaction (returned: keep it).
pub(crate) async fn make_database_unavailable(db: &TestDb) -> Option<sqlx::SqliteConnection> {
    use sqlx::Connection;
    match db.kind {
        Db::Postgres => {
            let name = db
                .url
                .rsplit('/')
                .next()
                .unwrap()
                .split('?')
                .next()
                .unwrap()
                .to_owned();
            let mut admin = sqlx::PgConnection::connect(&crate::support::postgres_admin_url())
                .await
                .unwrap();
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "ALTER DATABASE {name} ALLOW_CONNECTIONS false"
            )))
            .execute(&mut admin)
            .await
            .unwrap();
            sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
            )
            .bind(&name)
            .execute(&mut admin)
            .await
            .unwrap();
            let _ = admin.close().await;
            None
        }
        Db::Sqlite => {
            let mut conn = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
            sqlx::raw_sql("BEGIN EXCLUSIVE")
                .execute(&mut conn)
                .await
                .unwrap();
            Some(conn)
        }
    }
}

async fn assert_plain_503(res: reqwest::Response, what: &str) {
    assert_eq!(res.status(), 503, "{what}");
    let retry_after = res
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    assert!(
        retry_after
            .as_deref()
            .is_some_and(|v| v.parse::<u64>().is_ok_and(|s| s >= 1)),
        "{what}: Retry-After {retry_after:?}"
    );
    let body = res.text().await.unwrap();
    let lower = body.to_lowercase();
    for internal in [
        "postgres",
        "sqlite",
        "line ",
        "os error",
        "code:",
        "127.0.0.1",
        "localhost",
        "locked",
        "terminat",
        "sqlx",
    ] {
        assert!(
            !lower.contains(internal),
            "{what}: body names {internal:?}: {body}"
        );
    }
    let json: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["error"], "Service Unavailable", "{body}");
}

async fn database_failures_answer_plain_words_and_retry_after(db: Db) {
    let app = crate::support::spawn_app(db).await;
    let who = crate::support::As::alice();
    let (status, _) = app.get_json("/chats", &who).await;
    assert_eq!(status, 200);
    let _lock = make_database_unavailable(&app.db).await;
    let res = app
        .post_json("/chat", &who, &serde_json::json!({ "message": "hello?" }))
        .await;
    assert_plain_503(res, "POST /chat").await;
    if db == Db::Postgres {
        // (SQLite in WAL mode keeps serving reads under another's write lock.)
        let res = app.get("/chats", &who).await;
        assert_plain_503(res, "GET /chats").await;
    }
    let res = app.get("/health", &crate::support::As::Nobody).await;
    assert_eq!(res.status(), 503);
    assert!(
        res.headers().contains_key("retry-after"),
        "/health 503 without Retry-After"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_is_nosniff_and_the_playground_has_a_strict_csp() {
    crate::support::init();
    let app = crate::support::spawn_app(Db::Sqlite).await;
    let who = crate::support::As::alice();
    let mut responses = vec![
        (
            "GET /health",
            app.get("/health", &crate::support::As::Nobody).await,
        ),
        (
            "GET /nope",
            app.get("/nope", &crate::support::As::Nobody).await,
        ),
        (
            "GET /chats unauthenticated",
            app.get("/chats", &crate::support::As::Nobody).await,
        ),
        (
            "GET /playground",
            app.get("/playground", &crate::support::As::Nobody).await,
        ),
        (
            "GET /playground/playground.js",
            app.get("/playground/playground.js", &crate::support::As::Nobody)
                .await,
        ),
        (
            "POST /chat 400",
            app.post_json("/chat", &who, &serde_json::json!({ "message": "" }))
                .await,
        ),
        (
            "GET /metrics",
            app.get("/metrics", &crate::support::As::Nobody).await,
        ),
    ];
    responses.push((
        "OPTIONS preflight",
        app.client
            .request(reqwest::Method::OPTIONS, app.url("/chat"))
            .header("origin", "http://example.test")
            .header("access-control-request-method", "POST")
            .send()
            .await
            .unwrap(),
    ));
    for (what, res) in &responses {
        assert_eq!(
            res.headers()
                .get("x-content-type-options")
                .map(|v| v.to_str().unwrap()),
            Some("nosniff"),
            "{what}"
        );
    }
    let page = &responses[3].1;
    let csp = page
        .headers()
        .get("content-security-policy")
        .and_then(|v| v.to_str().ok())
        .expect("the playground page has a CSP");
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "CSP lacks {directive}: {csp}");
    }
    assert!(!csp.contains("unsafe"), "{csp}");
}

async fn failed_authentications_are_cached_and_limited_per_address(db: Db) {
    let app = crate::support::spawn_app_with(
        db,
        &[
            ("AUTH_FAILURE_BURST", "5"),
            ("AUTH_FAILURE_PER_SECOND", "0.05"),
        ],
    )
    .await;
    let unknown = crate::support::As::Key("cfb_thisKeyDoesNotExistAnywhere000000000".into());
    let misses = || app.state.metrics.auth_cache_misses.get();
    // Alice has used the service from this address before (her principal is
    // cached); Bob has not.
    assert_eq!(
        app.get("/chats", &crate::support::As::alice())
            .await
            .status(),
        200
    );
    let before = misses();
    for i in 0..5 {
        let res = app.get("/chats", &unknown).await;
        assert_eq!(res.status(), 401, "attempt {i}");
    }
    assert!(
        misses() - before <= 1,
        "5 requests with one unknown key made {} store lookups",
        misses() - before
    );
    // Past the budget: 429 with Retry-After, SPEC's error shape, no lookup,
    // for any credential from this address (random keys miss every cache).
    let lookups = misses();
    for who in [
        unknown.clone(),
        crate::support::As::Key("cfb_anotherRandomKey1111111111111111111".into()),
    ] {
        let res = app.get("/chats", &who).await;
        assert_eq!(res.status(), 429);
        let retry: u64 = res.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(retry >= 1);
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["error"], "Too Many Requests", "{body}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    assert_eq!(misses(), lookups, "throttled requests reached the store");
    // A client whose credentials are already known is not locked out by
    // another one at the same address (behind a proxy, every client shares
    // one); an unknown-to-the-cache one waits like the attacker.
    let res = app.get("/chats", &crate::support::As::alice()).await;
    assert_eq!(res.status(), 200, "a cached principal passes");
    let res = app.get("/chats", &crate::support::As::bob()).await;
    assert_eq!(res.status(), 429, "an uncached one is throttled");
    assert_eq!(misses(), lookups, "throttled requests reached the store");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_content_length_is_refused_before_the_body_is_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    crate::support::init();
    let app = crate::support::spawn_app(Db::Sqlite).await;
    let mut tcp = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "POST /chat HTTP/1.1\r\nhost: {}\r\nx-org-id: {}\r\nx-user-id: {}\r\n\
         content-type: application/json\r\ncontent-length: 10000000\r\n\r\n",
        app.addr,
        crate::support::app::ACME,
        crate::support::app::ALICE
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    // No body follows: the answer must come from the header alone.
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(3), tcp.read(&mut buf))
        .await
        .expect("the server waited for a body it will refuse anyway")
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("Payload Too Large"), "{answer}");
}

/// Non-negotiable: message text never appears in the logs. The deployed
/// binary at `info`, with the text a user and a model write (messages,
/// system prompts, titles, the replies that echo them) sent through every
/// route that takes it, accepted and refused, streamed and not; then no
/// line of its stdout or stderr holds any of it.
async fn message_text_never_reaches_the_log(db: Db) {
    let db = TestDb::new(db).await;
    let app = crate::contract::start(&db).await;
    const TEXT: &str = "Zq7-private-words";
    let client = reqwest::Client::new();
    let mut sent = 0;
    // Send `body` as Alice, expect `status`, return the answer's text.
    let mut call = async |method: reqwest::Method, path: &str, body: String, status: u16| {
        sent += 1;
        let res = client
            .request(method, app.url(path))
            .header("x-org-id", crate::support::app::ACME)
            .header("x-user-id", crate::support::app::ALICE)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), status, "{path}");
        res.text().await.unwrap()
    };
    use reqwest::Method;
    let body = json!({ "message": TEXT, "system": TEXT }).to_string();
    let reply: Value = serde_json::from_str(&call(Method::POST, "/chat", body, 200).await).unwrap();
    assert!(reply["reply"].as_str().unwrap().contains(TEXT), "{reply}");
    let chat = reply["chat_id"].as_str().unwrap().to_owned();
    let body = json!({ "message": TEXT, "chat_id": chat }).to_string();
    assert!(
        call(Method::POST, "/chat/stream", body, 200)
            .await
            .contains(TEXT)
    );
    let body = json!({ "title": TEXT }).to_string();
    call(Method::PATCH, &format!("/chat/{chat}"), body, 200).await;
    for stream in [false, true] {
        let body = json!({ "model": "simulated", "stream": stream, "messages": [
            { "role": "system", "content": TEXT }, { "role": "user", "content": TEXT },
        ] });
        let answer = call(Method::POST, "/v1/chat/completions", body.to_string(), 200).await;
        assert!(answer.contains(TEXT));
    }
    for (path, body) in [
        ("/chat", json!({ "message": TEXT.repeat(1_000) }).to_string()),
        ("/chat", json!({ "message": TEXT, "chat_id": TEXT }).to_string()),
        ("/chat", json!({ "message": [TEXT] }).to_string()),
        ("/chat", format!("{{\"message\": \"{TEXT}")),
        ("/chat", json!({ "message": TEXT, "model": "nope" }).to_string()),
        ("/v1/chat/completions", json!({ "model": "simulated", "messages": [{ "role": TEXT, "content": TEXT }] }).to_string()),
        ("/v1/chat/completions", json!({ "model": "simulated", "temperature": TEXT, "messages": [{ "role": "user", "content": TEXT }] }).to_string()),
    ] {
        call(Method::POST, path, body, 400).await;
    }
    // Every request has its line (the log is written, not empty) ...
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let completed = app
            .log_lines()
            .iter()
            .filter(|l| l["message"] == "request completed")
            .count();
        if completed >= sent {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{completed} request lines for {sent} requests"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ... and none of the text.
    let stdout = app.logs.lock().unwrap().clone();
    let stderr = app.stderr.lock().unwrap().clone();
    for line in stdout.iter().chain(&stderr) {
        assert!(!line.contains(TEXT), "message text in the log: {line}");
    }
}
