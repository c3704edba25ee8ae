//! The contract (SPEC §15): `GET /openapi.json` is a valid OpenAPI 3.1
//! document (checked with `openapi-spec-validator`), and the running server
//! conforms to it — Schemathesis, every check on, against the real binary
//! on each store (SQLite alone; PostgreSQL with Redis): no 5xx, no response
//! the document does not allow. Both tools are pinned in the peers venv by
//! `scripts/services.sh`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::per_store;
use crate::support::peers::peers_dir;
use crate::support::process::Confab;
use crate::support::{Db, TestDb, redis_url};

/// Test cases per operation and phase; keeps a run near a minute.
const MAX_EXAMPLES: &str = "10";
/// Fixed, so a failure reproduces (the report prints it too).
const SEED: &str = "20261202";

fn venv_bin(name: &str) -> PathBuf {
    let path = peers_dir().join("venv/bin").join(name);
    assert!(
        path.is_file(),
        "{} is missing: run scripts/services.sh",
        path.display()
    );
    path
}

/// The binary as deployed at `info` (Redis beside PostgreSQL), with limits
/// that never refuse.
pub(crate) async fn start(db: &TestDb) -> Confab {
    let mut env = vec![
        ("DATABASE_URL", db.url.clone()),
        ("SIMULATED_TOKEN_DELAY_MS", "0".to_owned()),
        // Thousands of requests in a minute from one address, many with
        // bad credentials on purpose: limits are tested elsewhere.
        ("RATE_LIMIT_BURST", "1000000".to_owned()),
        ("RATE_LIMIT_PER_SECOND", "100000".to_owned()),
        ("AUTH_FAILURE_BURST", "1000000".to_owned()),
        ("AUTH_FAILURE_PER_SECOND", "100000".to_owned()),
        ("LOG_LEVEL", "info".to_owned()),
    ];
    if db.kind == Db::Postgres {
        env.push(("REDIS_URL", redis_url()));
    }
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Confab::start(&env).await
}

/// 5xx answers the server logged (the request log line has the status).
fn server_errors(app: &Confab) -> Vec<String> {
    app.log_lines()
        .into_iter()
        .filter(|l| l["status"].as_u64().is_some_and(|s| s >= 500) || l["level"] == "ERROR")
        .map(|l| l.to_string())
        .collect()
}

async fn openapi_document_validates_as_openapi_3_1(db: Db) {
    let db = TestDb::new(db).await;
    let app = start(&db).await;
    let response = reqwest::get(app.url("/openapi.json")).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let doc: serde_json::Value = response.json().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    for path in ["/chat/stream", "/v1/chat/completions", "/openapi.json"] {
        assert!(doc["paths"][path].is_object(), "{path} is not documented");
    }
    let dir = tempdir();
    let file = dir.join("openapi.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
    let out = tokio::process::Command::new(venv_bin("openapi-spec-validator"))
        .arg(&file)
        .output()
        .await
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "openapi-spec-validator: {text}");
    assert!(text.contains("OK"), "{text}");

    // A document that is not OpenAPI 3.1 fails the same validator (the
    // check above can fail).
    let mut broken = doc.clone();
    broken["paths"]["/chat"]["post"]["responses"] = serde_json::json!("none");
    std::fs::write(&file, serde_json::to_vec(&broken).unwrap()).unwrap();
    let out = tokio::process::Command::new(venv_bin("openapi-spec-validator"))
        .arg(&file)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success(), "a broken document validated");
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("confab-contract-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn schemathesis_finds_no_failure(db: Db) {
    let kind = db;
    let db = TestDb::new(db).await;
    let app = start(&db).await;
    let dir = tempdir();
    let config = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/contract/schemathesis.toml"
    );
    let started = Instant::now();
    let run = tokio::process::Command::new(venv_bin("schemathesis"))
        .arg("--config-file")
        .arg(config)
        .arg("run")
        .arg(app.url("/openapi.json"))
        .args(["--max-examples", MAX_EXAMPLES, "--seed", SEED])
        // One worker: two share caches that race in this version.
        .args(["--request-timeout", "10", "--workers", "1", "--no-color"])
        .current_dir(&dir)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(240), run)
        .await
        .expect("schemathesis did not finish within 240 s")
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let summary: String = text
        .lines()
        .skip_while(|l| !l.contains("SUMMARY"))
        .collect::<Vec<_>>()
        .join("\n");
    // What ran, in the test's output (cargo shows it with --nocapture).
    eprintln!(
        "schemathesis on {kind:?} in {:.0} s:\n{summary}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        out.status.success(),
        "schemathesis found failures on {kind:?}:\n{text}"
    );
    assert!(
        !summary.contains("failure") && !summary.contains(" error"),
        "{text}"
    );
    let errors = server_errors(&app);
    assert!(errors.is_empty(), "the server logged errors: {errors:#?}");
    let _ = std::fs::remove_dir_all(&dir);
}

per_store!(
    openapi_document_validates_as_openapi_3_1,
    schemathesis_finds_no_failure
);
