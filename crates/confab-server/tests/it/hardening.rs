//! Issue #14 hardening, seen from outside: bounded log lines, credentials
//! never printed, generic 5xx bodies.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::process::Confab;
use crate::support::{Db, TestDb};

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
