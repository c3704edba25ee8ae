//! Black-box tests of the foundation (SPEC §3, §7): health, root, header
//! auth, correlation ids, metrics, error shapes, CORS. Every body runs on
//! SQLite and on PostgreSQL.

use serde_json::Value;

use crate::per_store;
use crate::support::app::{ACME, ALICE, BOB, CHARLIE, TECH};
use crate::support::{As, Db, assert_error, spawn_app};

per_store!(
    health_reports_the_database_and_no_redis,
    health_with_headers_names_the_org_and_user,
    header_auth_failures_are_401_or_403_never_500,
    root_with_auth_shows_rate_limit_without_taking_a_token,
    request_id_is_kept_when_valid_and_made_otherwise,
    unknown_paths_share_one_metric_label,
    metrics_have_the_spec_families_labels_and_buckets,
    framework_errors_are_json,
    cors_preflight_allows_the_spec_headers,
    demo_seed_is_idempotent,
    a_request_abandoned_by_its_client_is_still_counted_and_logged,
);

async fn health_reports_the_database_and_no_redis(db: Db) {
    let app = spawn_app(db).await;
    let (status, body) = app.get_json("/health", &As::Nobody).await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "ok");
    assert_eq!(body["env"], "development");
    assert_eq!(body["services"]["database"], "connected");
    assert_eq!(body["services"]["redis"], "not configured");
    assert!(body["requestId"].as_str().is_some());
    assert!(body["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')));
    assert!(body.get("org").is_none());
}

async fn health_with_headers_names_the_org_and_user(db: Db) {
    let app = spawn_app(db).await;
    let (status, body) = app.get_json("/health", &As::alice()).await;
    assert_eq!(status, 200);
    assert_eq!(body["org"], ACME);
    assert_eq!(body["user"]["id"], ALICE);
    assert_eq!(body["user"]["email"], "admin@acme.com");
    assert_eq!(body["user"]["role"], "admin");
}

async fn header_auth_failures_are_401_or_403_never_500(db: Db) {
    let app = spawn_app(db).await;
    // A user of the other org.
    let res = app
        .get("/health", &As::Headers(ACME.into(), CHARLIE.into()))
        .await;
    let msg = assert_error(res, 403, "Forbidden").await;
    assert_eq!(msg, "User does not belong to specified organization");
    // Malformed ids.
    for (org, user) in [
        ("not-a-uuid", ALICE),
        (ACME, "1234"),
        ("", ""),
        (ACME, "00000000-0000-0000-0001-00000000000Z"),
    ] {
        let res = app
            .get("/health", &As::Headers(org.into(), user.into()))
            .await;
        assert_error(res, 401, "Unauthorized").await;
    }
    // Unknown user.
    let res = app
        .get(
            "/chats",
            &As::Headers(ACME.into(), uuid::Uuid::new_v4().to_string()),
        )
        .await;
    assert_error(res, 401, "Unauthorized").await;
    // One header only, and none at all on a protected route.
    let res = app
        .client
        .get(app.url("/chats"))
        .header("x-org-id", ACME)
        .send()
        .await
        .unwrap();
    let msg = assert_error(res, 401, "Unauthorized").await;
    assert_eq!(msg, "Missing x-org-id or x-user-id headers");
    let res = app.get("/chats", &As::Nobody).await;
    let msg = assert_error(res, 401, "Unauthorized").await;
    assert_eq!(msg, "Missing x-org-id or x-user-id headers");
    // Non-UTF-8 header bytes.
    let res = app
        .client
        .get(app.url("/chats"))
        .header(
            "x-org-id",
            reqwest::header::HeaderValue::from_bytes(b"\xff\xfe").unwrap(),
        )
        .header("x-user-id", ALICE)
        .send()
        .await
        .unwrap();
    assert_error(res, 401, "Unauthorized").await;
    // Bob and Charlie are fine.
    assert_eq!(app.get("/chats", &As::bob()).await.status(), 200);
    assert_eq!(
        app.get("/chats", &As::Headers(TECH.into(), CHARLIE.into()))
            .await
            .status(),
        200
    );
    let _ = BOB;
}

async fn root_with_auth_shows_rate_limit_without_taking_a_token(db: Db) {
    let app = crate::support::spawn_app_with(
        db,
        &[
            ("RATE_LIMIT_BURST", "5"),
            ("RATE_LIMIT_PER_SECOND", "0.001"),
        ],
    )
    .await;
    let (status, body) = app.get_json("/", &As::Nobody).await;
    assert_eq!(status, 200);
    assert!(body["message"].as_str().is_some());
    assert!(body.get("rateLimit").is_none());
    for _ in 0..3 {
        let (status, body) = app.get_json("/", &As::alice()).await;
        assert_eq!(status, 200);
        assert_eq!(body["org"], ACME);
        assert_eq!(body["user"]["id"], ALICE);
        assert_eq!(body["rateLimit"]["limit"], 5);
        assert_eq!(
            body["rateLimit"]["remaining"], 5,
            "GET / must not take a token"
        );
        assert!(body["rateLimit"]["resetAt"].as_str().is_some());
    }
    let res = app.get("/chats", &As::alice()).await;
    assert_eq!(res.headers()["x-ratelimit-remaining"], "4");
    let (_, body) = app.get_json("/", &As::alice()).await;
    assert_eq!(body["rateLimit"]["remaining"], 4);
}

async fn request_id_is_kept_when_valid_and_made_otherwise(db: Db) {
    let app = spawn_app(db).await;
    let res = app
        .client
        .get(app.url("/health"))
        .header("x-request-id", "my-trace-123")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["x-request-id"], "my-trace-123");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["requestId"], "my-trace-123");

    for bad in ["x".repeat(129), "has space".to_owned(), String::new()] {
        let res = app
            .client
            .get(app.url("/"))
            .header("x-request-id", bad.as_str())
            .send()
            .await
            .unwrap();
        let id = res.headers()["x-request-id"].to_str().unwrap().to_owned();
        assert_ne!(id, bad);
        assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id}");
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["requestId"], id);
    }
    // Errors carry it too.
    let res = app.get("/nowhere", &As::Nobody).await;
    assert!(res.headers().contains_key("x-request-id"));
}

