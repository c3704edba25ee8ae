//! End to end in a real browser: the playground page (SPEC §9) driven through
//! Debian's Chromium and chromedriver (WebDriver, via fantoccini), checked
//! against what the API stored. Also runs the page's own JavaScript unit
//! tests (the SSE parser) with Node.
//!
//! Chromium, chromedriver and Node are required: when one is missing the test
//! fails and says to run `scripts/services.sh` (which installs them); it
//! never skips.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::key::Key;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use crate::per_store;
use crate::support::process::free_port;
use crate::support::{As, Db, TestApp, spawn_app_with, spawn_on};

per_store!(playground_chat_stream_stop_and_tenancy);

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// Longest any single wait in the browser may take.
const WAIT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(40);

const FIRST_MESSAGE: &str = "Hello from the browser test";
const SLOW_MESSAGE: &str = "Please write a long answer that I will stop";

// ------------------------------------------------------------------ driver

/// A chromedriver child process on a free port, with a fresh Chromium
/// profile directory. Dropping it kills chromedriver and everything it
/// started (its own process group) and removes the profile.
struct ChromeDriver {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl ChromeDriver {
    async fn start() -> ChromeDriver {
        for (path, what) in [(CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")] {
            assert!(
                Path::new(path).exists(),
                "{path} not found: the browser test needs Debian's `{what}` package. \
                 Run scripts/services.sh (it installs chromium and chromium-driver)."
            );
        }
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("confab-browser-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("create the browser's temp dir");
        let log = std::fs::File::create(dir.join("chromedriver.log")).expect("chromedriver log");
        let child = {
            use std::os::unix::process::CommandExt;
            Command::new(CHROMEDRIVER)
                .arg(format!("--port={port}"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log handle"))
                .stderr(log)
                // Its own process group, so that Drop can end the browser too.
                .process_group(0)
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("could not start {CHROMEDRIVER} ({e}); run scripts/services.sh")
                })
        };
        let mut driver = ChromeDriver { child, port, dir };
        driver.wait_ready().await;
        driver
    }

    /// Poll `GET /status` until chromedriver says it is ready.
    async fn wait_ready(&mut self) {
        // reqwest panics on `Client::new` without a rustls crypto provider.
        confab_llm::install_tls_provider();
        let http = reqwest::Client::new();
        let url = format!("{}/status", self.url());
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "chromedriver exited at start-up ({status}); log:\n{}",
                    self.log()
                );
            }
            if let Ok(res) = http.get(&url).send().await
                && let Ok(body) = res.json::<Value>().await
                && body["value"]["ready"] == true
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not answer on port {} within {WAIT:?}; log:\n{}",
                self.port,
                self.log()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("chromedriver.log")).unwrap_or_default()
    }

    /// A new headless Chromium session.
    async fn session(&self) -> Client {
        let profile = self.dir.join("profile");
        let args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            &format!("--user-data-dir={}", profile.display()),
            "--window-size=1280,900",
        ];
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert(
            "goog:chromeOptions".into(),
            json!({ "binary": CHROMIUM, "args": args }),
        );
        // Plain http to a local chromedriver: no TLS connector.
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&self.url())
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "could not start Chromium through chromedriver: {e}; log:\n{}",
                    self.log()
                )
            })
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        // The whole group: chromedriver and any browser it left behind.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `<repo>/out`, the ignored output folder.
fn out_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../out");
    std::fs::create_dir_all(&dir).expect("create out/");
    dir.canonicalize().expect("out/")
}

// ------------------------------------------------------------------ helpers

