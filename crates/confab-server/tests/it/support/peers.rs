//! Real third-party LLM API servers as child processes, so that provider code
//! and end-to-end tests meet the bytes real APIs send rather than our own
//! idea of them:
//!
//! - [`Llmock`]: llmock 0.2.2, an OpenAI (`/v1`) and Anthropic
//!   (`/anthropic/v1`) look-alike with scripted faults (`/_llmock/scenario`)
//!   and a journal of every request it served (`/_llmock/requests`).
//! - [`Litellm`]: the LiteLLM proxy 1.108.7 in front of an llmock, offering
//!   `/v1/chat/completions` and Anthropic's `/v1/messages`.
//!
//! `scripts/services.sh` installs both into a venv outside the clone. The
//! binaries are looked up in `$CONFAB_TEST_PEERS_DIR/venv/bin`, else
//! `$CONFAB_PEERS_DIR/venv/bin`, else `~/.cache/confab-peers/venv/bin`; a
//! missing one fails the test (never a skip). Each server runs on a free
//! loopback port, logs to a file in its own temporary directory, and is killed
//! when its value is dropped (no runtime needed for that).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Value, json};

use super::process::free_port;

/// Where `scripts/services.sh` put the venv holding `llmock` and `litellm`.
pub fn peers_dir() -> PathBuf {
    if let Some(dir) = ["CONFAB_TEST_PEERS_DIR", "CONFAB_PEERS_DIR"]
        .iter()
        .find_map(|k| std::env::var_os(k).filter(|v| !v.is_empty()))
    {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").expect("HOME is not set");
    Path::new(&home).join(".cache/confab-peers")
}

/// The path of an installed peer binary; panics when it is missing.
pub fn peer_bin(name: &str) -> PathBuf {
    let path = peers_dir().join("venv/bin").join(name);
    assert!(
        path.is_file(),
        "`{name}` is not installed at {}: run scripts/services.sh \
         (or point CONFAB_TEST_PEERS_DIR at the directory holding venv/)",
        path.display()
    );
    path
}

/// A child process with its own temporary directory (config, log), killed,
/// reaped and cleaned up on drop.
struct Peer {
    name: &'static str,
    child: Child,
    dir: PathBuf,
}

impl Peer {
    fn dir_for(name: &str, port: u16) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("confab-peer-{name}-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create peer temp dir");
        dir
    }

    /// Spawn `cmd` (environment already set) with stdout and stderr in `dir/log`.
    fn spawn(name: &'static str, mut cmd: Command, dir: PathBuf) -> Peer {
        let log = File::create(dir.join("log")).expect("create peer log");
        let child = cmd
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {name} ({e}): run scripts/services.sh"));
        Peer { name, child, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    /// Poll `url` until it answers 2xx; panic (with the log) when `limit`
    /// passes. `Err(log)` when the process exited first.
    async fn wait_ready(
        &mut self,
        url: &str,
        auth: Option<&str>,
        limit: Duration,
    ) -> Result<(), String> {
        let http = reqwest::Client::new();
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "{} exited ({status}) before it was ready:\n{}",
                    self.name,
                    self.log()
                ));
            }
            let mut req = http.get(url).timeout(Duration::from_secs(2));
            if let Some(key) = auth {
                req = req.bearer_auth(key);
            }
            if let Ok(res) = req.send().await
                && res.status().is_success()
            {
                return Ok(());
            }
            assert!(
                started.elapsed() < limit,
                "{} not ready at {url} within {limit:?}:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Start a peer on a free port, again on another port when the one picked
/// was taken before the peer bound it (`free_port` can only pick a port
/// that is free now); panic when it exits for any other reason.
async fn start_on_free_port<F, Fut>(start: F) -> (Peer, u16)
where
    F: Fn(u16) -> Fut,
    Fut: std::future::Future<Output = (Peer, Result<(), String>)>,
{
    for _ in 0..3 {
        let port = free_port();
        match start(port).await {
            (peer, Ok(())) => return (peer, port),
            (_, Err(log)) if log.contains("address already in use") => continue,
            (_, Err(log)) => panic!("{log}"),
        }
    }
    panic!("no free port for a peer after 3 attempts");
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A clean environment for a peer: PATH with the venv first, HOME, and every
/// proxy variable pointed at a closed loopback port, so that any call a peer
/// tries to make off this machine fails at once (loopback stays direct).
fn peer_command(bin: &Path) -> Command {
    let mut cmd = Command::new(bin);
    let venv_bin = bin.parent().expect("venv/bin").display().to_string();
    let path = std::env::var("PATH").unwrap_or_default();
    cmd.env_clear()
        .env("PATH", format!("{venv_bin}:{path}"))
        .env(
            "HOME",
            std::env::var("HOME").unwrap_or_else(|_| "/tmp".into()),
        )
        .env("LANG", "C.UTF-8")
        .env("PYTHONUNBUFFERED", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1");
    for k in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
    ] {
        cmd.env(k, "http://127.0.0.1:9");
    }
    for k in ["NO_PROXY", "no_proxy"] {
        cmd.env(k, "127.0.0.1,localhost,::1");
    }
    cmd
}

#[derive(Clone, Debug, Default)]
pub struct LlmockOpts {
    /// Reply "Hello! You said: " + the first 120 characters of every message's
    /// content joined by spaces (OpenAI includes the system message, Anthropic
    /// not). Otherwise the reply is always "Mock response from {model}.".
    pub echo: bool,
    /// Pause between streamed chunks (not before the first).
    pub chunk_delay_ms: u64,
}

/// A running `llmock serve`.
pub struct Llmock {
    peer: Peer,
    port: u16,
    http: reqwest::Client,
}

/// One `/_llmock/requests` entry. An entry appears only once the request has
/// ended (finished, failed, or the client went away).
#[derive(Clone, Debug, Deserialize)]
pub struct LlmockRequest {
    /// 1, 2, … in arrival order, restarting after `reset` / `clear_requests`.
    pub seq: u64,
    /// "openai" or "anthropic" (from the path).
    pub provider: String,
    pub method: String,
    /// e.g. "/v1/chat/completions", "/anthropic/v1/messages".
    pub path: String,
    pub model: Option<String>,
    pub stream: bool,
    pub status: u16,
    /// false when the client went away mid-stream, or on a `disconnect` or
    /// `truncate` stream fault; true on `malformed` and on finished `stall`s.
    pub completed: bool,
    /// SSE events written before the end (a non-streaming reply counts 1).
    pub chunks_sent: u64,
    /// e.g. "scenario:429", "stream:truncate@3"; None when nothing was injected.
    pub fault: Option<String>,
    pub retry_after: Option<f64>,
    pub stall_waited: Option<f64>,
    /// Seconds from arrival to the end.
    pub duration: f64,
    /// The request JSON as sent.
    pub body: Value,
}

/// A client for the peers' own endpoints (llmock's control API, its chat
/// endpoints called directly). The peers are uvicorn servers, which close a
/// connection idle for 5 s (`timeout_keep_alive`); a request sent on a pooled
/// connection just as uvicorn closes it fails with `IncompleteMessage` (seen
/// in CI: `ledger_exact`, a scenario call after a pause). This client drops
/// its idle connections after 2 s, well before uvicorn does.
pub fn peer_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_idle_timeout(Duration::from_secs(2))
        .build()
        .expect("reqwest client")
}

impl Llmock {
    pub async fn start(opts: LlmockOpts) -> Llmock {
        let bin = peer_bin("llmock");
        let (peer, port) = start_on_free_port(|port| {
            let dir = Peer::dir_for("llmock", port);
            let mut cmd = peer_command(&bin);
            cmd.args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["--stream-chunk-delay-ms", &opts.chunk_delay_ms.to_string()])
                .args([
                    "--response-style",
                    if opts.echo { "echo" } else { "static" },
                ])
                .args(["--log-level", "warning"]);
            let mut peer = Peer::spawn("llmock", cmd, dir);
            async move {
                let health = format!("http://127.0.0.1:{port}/health");
                let ready = peer
                    .wait_ready(&health, None, Duration::from_secs(60))
                    .await;
                (peer, ready)
            }
        })
        .await;
        Llmock {
            peer,
            port,
            http: peer_client(),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// OpenAI base URL (`…/v1`): append `/chat/completions`.
    pub fn openai_base_url(&self) -> String {
        format!("{}/v1", self.base_url())
    }

    /// Anthropic base URL (`…/anthropic`): append `/v1/messages`.
    pub fn anthropic_base_url(&self) -> String {
        format!("{}/anthropic", self.base_url())
    }

    /// The server's output so far.
    pub fn log(&self) -> String {
        self.peer.log()
    }

    fn control(&self, path: &str) -> String {
        format!("{}/_llmock/{path}", self.base_url())
    }

    async fn call(&self, req: reqwest::RequestBuilder, what: &str) -> Value {
        let res = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("llmock {what}: {e}"));
        let status = res.status();
        let text = res.text().await.unwrap_or_default();
        assert!(status.is_success(), "llmock {what}: {status} {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("llmock {what}: {e}: {text}"))
    }

    /// Queue behaviours: one behaviour object, an array of them, or a whole
    /// `{"behaviors": [...]}`. E.g. `json!({"type": "fail", "status": 429,
    /// "retry_after": 1})`, `json!({"type": "stream_fault", "kind":
    /// "truncate", "after_chunks": 3, "match": {"provider": "anthropic"}})`.
    /// Each applies to `times` (default 1) matching requests; `"times": null`
    /// keeps it until cleared.
    pub async fn scenario(&self, behaviors: Value) {
        let payload = match behaviors {
            Value::Array(_) => json!({ "behaviors": behaviors }),
            Value::Object(ref o) if o.contains_key("behaviors") => behaviors,
            other => json!({ "behaviors": [other] }),
        };
        let req = self.http.post(self.control("scenario")).json(&payload);
        self.call(req, "POST /_llmock/scenario").await;
    }

    /// Drop the behaviours still queued.
    pub async fn clear_scenario(&self) {
        let req = self.http.delete(self.control("scenario"));
        self.call(req, "DELETE /_llmock/scenario").await;
    }

    /// Behaviours still queued (as `GET /_llmock/scenario` lists them).
    pub async fn pending_scenario(&self) -> Vec<Value> {
        let req = self.http.get(self.control("scenario"));
        let v = self.call(req, "GET /_llmock/scenario").await;
        v["pending"].as_array().cloned().unwrap_or_default()
    }

    /// Forget the journal; a request still in flight is not recorded later.
    pub async fn clear_requests(&self) {
        let req = self.http.delete(self.control("requests"));
        self.call(req, "DELETE /_llmock/requests").await;
    }

    /// Forget the journal and the queued behaviours.
    pub async fn reset(&self) {
        let req = self.http.post(self.control("reset"));
        self.call(req, "POST /_llmock/reset").await;
    }

    /// The raw journal, oldest first. llmock holds this answer up to 2 s
    /// while requests are in flight; those still running are left out.
    pub async fn requests(&self) -> Vec<Value> {
        let req = self.http.get(self.control("requests"));
        let v = self.call(req, "GET /_llmock/requests").await;
        v["requests"].as_array().cloned().unwrap_or_default()
    }

    /// The journal, typed.
    pub async fn journal(&self) -> Vec<LlmockRequest> {
        self.requests()
            .await
            .into_iter()
            .map(|r| {
                serde_json::from_value(r.clone())
                    .unwrap_or_else(|e| panic!("unexpected llmock journal entry ({e}): {r}"))
            })
            .collect()
    }

    /// Poll the journal until an entry satisfies `pred`; panic after `within`.
    pub async fn wait_for_request(
        &self,
        within: Duration,
        pred: impl Fn(&LlmockRequest) -> bool,
    ) -> LlmockRequest {
        let started = Instant::now();
        loop {
            let journal = self.journal().await;
            if let Some(r) = journal.iter().find(|r| pred(r)) {
                return r.clone();
            }
            assert!(
                started.elapsed() < within,
                "no llmock request matched within {within:?}; journal: {journal:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The first request the client abandoned (`completed: false`). After a
    /// client drops a stream, it shows up within a few tens of milliseconds.
    pub async fn wait_for_request_completed_false(&self, within: Duration) -> LlmockRequest {
        self.wait_for_request(within, |r| !r.completed).await
    }
}

#[derive(Clone, Debug, Default)]
pub struct LitellmOpts {
    /// An OpenAI-compatible base URL ending in `/v1`, e.g.
    /// `llmock.openai_base_url()`.
    pub openai_upstream: String,
    /// LiteLLM's own retries of a failed upstream call (its default is 2,
    /// honouring `retry-after`); 0 passes every upstream failure through.
    pub num_retries: u32,
    /// The key LiteLLM sends upstream (a confab API key when confab is the
    /// upstream); a dummy by default.
    pub upstream_api_key: Option<String>,
}

/// A running LiteLLM proxy (no database) whose models all go to one
/// OpenAI-compatible upstream. While starting, LiteLLM sends the upstream two
/// `GET /v1/models`: they land in llmock's journal and would consume a
/// queued behaviour that matches any request, so queue scenarios (or
/// `clear_requests`) after `Litellm::start`.
pub struct Litellm {
    peer: Peer,
    port: u16,
}

impl Litellm {
    pub const MASTER_KEY: &'static str = "sk-confab-litellm-master";
    /// Served as `openai/gpt-4o-mini` (upstream sees model "gpt-4o-mini"):
    /// for `/v1/chat/completions`. (On `/v1/messages` LiteLLM would call the
    /// upstream's `/v1/responses` for it.)
    pub const OPENAI_MODEL: &'static str = "llmock-openai";
    /// Served as `hosted_vllm/llmock-vllm` (upstream sees "llmock-vllm" on
    /// `/v1/chat/completions`): the model for Anthropic's `/v1/messages`,
    /// where it streams real Anthropic events. Also works on the OpenAI route.
    pub const ANTHROPIC_MODEL: &'static str = "llmock-vllm";

    pub async fn start(opts: LitellmOpts) -> Litellm {
        assert!(
            opts.openai_upstream.starts_with("http://127.0.0.1:"),
            "LitellmOpts.openai_upstream must be a loopback base URL, got {:?}",
            opts.openai_upstream
        );
        let bin = peer_bin("litellm");
        let upstream = opts.openai_upstream.trim_end_matches('/');
        let upstream_key = opts
            .upstream_api_key
            .as_deref()
            .unwrap_or("sk-upstream-unused");
        let config = format!(
            "model_list:
  - model_name: {openai_model}
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: {upstream}
      api_key: {upstream_key}
  - model_name: {anthropic_model}
    litellm_params:
      model: hosted_vllm/llmock-vllm
      api_base: {upstream}
      api_key: {upstream_key}
litellm_settings:
  num_retries: {retries}
general_settings:
  master_key: {key}
",
            openai_model = Self::OPENAI_MODEL,
            anthropic_model = Self::ANTHROPIC_MODEL,
            retries = opts.num_retries,
            key = Self::MASTER_KEY,
        );
        let (peer, port) = start_on_free_port(|port| {
            let dir = Peer::dir_for("litellm", port);
            std::fs::write(dir.join("config.yaml"), &config).expect("write litellm config");
            let mut cmd = peer_command(&bin);
            cmd.args(["--config", "config.yaml", "--host", "127.0.0.1"])
                .args(["--port", &port.to_string()]);
            // Keep every lookup LiteLLM would make on the internet local.
            for k in [
                "LITELLM_LOCAL_MODEL_COST_MAP",
                "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS",
                "LITELLM_LOCAL_BLOG_POSTS",
                "LITELLM_LOCAL_POLICY_TEMPLATES",
                "LITELLM_LOCAL_AUTOROUTER_PRESETS",
                "LITELLM_DONT_SHOW_FEEDBACK_BOX",
                "DISABLE_ADMIN_UI",
                "NO_DOCS",
            ] {
                cmd.env(k, "True");
            }
            let mut peer = Peer::spawn("litellm", cmd, dir);
            async move {
                // /v1/models answers once the config's models are loaded.
                // LiteLLM takes ≈ 15 s to start on an idle 2-core machine;
                // far more under load.
                let models = format!("http://127.0.0.1:{port}/v1/models");
                let ready = peer
                    .wait_ready(&models, Some(Self::MASTER_KEY), Duration::from_secs(240))
                    .await;
                (peer, ready)
            }
        })
        .await;
        Litellm { peer, port }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// OpenAI base URL (`…/v1`); needs `Authorization: Bearer {master_key}`.
    pub fn openai_base_url(&self) -> String {
        format!("{}/v1", self.base_url())
    }

    /// Anthropic base URL: append `/v1/messages`; takes the master key as
    /// `x-api-key` or as a Bearer token.
    pub fn anthropic_base_url(&self) -> String {
        self.base_url()
    }

    pub fn master_key(&self) -> &'static str {
        Self::MASTER_KEY
    }

    pub fn openai_model(&self) -> &'static str {
        Self::OPENAI_MODEL
    }

    pub fn anthropic_model(&self) -> &'static str {
        Self::ANTHROPIC_MODEL
    }

    /// The proxy's output so far.
    pub fn log(&self) -> String {
        self.peer.log()
    }
}