fn series<'a>(metrics: &'a str, prefix: &str) -> Vec<&'a str> {
    metrics.lines().filter(|l| l.starts_with(prefix)).collect()
}

async fn unknown_paths_share_one_metric_label(db: Db) {
    let app = spawn_app(db).await;
    for i in 0..50 {
        let res = app
            .get(
                &format!("/unknown/{i}/{}", uuid::Uuid::new_v4()),
                &As::Nobody,
            )
            .await;
        assert_eq!(res.status(), 404);
    }
    let text = app.get("/metrics", &As::Nobody).await.text().await.unwrap();
    let routes: std::collections::HashSet<&str> = series(&text, "http_requests_total{")
        .into_iter()
        .filter_map(|l| l.split("route=\"").nth(1)?.split('"').next())
        .collect();
    assert!(routes.contains("unmatched"), "{routes:?}");
    assert!(routes.iter().all(|r| !r.contains("unknown")), "{routes:?}");
    let unmatched = series(&text, "http_requests_total{")
        .into_iter()
        .find(|l| l.contains("route=\"unmatched\"") && l.contains("status_code=\"404\""))
        .expect("unmatched series");
    assert!(unmatched.ends_with(" 50"), "{unmatched}");
}

async fn metrics_have_the_spec_families_labels_and_buckets(db: Db) {
    let app = spawn_app(db).await;
    app.get("/health", &As::Nobody).await;
    app.chat(&As::alice(), "count me", None).await;
    let res = app.get("/metrics", &As::Nobody).await;
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = res.text().await.unwrap();
    assert!(text.contains("# TYPE http_requests_total counter"));
    assert!(text.contains("# TYPE http_request_duration_ms histogram"));
    let open = app
        .client
        .get(app.url("/metrics"))
        .header("accept", "application/openmetrics-text; version=1.0.0")
        .send()
        .await
        .unwrap();
    assert!(
        open.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    assert!(open.text().await.unwrap().trim_end().ends_with("# EOF"));
    let health = series(&text, "http_requests_total{")
        .into_iter()
        .find(|l| l.contains("route=\"/health\""))
        .expect("health counter");
    assert!(health.contains("method=\"GET\"") && health.contains("status_code=\"200\""));
    for le in [
        "5.0", "10.0", "25.0", "50.0", "100.0", "250.0", "500.0", "1000.0", "2500.0", "5000.0",
        "+Inf",
    ] {
        assert!(
            text.contains(&format!("http_request_duration_ms_bucket{{le=\"{le}\",method=\"GET\",route=\"/health\",status_code=\"200\"}}"))
                || text.lines().any(|l| l.starts_with("http_request_duration_ms_bucket{") && l.contains("route=\"/health\"") && l.contains(&format!("le=\"{le}\""))),
            "bucket {le} missing"
        );
    }
    assert!(text.contains("# TYPE http_requests_in_progress gauge"));
    assert!(
        text.lines().any(
            |l| l.starts_with("http_requests_in_progress{") && l.contains("route=\"/metrics\"")
        )
    );
    assert!(
        text.contains("http_requests_total{method=\"POST\",route=\"/chat\",status_code=\"200\"}")
    );
    for family in [
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "sse_active_streams",
        "ratelimit_decisions_total",
    ] {
        assert!(text.contains(family), "{family} missing");
    }
    // No tenant ids in labels.
    assert!(!text.contains(ACME) && !text.contains(ALICE));
}

async fn framework_errors_are_json(db: Db) {
    let app = spawn_app(db).await;
    let msg = assert_error(
        app.get("/no/such/route", &As::Nobody).await,
        404,
        "Not Found",
    )
    .await;
    assert!(msg.contains("/no/such/route"));
    let res = app
        .request(reqwest::Method::PUT, "/chat", &As::alice())
        .send()
        .await
        .unwrap();
    assert_error(res, 405, "Method Not Allowed").await;
    let res = app
        .request(reqwest::Method::DELETE, "/health", &As::Nobody)
        .send()
        .await
        .unwrap();
    assert_error(res, 405, "Method Not Allowed").await;
    let res = app
        .request(reqwest::Method::POST, "/chat", &As::alice())
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_error(res, 400, "Bad Request").await;
}

async fn cors_preflight_allows_the_spec_headers(db: Db) {
    let app = spawn_app(db).await;
    let res = app
        .client
        .request(reqwest::Method::OPTIONS, app.url("/chat/stream"))
        .header("origin", "http://example.test")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "content-type,authorization,x-org-id,x-user-id,x-request-id,idempotency-key",
        )
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    assert_eq!(res.headers()["access-control-allow-origin"], "*");
    let allowed = res.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    for h in [
        "content-type",
        "authorization",
        "x-org-id",
        "x-user-id",
        "x-request-id",
        "idempotency-key",
    ] {
        assert!(allowed.contains(h), "{h} not in {allowed}");
    }
    let res = app
        .client
        .get(app.url("/health"))
        .header("origin", "http://example.test")
        .send()
        .await
        .unwrap();
    let exposed = res.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    for h in [
        "x-request-id",
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
        "retry-after",
        "x-chat-id",
        "x-message-id",
    ] {
        assert!(exposed.contains(h), "{h} not in {exposed}");
    }
}

