//! The store under real faults: a full disk (ENOSPC from a size-limited
//! tmpfs, not a simulation) must give clean 5xx answers and a degraded
//! `/health` while it lasts, and leave the store usable once space is back,
//! without a restart.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{As, TestDb, spawn_on};

/// A tmpfs of a few MB mounted for one test, unmounted when dropped.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir =
            std::env::temp_dir().join(format!("confab_tmpfs_{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mounting a tmpfs needs root (CAP_SYS_ADMIN); this test must not be skipped"
        );
        Tmpfs { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Write zeros to `path` until the file system refuses (ENOSPC).
fn fill(path: &Path) {
    let mut file = std::fs::File::create(path).expect("create filler");
    let chunk = vec![0u8; 64 * 1024];
    loop {
        if let Err(err) = file.write_all(&chunk).and_then(|_| file.sync_all()) {
            assert_eq!(err.raw_os_error(), Some(28), "expected ENOSPC, got {err}");
            break;
        }
    }
    // Whatever a partial chunk left free, take it too.
    loop {
        if file
            .write_all(&[0u8; 512])
            .and_then(|_| file.sync_all())
            .is_err()
        {
            break;
        }
    }
}

async fn post_chat(app: &crate::support::TestApp, message: &str) -> (u16, Value) {
    let res = app
        .post_json("/chat", &As::alice(), &json!({ "message": message }))
        .await;
    let status = res.status().as_u16();
    let ct = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body: Value = res.json().await.unwrap_or(Value::Null);
    if status >= 500 {
        assert!(ct.starts_with("application/json"), "5xx content-type {ct}");
    }
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_cleanly_reports_degraded_and_recovers_without_restart() {
    crate::support::init();
    let fs = Tmpfs::mount("3m");
    let app = spawn_on(TestDb::sqlite_at(&fs.path("confab.db")), &[]).await;
    let (status, _) = post_chat(&app, "before the disk fills").await;
    assert_eq!(status, 200);

    fill(&fs.path("filler"));
    let long = "x".repeat(9_000);
    let mut failure = None;
    for _ in 0..300 {
        let (status, body) = post_chat(&app, &long).await;
        if status >= 500 {
            failure = Some((status, body));
            break;
        }
        assert_eq!(status, 200, "{body}");
    }
    let (status, body) = failure.expect("writes on a full disk never failed");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "Service Unavailable", "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );

    // While the disk is full, /health says so.
    let (status, health) = app.get_json("/health", &As::Nobody).await;
    assert_eq!(status, 503, "{health}");
    assert_eq!(health["status"], "degraded", "{health}");
    assert_eq!(health["services"]["database"], "disconnected", "{health}");

    std::fs::remove_file(fs.path("filler")).expect("remove filler");

    // Space is back: writes work again, without a restart.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = (0, Value::Null);
    while Instant::now() < deadline {
        last = post_chat(&app, "after the disk was freed").await;
        if last.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        last.0, 200,
        "writes still fail after space was freed: {}",
        last.1
    );
    for _ in 0..5 {
        let (status, body) = post_chat(&app, "and keep working").await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, health) = app.get_json("/health", &As::Nobody).await;
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["status"], "ok", "{health}");
    drop(app);
}

/// A turn whose final write meets a database that cannot write (a full
/// disk here; a failover is the same to the turn) keeps its reply and its
/// usage and writes them once the database can write again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_write_that_meets_a_full_disk_is_written_once_space_is_back() {
    crate::support::init();
    let fs = Tmpfs::mount("3m");
    let app = spawn_on(
        TestDb::sqlite_at(&fs.path("confab.db")),
        &[
            ("SIMULATED_MIN_WORDS", "2000"),
            ("SIMULATED_TOKEN_DELAY_MS", "1"),
        ],
    )
    .await;
    // A stream begins; the disk fills while it runs, so its final write
    // (≈ 12 KB of text) finds no room.
    let mut deferred = None;
    for attempt in 0..5 {
        let res = app
            .post_json(
                "/chat/stream",
                &As::alice(),
                &json!({ "message": format!("A long story, please ({attempt})") }),
            )
            .await;
        assert_eq!(res.status(), 200);
        let chat = res.headers()["x-chat-id"].to_str().unwrap().to_owned();
        let message = res.headers()["x-message-id"].to_str().unwrap().to_owned();
        let mut reader = crate::support::sse::SseReader::new(res);
        let (_, first) = reader.next_event().await.expect("a first token");
        fill(&fs.path("filler"));
        let mut events = vec![(1, first)];
        events.extend(reader.rest().await);
        let (_, last) = events.last().expect("a final event").clone();
        if last["done"] == true {
            // It found room after all: free the disk and try again.
            std::fs::remove_file(fs.path("filler")).expect("remove filler");
            continue;
        }
        assert_eq!(
            last["message"],
            "The database is unavailable; the reply is kept and saved once it is back",
            "{last}"
        );
        let text: String = events
            .iter()
            .filter_map(|(_, e)| e["token"].as_str())
            .collect();
        deferred = Some((chat, message, text));
        break;
    }
    let (chat, message, text) = deferred.expect("no final write ever met the full disk");

    std::fs::remove_file(fs.path("filler")).expect("remove filler");
    // Written once there is room again: the whole reply, complete, with
    // the model's usage.
    let reply =
        crate::resume::wait_status(&app.client, &app.base, &chat, &message, "complete").await;
    assert_eq!(reply["content"].as_str(), Some(text.as_str()));
    assert_eq!(reply["usage"]["source"], "provider", "{reply}");
    let metrics = app.get("/metrics", &As::Nobody).await.text().await.unwrap();
    assert!(
        metrics.contains("turn_final_writes_deferred_total{outcome=\"saved\"} 1"),
        "{metrics}"
    );
    drop(app);
}