/// Poll `check` until it returns `Ok`, or fail after `WAIT` saying `what`
/// and what was seen last (the `Err` text).
async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        let last = match check().await {
            Ok(v) => return v,
            Err(seen) => seen,
        };
        assert!(
            Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for {what}; last seen: {last}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Run a script in the page and return its (JSON) result.
async fn js(browser: &Client, script: &str) -> Value {
    browser
        .execute(script, vec![])
        .await
        .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
}

/// The page's `assistant-reply` element, read in one go (it is re-rendered,
/// so element handles would go stale).
async fn assistant_reply(browser: &Client) -> Value {
    js(
        browser,
        r#"const e = document.querySelector('[data-testid="assistant-reply"]');
           if (!e) return null;
           const li = e.closest('[data-testid="message"]');
           const badge = li && li.querySelector('[data-testid="message-status"]');
           return { status: e.dataset.status || '', id: e.dataset.messageId || '',
                    text: e.textContent, badge: badge ? badge.textContent : '' };"#,
    )
    .await
}

/// Ids of the chats listed in `chat-list`, and whether the list is done
/// loading for the current user.
async fn listed_chats(browser: &Client) -> Value {
    js(
        browser,
        r#"const list = document.querySelector('[data-testid="chat-list"]');
           const empty = document.querySelector('[data-testid="chat-list-empty"]');
           return {
             ids: Array.from(list.querySelectorAll('[data-testid="chat-item"]'), (b) => b.dataset.chatId),
             current: (list.querySelector('[data-testid="chat-item"][aria-current="true"]') || {dataset: {}}).dataset.chatId || null,
             // The note keeps its "Loading…" text when hidden under a non-empty list.
             loading: list.hasAttribute('aria-busy') || (!empty.hidden && empty.textContent.startsWith('Loading')),
           };"#,
    )
    .await
}

fn ids_of(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

async fn click(browser: &Client, testid: &str) {
    browser
        .find(Locator::Css(&format!("[data-testid=\"{testid}\"]")))
        .await
        .unwrap_or_else(|e| panic!("{testid} not on the page: {e}"))
        .click()
        .await
        .unwrap_or_else(|e| panic!("could not click {testid}: {e}"));
}

/// Click a demo user and wait until the page acts as them with their chats loaded.
async fn pick_user(browser: &Client, user: &str, name: &str) {
    click(browser, &format!("user-{user}")).await;
    wait_for(&format!("the page to act as {name}"), || async {
        let v = js(
            browser,
            r#"const w = document.querySelector('[data-testid="whoami"]');
               return { state: w.dataset.state, text: w.textContent };"#,
        )
        .await;
        let list = listed_chats(browser).await;
        if v["state"] == "ok"
            && v["text"].as_str().unwrap_or("").contains(name)
            && list["loading"] == false
        {
            Ok(())
        } else {
            Err(format!("{v} {list}"))
        }
    })
    .await;
}

/// Type into the message box (and optionally press Enter in the same go).
async fn type_message(browser: &Client, text: &str) {
    browser
        .find(Locator::Css(r#"[data-testid="message-input"]"#))
        .await
        .expect("message-input")
        .send_keys(text)
        .await
        .expect("type the message");
}

/// `GET /chat/{id}` as `who`: the stored message with `message_id`.
async fn stored_message(app: &TestApp, who: &As, chat_id: &str, message_id: &str) -> Value {
    let (status, body) = app.get_json(&format!("/chat/{chat_id}"), who).await;
    assert_eq!(status, 200, "GET /chat/{chat_id}: {body}");
    body["messages"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["id"] == message_id))
        .cloned()
        .unwrap_or_else(|| panic!("message {message_id} not in chat {chat_id}: {body}"))
}

/// `GET /chats` as `who`: the ids listed (one page is plenty here).
async fn api_chat_ids(app: &TestApp, who: &As) -> Vec<String> {
    let (status, body) = app.get_json("/chats?limit=100", who).await;
    assert_eq!(status, 200, "GET /chats: {body}");
    body["chats"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .filter_map(|c| c["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

// -------------------------------------------------------------------- tests

async fn playground_chat_stream_stop_and_tenancy(db: Db) {
    let started = Instant::now();
    let driver = ChromeDriver::start().await;
    let browser = driver.session().await;
    // The scenario runs in its own task so that a failure still gets a
    // screenshot and a closed browser before the panic is passed on.
    let outcome = tokio::spawn(scenario(browser.clone(), db)).await;
    if outcome.is_err()
        && let Ok(png) = browser.screenshot().await
    {
        let path = out_dir().join(format!("playground-failure-{db:?}.png").to_lowercase());
        let _ = std::fs::write(&path, png);
        eprintln!("screenshot of the failure: {}", path.display());
    }
    let _ = browser.close().await;
    drop(driver);
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
    eprintln!("browser test ({db:?}) took {:?}", started.elapsed());
}

async fn scenario(browser: Client, db: Db) {
    let alice = As::alice();

    // ---- 1. A quick reply (short, 5 ms a word), sent with the Send button.
    let app = spawn_app_with(db, &[("SIMULATED_TOKEN_DELAY_MS", "5")]).await;
    browser
        .goto(&format!("{}/playground", app.base))
        .await
        .expect("open the playground");
    pick_user(&browser, "alice", "Alice Admin").await;
    type_message(&browser, FIRST_MESSAGE).await;
    click(&browser, "send").await;

    let reply = wait_for("the first reply to complete", || async {
        let r = assistant_reply(&browser).await;
        if r["status"] == "complete" {
            Ok(r)
        } else {
            Err(r.to_string())
        }
    })
    .await;
    let message_id = reply["id"].as_str().unwrap_or_default().to_owned();
    assert!(
        !message_id.is_empty(),
        "assistant-reply has no data-message-id: {reply}"
    );
    assert_eq!(reply["badge"], "complete", "{reply}");
    let chat_id = wait_for("the new chat in the list, marked current", || async {
        let list = listed_chats(&browser).await;
        match list["current"].as_str() {
            Some(id) => Ok(id.to_owned()),
            None => Err(list.to_string()),
        }
    })
    .await;
    let shown_id = js(
        &browser,
        r#"return document.querySelector('[data-testid="chat-id"]')?.textContent;"#,
    )
    .await;
    assert_eq!(shown_id, chat_id.as_str(), "chat header shows the chat id");

    let stored = stored_message(&app, &alice, &chat_id, &message_id).await;
    assert_eq!(stored["role"], "assistant");
    assert_eq!(stored["status"], "complete");
    assert_eq!(
        reply["text"], stored["content"],
        "the page shows the stored reply"
    );
    assert!(
        stored["content"]
            .as_str()
            .unwrap_or_default()
            .contains(FIRST_MESSAGE),
        "the simulated reply quotes the message: {stored}"
    );

    // ---- 2. Same database, a slow model with long replies: stop one mid-way.
    let kept = app.stop_and_keep_db().await;
    let app = spawn_on(
        kept,
        &[
            ("SIMULATED_TOKEN_DELAY_MS", "50"),
            ("SIMULATED_MIN_WORDS", "200"),
        ],
    )
    .await;
    // A new origin: nothing remembered, so pick Alice again and open the
    // chat from the list.
    browser
        .goto(&format!("{}/playground", app.base))
        .await
        .expect("open the playground on the restarted server");
    pick_user(&browser, "alice", "Alice Admin").await;
    let listed = listed_chats(&browser).await;
    assert!(
        ids_of(&listed["ids"]).contains(&chat_id),
        "Alice's chat is listed after the restart: {listed}"
    );
    browser
        .find(Locator::Css(&format!(
            r#"[data-testid="chat-item"][data-chat-id="{chat_id}"]"#
        )))
        .await
        .expect("chat-item")
        .click()
        .await
        .expect("open the chat");
    wait_for("the chat's history to load", || async {
        let r = assistant_reply(&browser).await;
        if r["id"] == message_id.as_str() && r["status"] == "complete" {
            Ok(())
        } else {
            Err(r.to_string())
        }
    })
    .await;

    // Enter sends (no click on Send this time).
    type_message(&browser, &format!("{SLOW_MESSAGE}{}", Key::Enter)).await;
    let partial = wait_for("the slow reply's first tokens", || async {
        let r = assistant_reply(&browser).await;
        let text = r["text"].as_str().unwrap_or_default();
        if r["status"] == "streaming" && !text.is_empty() && r["id"] != message_id.as_str() {
            Ok(r)
        } else {
            Err(r.to_string())
        }
    })
    .await;
    let slow_id = partial["id"].as_str().unwrap_or_default().to_owned();
    assert!(
        !slow_id.is_empty(),
        "streaming reply without data-message-id: {partial}"
    );
    let input = js(
        &browser,
        r#"return document.querySelector('[data-testid="message-input"]').value;"#,
    )
    .await;
    assert_eq!(input, "", "the message box is cleared once sent");
    let stop = browser
        .find(Locator::Css(r#"[data-testid="stop"]"#))
        .await
        .expect("stop button");
    assert!(
        stop.is_enabled().await.expect("stop enabled?"),
        "Stop is enabled while streaming"
    );
    stop.click().await.expect("press Stop");

    // The server notices the disconnect and keeps the partial reply.
    let full =
        confab_llm::SimulatedModel::new(confab_llm::TokenDelay::ZERO, 200).reply_to(SLOW_MESSAGE);
    let stored = wait_for("the stopped reply to be stored as final", || async {
        let m = stored_message(&app, &alice, &chat_id, &slow_id).await;
        if m["status"] == "streaming" {
            Err(m.to_string())
        } else {
            Ok(m)
        }
    })
    .await;
    let content = stored["content"].as_str().unwrap_or_default().to_owned();
    assert_eq!(stored["status"], "cancelled", "{stored}");
    assert!(!content.is_empty(), "the partial reply is kept: {stored}");
    assert!(
        content.len() < full.len() && full.starts_with(&content),
        "stored text is a proper prefix of the reply: {content:?}"
    );
    assert!(
        content.starts_with(partial["text"].as_str().unwrap_or_default()),
        "what the page had shown is part of what was stored"
    );

    // The page re-reads the chat and shows what the server stored.
    wait_for("the page to show the reply as cancelled", || async {
        let r = assistant_reply(&browser).await;
        let status = js(
            &browser,
            r#"const s = document.querySelector('[data-testid="status"]');
               return { state: s.dataset.state, text: s.textContent };"#,
        )
        .await;
        if r["id"] == slow_id.as_str()
            && r["status"] == "cancelled"
            && r["badge"] == "cancelled"
            && r["text"] == content.as_str()
            && status["text"]
                .as_str()
                .unwrap_or_default()
                .contains("cancelled")
        {
            Ok(())
        } else {
            Err(format!("{r} {status}"))
        }
    })
    .await;
    let send_enabled = browser
        .find(Locator::Css(r#"[data-testid="send"]"#))
        .await
        .expect("send button")
        .is_enabled()
        .await
        .expect("send enabled?");
    assert!(send_enabled, "Send is enabled again after Stop");
    let png = browser.screenshot().await.expect("screenshot");
    let name = match db {
        Db::Sqlite => "playground.png",
        Db::Postgres => "playground-postgres.png",
    };
    std::fs::write(out_dir().join(name), png).expect("write the screenshot");

    // ---- 3. Tenancy: Charlie (another org) sees his chats, none of Alice's.
    let charlie = As::charlie();
    let charlie_chat = app.chat(&charlie, "Charlie's own chat", None).await;
    let charlie_chat = charlie_chat["chat_id"]
        .as_str()
        .expect("chat_id")
        .to_owned();
    let alice_ids: HashSet<String> = api_chat_ids(&app, &alice).await.into_iter().collect();
    assert!(alice_ids.contains(&chat_id));
    pick_user(&browser, "charlie", "Charlie Founder").await;
    let listed = wait_for("Charlie's chat list", || async {
        let list = listed_chats(&browser).await;
        if ids_of(&list["ids"]).contains(&charlie_chat) {
            Ok(list)
        } else {
            Err(list.to_string())
        }
    })
    .await;
    let shown: HashSet<String> = ids_of(&listed["ids"]).into_iter().collect();
    let leaked: Vec<_> = shown.intersection(&alice_ids).collect();
    assert!(
        leaked.is_empty(),
        "Alice's chats listed for Charlie: {leaked:?}"
    );
    let charlie_ids: HashSet<String> = api_chat_ids(&app, &charlie).await.into_iter().collect();
    assert_eq!(shown, charlie_ids, "the page lists exactly Charlie's chats");
    let messages = js(
        &browser,
        r#"return document.querySelectorAll('[data-testid="message"]').length;"#,
    )
    .await;
    assert_eq!(messages, 0, "no conversation is shown after switching user");
}

// ------------------------------------------------- resume after a broken stream

/// A TCP proxy in front of the app whose open connections the test can cut
/// at once (what a load balancer or a network change does to a stream); new
/// connections keep being accepted.
struct CutProxy {
    port: u16,
    connections: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    accept: tokio::task::JoinHandle<()>,
}

impl CutProxy {
    async fn start(upstream: std::net::SocketAddr) -> CutProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (list, count) = (connections.clone(), accepted.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let task = tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                list.lock().unwrap().push(task.abort_handle());
            }
        });
        CutProxy {
            port,
            connections,
            accepted,
            accept,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Close every open connection (both sides).
    fn cut(&self) {
        for c in self.connections.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn playground_resumes_a_broken_stream_without_duplicate_text() {
    crate::support::init();
    let driver = ChromeDriver::start().await;
    let browser = driver.session().await;
    let outcome = tokio::spawn(resume_scenario(browser.clone())).await;
    if outcome.is_err()
        && let Ok(png) = browser.screenshot().await
    {
        let path = out_dir().join("playground-resume-failure.png");
        let _ = std::fs::write(&path, png);
        eprintln!("screenshot of the failure: {}", path.display());
    }
    let _ = browser.close().await;
    drop(driver);
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

async fn resume_scenario(browser: Client) {
    let app = spawn_app_with(
        Db::Sqlite,
        &[
            ("STREAM_DETACH_SECONDS", "30"),
            ("SIMULATED_TOKEN_DELAY_MS", "25"),
            ("SIMULATED_MIN_WORDS", "150"),
        ],
    )
    .await;
    let proxy = CutProxy::start(app.addr).await;
    browser
        .goto(&format!("{}/playground", proxy.url()))
        .await
        .expect("open the playground through the proxy");
    pick_user(&browser, "alice", "Alice Admin").await;
    type_message(&browser, "Tell me a long story, the network will break").await;
    click(&browser, "send").await;
    let partial = wait_for("a good part of the reply", || async {
        let r = assistant_reply(&browser).await;
        let words = r["text"]
            .as_str()
            .unwrap_or_default()
            .split_whitespace()
            .count();
        if r["status"] == "streaming" && words >= 30 {
            Ok(r)
        } else {
            Err(r.to_string())
        }
    })
    .await;
    let before_cut = proxy.accepted.load(std::sync::atomic::Ordering::SeqCst);
    proxy.cut();
    let reply = wait_for("the reply to complete after the break", || async {
        let r = assistant_reply(&browser).await;
        if r["status"] == "complete" {
            Ok(r)
        } else {
            Err(r.to_string())
        }
    })
    .await;
    let message_id = reply["id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(partial["id"], reply["id"], "the same reply continued");
    // Completed by the stream's own done event (a re-read of the chat after
    // giving up would say "stored as").
    let status = js(
        &browser,
        r#"return document.querySelector('[data-testid="status"]').textContent;"#,
    )
    .await;
    assert!(
        status
            .as_str()
            .unwrap_or_default()
            .starts_with("Reply complete"),
        "{status}"
    );
    let chat_id = listed_chats(&browser).await["current"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let stored = stored_message(&app, &As::alice(), &chat_id, &message_id).await;
    assert_eq!(stored["status"], "complete", "{stored}");
    assert_eq!(
        reply["text"], stored["content"],
        "the page shows the whole reply exactly once"
    );
    let partial_text = partial["text"].as_str().unwrap_or_default();
    assert!(
        stored["content"]
            .as_str()
            .unwrap_or_default()
            .starts_with(partial_text),
        "what was shown before the break is the start of the reply"
    );
    assert!(
        proxy.accepted.load(std::sync::atomic::Ordering::SeqCst) > before_cut,
        "the page reconnected"
    );
    let metrics = app.get("/metrics", &As::Nobody).await.text().await.unwrap();
    assert!(
        metrics.contains(r#"sse_resumes_total{source="local"} "#),
        "the page resumed the stream (rather than re-reading the chat)"
    );

    // Stop asks the server to cancel: with STREAM_DETACH_SECONDS the
    // disconnect alone would let the generation run on to `complete`.
    type_message(&browser, "Another long story, which I will stop").await;
    click(&browser, "send").await;
    let stopping = wait_for("the second reply's first tokens", || async {
        let r = assistant_reply(&browser).await;
        if r["status"] == "streaming" && r["id"] != message_id.as_str() && r["text"] != "" {
            Ok(r)
        } else {
            Err(r.to_string())
        }
    })
    .await;
    click(&browser, "stop").await;
    let second = stopping["id"].as_str().unwrap_or_default().to_owned();
    let finished = wait_for("the stopped reply's final status", || async {
        let m = stored_message(&app, &As::alice(), &chat_id, &second).await;
        if m["status"] == "streaming" {
            Err(m.to_string())
        } else {
            Ok(m)
        }
    })
    .await;
    assert_eq!(finished["status"], "cancelled", "{finished}");
}

/// The page's JavaScript unit tests (`assets/*.test.js`: the SSE parser) under Node.
#[test]
fn playground_javascript_unit_tests_pass_under_node() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new("node")
        .args([
            "--test",
            "--test-reporter=tap",
            "crates/confab-server/assets/",
        ])
        .current_dir(&root)
        .output()
        .unwrap_or_else(|e| {
            panic!("could not run `node` ({e}): Node.js is needed for the playground's JavaScript tests")
        });
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "node --test crates/confab-server/assets/ failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let count = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("# {key} ")))
            .and_then(|n| n.trim().parse::<u32>().ok())
    };
    assert!(
        count("pass").unwrap_or(0) > 0 && count("fail") == Some(0),
        "node ran no passing tests:\n{stdout}\n{stderr}"
    );
}