async fn demo_seed_is_idempotent(db: Db) {
    let app = spawn_app(db).await;
    let created = confab_server::seed::seed_demo(app.state.store.as_ref())
        .await
        .unwrap();
    assert_eq!(created, 0);
    let orgs = app.state.store.list_orgs().await.unwrap();
    let slugs: Vec<&str> = orgs.iter().map(|o| o.slug.as_str()).collect();
    assert_eq!(slugs.len(), 2);
    assert!(slugs.contains(&"acme-corp") && slugs.contains(&"tech-startup"));
}

async fn a_request_abandoned_by_its_client_is_still_counted_and_logged(db: Db) {
    use confab_core::model::{IdempotencyClaim, NewTurn, TurnChat};
    use confab_core::{ChatId, MessageId};
    let app = spawn_app(db).await;
    // A claim that is "in progress": a retry of it waits (up to 10 s).
    let message = "slow one";
    let claim_hash = {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(b"");
        h.update([0]);
        h.update(message);
        hex::encode(h.finalize())
    };
    app.state
        .store
        .begin_turn(&NewTurn {
            org: ACME.parse().unwrap(),
            user: ALICE.parse().unwrap(),
            chat: TurnChat::New {
                id: ChatId::new(),
                title: "t".into(),
            },
            user_message_id: MessageId::new(),
            content: message.into(),
            assistant_message_id: MessageId::new(),
            idempotency: Some(IdempotencyClaim {
                key: "busy".into(),
                request_hash: claim_hash,
            }),
            model: "simulated".into(),
            system: None,
        })
        .await
        .unwrap();
    let res = app
        .request(reqwest::Method::POST, "/chat", &As::alice())
        .header("idempotency-key", "busy")
        .json(&serde_json::json!({ "message": message }))
        .timeout(std::time::Duration::from_millis(300))
        .send()
        .await;
    assert!(res.is_err(), "the client gave up");
    let started = std::time::Instant::now();
    loop {
        let text = app.get("/metrics", &As::Nobody).await.text().await.unwrap();
        let gauge = series(
            &text,
            "http_requests_in_progress{method=\"POST\",route=\"/chat\"}",
        );
        let abandoned = text
            .contains("http_requests_total{method=\"POST\",route=\"/chat\",status_code=\"499\"} 1");
        if abandoned && gauge.iter().all(|l| l.ends_with(" 0")) {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "gauge {gauge:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
