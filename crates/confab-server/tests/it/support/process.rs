//! The real `confab` binary as a child process, for what only a process can
//! show: start-up output, logs on stdout, signals and exit codes, crashes.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const BIN: &str = env!("CARGO_BIN_EXE_confab");

pub struct Confab {
    pub child: Child,
    pub base: String,
    /// Every stdout line so far (JSON logs).
    pub logs: Arc<Mutex<Vec<String>>>,
    pub stderr: Arc<Mutex<Vec<String>>>,
}

/// A command for the binary with a clean, explicit environment.
pub fn command(env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOST", "127.0.0.1")
        .env("PORT", "0")
        .env("LOG_FORMAT", "json")
        // See TEST_DEFAULTS in app.rs: tests that want a short wait set it.
        .env("DB_ACQUIRE_TIMEOUT_MS", "10000")
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

impl Confab {
    /// Start `confab serve` and wait until it says where it listens.
    pub async fn start(env: &[(&str, &str)]) -> Confab {
        let mut child = command(env)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn confab");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let err_tx = tx.clone();
        let mut out = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let sink = logs.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = out.next_line().await {
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && v["message"] == "confab listening"
                    && let Some(url) = v["url"].as_str()
                {
                    let _ = tx.send(url.to_owned());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let mut err = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let err_sink = stderr.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = err.next_line().await {
                // The human banner says it too, whatever LOG_LEVEL is.
                if let Some(url) = line.strip_prefix("confab is listening on ") {
                    let _ = err_tx.send(url.trim().to_owned());
                }
                err_sink.lock().unwrap().push(line);
            }
        });
        let base = match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
            Ok(Some(url)) => url.replace("localhost", "127.0.0.1"),
            _ => panic!(
                "confab did not start; stderr: {:?}; stdout: {:?}",
                stderr.lock().unwrap(),
                logs.lock().unwrap()
            ),
        };
        Confab {
            child,
            base,
            logs,
            stderr,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    pub fn signal(&self, sig: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Wait for exit; the exit code (None when killed by a signal).
    pub async fn wait(&mut self, limit: Duration) -> Option<i32> {
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(Ok(status)) => status.code(),
            _ => panic!("confab did not exit within {limit:?}"),
        }
    }

    pub fn log_lines(&self) -> Vec<Value> {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
            .collect()
    }
}

/// A private `redis-server` on a free port, which a test may stop and restart
/// without disturbing the shared Redis other tests use.
pub struct PrivateRedis {
    pub port: u16,
    child: Option<std::process::Child>,
}

impl PrivateRedis {
    pub fn start() -> PrivateRedis {
        let port = free_port();
        let mut redis = PrivateRedis { port, child: None };
        redis.restart();
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn restart(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed for the tests");
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("private redis-server did not start on {}", self.port);
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A loopback port that is free now and that no other test in this process
/// was given. The kernel may hand a released port out again at once, and a
/// peer takes a second or more to bind the port it was given: two tests
/// handed one port both saw "ready" from the one peer that bound it and
/// shared its journal (CI, `llm::sqlite::*`). Other processes can still take
/// the port first; callers retry on "address already in use".
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if handed_out.insert(port) {
            return port;
        }
    }
}

/// A fresh PostgreSQL database with the demo tenants, seeded by the CLI.
pub async fn seeded_postgres() -> super::TestDb {
    let db = super::TestDb::new(super::Db::Postgres).await;
    let seeded = command(&[("DATABASE_URL", &db.url)])
        .arg("seed-demo")
        .output()
        .await
        .expect("run confab seed-demo");
    assert!(
        seeded.status.success(),
        "{}",
        String::from_utf8_lossy(&seeded.stderr)
    );
    db
}
