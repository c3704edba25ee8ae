//! The operations kit (SPEC §15, README "Operations"): probes, the metrics
//! reference, a real Prometheus scraping confab for every dashboard panel,
//! the alert rules under promtool, the container files.
//!
//! Prometheus and promtool are Debian's (`scripts/services.sh` installs
//! them); these tests fail, never skip, when they are missing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::app::{ACME, ALICE, As};
use crate::support::process::{BIN, Confab, command, free_port};
use crate::support::sse::SseReader;
use crate::support::{Db, TestDb, spawn_app_with, spawn_on};

const PROMETHEUS: &str = "/usr/bin/prometheus";
const PROMTOOL: &str = "/usr/bin/promtool";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(relative: &str) -> String {
    let path = repo_root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A client that opens a new connection per request: a pooled keep-alive
/// connection would hide whether the listener still accepts.
fn fresh_client() -> reqwest::Client {
    crate::support::init();
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

async fn status_and_json(client: &reqwest::Client, url: &str) -> (u16, Value) {
    let res = client.get(url).send().await.expect("request");
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

// ---------------------------------------------------------------- probes

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn livez_and_readyz_answer_without_credentials_or_rate_limit_under_their_own_routes() {
    crate::support::init();
    let app = spawn_app_with(
        Db::Sqlite,
        &[("RATE_LIMIT_BURST", "1"), ("RATE_LIMIT_PER_SECOND", "0.01")],
    )
    .await;
    for _ in 0..5 {
        // Credentials are ignored: no token is taken, no 401 for bad ones.
        let res = app.get("/readyz", &As::alice()).await;
        assert_eq!(res.status(), 200);
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["status"], "ready", "{body}");
        assert_eq!(body["database"], "connected");
        assert_eq!(body["draining"], false);
        let bogus = As::Headers("not-an-id".into(), "x".into());
        assert_eq!(app.get("/livez", &bogus).await.status(), 200);
    }
    let (status, body) = app.get_json("/livez", &As::Nobody).await;
    assert_eq!((status, &body["status"]), (200, &json!("ok")));
    // The one token is still there.
    assert_eq!(app.get("/chats", &As::alice()).await.status(), 200);
    let metrics = app.get("/metrics", &As::Nobody).await.text().await.unwrap();
    for route in ["/livez", "/readyz"] {
        assert!(
            metrics.contains(&format!(
                "http_requests_total{{method=\"GET\",route=\"{route}\",status_code=\"200\"}}"
            )),
            "{route} has its own route label"
        );
    }
    assert!(metrics.contains("dependency_up{dependency=\"database\"} 1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_503_within_a_second_when_the_database_goes_away_and_recovers() {
    crate::support::init();
    let db = TestDb::new(Db::Postgres).await;
    let name = db.name().to_owned();
    let app = spawn_on(db, &[]).await;
    let client = fresh_client();
    assert_eq!(status_and_json(&client, &app.url("/readyz")).await.0, 200);

    let admin_url = crate::support::postgres_admin_url();
    let admin = sqlx::PgPool::connect(&admin_url).await.unwrap();
    let allow =
        |on: bool| sqlx::AssertSqlSafe(format!("ALTER DATABASE {name} ALLOW_CONNECTIONS {on}"));
    sqlx::query(allow(false)).execute(&admin).await.unwrap();
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(&name)
    .execute(&admin)
    .await
    .unwrap();
    let gone = Instant::now();
    let body = loop {
        let (status, body) = status_and_json(&client, &app.url("/readyz")).await;
        if status == 503 {
            break body;
        }
        assert!(
            gone.elapsed() < Duration::from_secs(3),
            "still ready: {body}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let took = gone.elapsed();
    assert!(took < Duration::from_secs(1), "503 after {took:?}");
    assert_eq!(body["database"], "disconnected", "{body}");
    assert_eq!(body["status"], "not ready");
    let res = client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["retry-after"], "1", "like every 503");
    assert_eq!(status_and_json(&client, &app.url("/livez")).await.0, 200);
    let metrics = app.get("/metrics", &As::Nobody).await.text().await.unwrap();
    assert!(metrics.contains("dependency_up{dependency=\"database\"} 0"));

    sqlx::query(allow(true)).execute(&admin).await.unwrap();
    let back = Instant::now();
    loop {
        let (status, body) = status_and_json(&client, &app.url("/readyz")).await;
        if status == 200 {
            assert_eq!(body["database"], "connected");
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(5),
            "not ready again: {body}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let took = back.elapsed();
    assert!(took < Duration::from_secs(1), "ready again after {took:?}");
    assert_eq!(status_and_json(&client, &app.url("/livez")).await.0, 200);
    admin.close().await;
    app.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_during_the_sigterm_drain_while_in_flight_streams_finish() {
    crate::support::init();
    let db = TestDb::new(Db::Sqlite).await;
    let mut app = Confab::start(&[
        ("DATABASE_URL", &db.url),
        ("SIMULATED_TOKEN_DELAY_MS", "50"),
        ("SIMULATED_MIN_WORDS", "60"),
        ("SHUTDOWN_GRACE_SECONDS", "20"),
        ("SHUTDOWN_READINESS_DELAY_MS", "1500"),
    ])
    .await;
    let client = fresh_client();
    assert_eq!(status_and_json(&client, &app.url("/readyz")).await.0, 200);
    let res = client
        .post(app.url("/chat/stream"))
        .header("x-org-id", ACME)
        .header("x-user-id", ALICE)
        .timeout(Duration::from_secs(30))
        .json(&json!({ "message": "a long reply, please" }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let mut reader = SseReader::new(res);
    reader.next_json().await.expect("first token");
    let stream = tokio::spawn(async move {
        let mut last = Value::Null;
        while let Some(ev) = reader.next_json().await {
            last = ev;
        }
        (last, Instant::now())
    });

    app.signal("TERM");
    let signalled = Instant::now();
    // Readiness flips at once; the listener still accepts meanwhile.
    let (mut saw_503, mut refused_at) = (None, None);
    while signalled.elapsed() < Duration::from_secs(10) {
        match client.get(app.url("/readyz")).send().await {
            Ok(res) => {
                let status = res.status().as_u16();
                let body: Value = res.json().await.unwrap_or(Value::Null);
                if status == 503 {
                    assert_eq!(body["draining"], true, "{body}");
                    if saw_503.is_none() {
                        saw_503 = Some(signalled.elapsed());
                        // Long before the listener closes: still alive.
                        assert_eq!(status_and_json(&client, &app.url("/livez")).await.0, 200);
                    }
                } else {
                    assert!(saw_503.is_none(), "ready again while draining: {body}");
                }
            }
            Err(_) => {
                refused_at = Some(signalled.elapsed());
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let saw_503 = saw_503.expect("/readyz answered 503 while draining");
    assert!(
        saw_503 < Duration::from_millis(500),
        "503 after {saw_503:?}"
    );
    let refused_at = refused_at.expect("the listener closed after the readiness delay");
    assert!(
        refused_at >= Duration::from_millis(1400),
        "the listener closed after {refused_at:?}, before SHUTDOWN_READINESS_DELAY_MS"
    );
    let (last, finished) = stream.await.unwrap();
    assert_eq!(last["done"], true, "the in-flight stream completed: {last}");
    assert!(
        finished.duration_since(signalled) > refused_at,
        "the stream was still running when the listener closed"
    );
    assert_eq!(app.wait(Duration::from_secs(20)).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_command_exits_zero_against_a_live_server_and_non_zero_without_one() {
    crate::support::init();
    let db = TestDb::new(Db::Sqlite).await;
    let app = Confab::start(&[("DATABASE_URL", &db.url)]).await;
    let port = app.base.rsplit(':').next().unwrap().to_owned();
    let run = |port: String| async move {
        command(&[("PORT", &port), ("DATABASE_URL", "sqlite://unused.db")])
            .arg("healthcheck")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .await
            .unwrap()
    };
    let ok = run(port).await;
    assert!(ok.status.success(), "{ok:?}");
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "ok");
    let down = run(free_port().to_string()).await;
    assert!(!down.status.success(), "{down:?}");
}

// ------------------------------------------------------- metrics reference

/// `(family, labels)` rows of the README's metrics reference table.
fn readme_metrics_reference() -> BTreeMap<String, BTreeSet<String>> {
    let readme = read("README.md");
    let start = readme
        .find("### Metrics reference")
        .expect("README has a '### Metrics reference' section");
    let section = &readme[start..];
    let end = section[4..].find("\n#").map_or(section.len(), |i| i + 4);
    let mut rows = BTreeMap::new();
    for line in section[..end].lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // | `family` | type | labels | meaning |
        if cells.len() < 5 || !cells[1].starts_with('`') {
            continue;
        }
        let family = cells[1].trim_matches('`').to_owned();
        let labels = cells[3]
            .split(',')
            .map(|l| l.trim().trim_matches('`').to_owned())
            .filter(|l| !l.is_empty() && l != "—")
            .collect();
        assert!(
            rows.insert(family.clone(), labels).is_none(),
            "{family} twice"
        );
    }
    assert!(!rows.is_empty(), "no rows in the metrics reference");
    rows
}

/// The label names of one sample line (`name{a="x",b="y\"z"} 1`).
fn sample_labels(line: &str) -> (String, BTreeSet<String>) {
    let Some(open) = line.find('{') else {
        let name = line.split(' ').next().unwrap_or("").to_owned();
        return (name, BTreeSet::new());
    };
    let name = line[..open].to_owned();
    let mut labels = BTreeSet::new();
    let mut rest = &line[open + 1..];
    while let Some(eq) = rest.find('=') {
        labels.insert(rest[..eq].trim_start_matches(',').to_owned());
        // Skip the quoted value, honouring backslash escapes.
        let value = &rest[eq + 2..];
        let mut escaped = false;
        let mut end = value.len();
        for (i, c) in value.char_indices() {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => {
                    end = i;
                    break;
                }
                _ => {}
            }
        }
        rest = &value[end + 1..];
        if rest.starts_with('}') {
            break;
        }
    }
    (name, labels)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_metrics_reference_lists_exactly_the_families_metrics_exposes() {
    crate::support::init();
    let app = spawn_app_with(Db::Sqlite, &[]).await;
    // A labelled family has no `# TYPE` line until its first sample, so the
    // traffic must reach every one (a new family the traffic misses fails
    // below as "not exposed": add what triggers it here). A token limit makes
    // the turns reserve and settle (token_budget_*).
    app.limit_acme_per_day(1_000_000).await;
    app.chat(&As::alice(), "hello", None).await;
    let res = app
        .post_json("/chat/stream", &As::alice(), &json!({ "message": "hi" }))
        .await;
    let resumed = format!(
        "/chat/{}/messages/{}/",
        res.headers()["x-chat-id"].to_str().unwrap(),
        res.headers()["x-message-id"].to_str().unwrap()
    );
    SseReader::new(res).all().await;
    // A resume and a cancel of the finished stream (sse_resumes, sse_cancels).
    let res = app.get(&format!("{resumed}stream"), &As::alice()).await;
    SseReader::new(res).all().await;
    let _ = app
        .request(
            reqwest::Method::POST,
            &format!("{resumed}cancel"),
            &As::alice(),
        )
        .send()
        .await;
    // No relay here (no Redis): record a relay failure the way it is counted.
    confab_core::turn::TurnMetrics::relay_error(app.state.metrics.as_ref(), "publish");
    // No simulated turn is ever retried: record one the way the engine does.
    confab_core::turn::TurnMetrics::upstream_retry(
        app.state.metrics.as_ref(),
        "simulated",
        "overloaded",
    );
    // A refusal at capacity (tests/it/overload.rs makes real ones).
    confab_core::turn::TurnMetrics::turn_refused(app.state.metrics.as_ref(), false, "capacity");
    // A final write deferred by an outage (tests/it/store_faults.rs makes one).
    confab_core::turn::TurnMetrics::final_write_deferred(app.state.metrics.as_ref(), "deferred");
    // A lingering close (tests/it/connections.rs makes real ones).
    app.state
        .metrics
        .lingering_closes
        .get_or_create(&confab_server::metrics::ReasonLabels { reason: "client" })
        .inc();
    let _ = app.get("/nope", &As::Nobody).await;
    let _ = app
        .get("/chats", &As::Headers(ACME.into(), ACME.into()))
        .await;
    let text = app.get("/metrics", &As::Nobody).await.text().await.unwrap();

    // Registered families, samples or not: the `# TYPE` lines.
    let exposed: BTreeMap<String, String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, kind)| (name.to_owned(), kind.to_owned()))
        .collect();
    let reference = readme_metrics_reference();
    let exposed_names: BTreeSet<&String> = exposed.keys().collect();
    let documented: BTreeSet<&String> = reference.keys().collect();
    assert_eq!(
        exposed_names.difference(&documented).collect::<Vec<_>>(),
        Vec::<&&String>::new(),
        "exposed by /metrics but missing from the README's metrics reference"
    );
    assert_eq!(
        documented.difference(&exposed_names).collect::<Vec<_>>(),
        Vec::<&&String>::new(),
        "in the README's metrics reference but not exposed by /metrics"
    );
    // Every label a sample carries is documented for its family.
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (sample, labels) = sample_labels(line);
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| sample.strip_suffix(s))
            .filter(|f| exposed.get(*f).is_some_and(|k| k == "histogram"))
            .unwrap_or(&sample);
        let documented = &reference[family];
        for label in labels.iter().filter(|l| *l != "le") {
            assert!(
                documented.contains(label),
                "{family}: label {label} is not in the README ({documented:?})"
            );
        }
    }
}

// ----------------------------------------------------- Prometheus, promtool

/// A private Prometheus on a free port, storage in a temporary directory,
/// killed (and its directory removed) when dropped.
struct Prometheus {
    child: std::process::Child,
    dir: PathBuf,
    base: String,
}

impl Prometheus {
    fn start(target: std::net::SocketAddr) -> Prometheus {
        assert!(
            Path::new(PROMETHEUS).exists(),
            "{PROMETHEUS} is missing: run scripts/services.sh (installs Debian's prometheus)"
        );
        let dir = std::env::temp_dir().join(format!("confab-prom-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: confab\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let child = std::process::Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus");
        Prometheus {
            child,
            dir,
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    async fn query(&self, client: &reqwest::Client, expr: &str) -> Value {
        let mut url = reqwest::Url::parse(&format!("{}/api/v1/query", self.base)).unwrap();
        url.query_pairs_mut().append_pair("query", expr);
        client
            .get(url)
            .send()
            .await
            .expect("prometheus query")
            .json()
            .await
            .expect("prometheus JSON")
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Every PromQL expression of the dashboard, with its panel's title.
fn dashboard_expressions() -> Vec<(String, String)> {
    let dashboard: Value = serde_json::from_str(&read("deploy/grafana/confab.json")).unwrap();
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        for panel in panels.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("?").to_owned();
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push((title.clone(), expr.to_owned()));
                }
            }
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_confab_and_every_dashboard_expression_returns_data() {
    crate::support::init();
    let started = Instant::now();
    let app = spawn_app_with(
        Db::Sqlite,
        &[
            ("RATE_LIMIT_BURST", "10"),
            ("RATE_LIMIT_PER_SECOND", "0.01"),
        ],
    )
    .await;
    let prometheus = Prometheus::start(app.addr);

    // A little traffic: chats, a stream, a model failure, a 404, a refused
    // login, rate-limited requests.
    let alice = As::alice();
    let chat = app.chat(&alice, "hello there", None).await;
    app.chat(&alice, "and again", chat["chat_id"].as_str())
        .await;
    let res = app
        .post_json("/chat/stream", &alice, &json!({ "message": "stream it" }))
        .await;
    assert_eq!(res.status(), 200);
    let (events, _) = SseReader::new(res).all().await;
    assert_eq!(events.last().unwrap()["done"], true);
    let failed = app
        .post_json("/chat", &alice, &json!({ "message": "/fail now" }))
        .await;
    assert!(failed.status().is_server_error(), "{}", failed.status());
    assert_eq!(app.get("/no/such/route", &As::Nobody).await.status(), 404);
    let stranger = As::Headers(ACME.into(), ACME.into());
    assert_eq!(app.get("/chats", &stranger).await.status(), 401);
    let charlie = As::charlie();
    let mut limited = 0;
    for _ in 0..12 {
        if app.get("/chats", &charlie).await.status() == 429 {
            limited += 1;
        }
    }
    assert!(limited > 0, "no request was rate limited");
    let _ = app.get("/readyz", &As::Nobody).await;

    // Wait for Prometheus to have scraped confab a few times.
    let client = fresh_client();
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "Prometheus did not scrape confab at {}",
            app.addr
        );
        if let Ok(res) = client
            .get(format!("{}/-/ready", prometheus.base))
            .send()
            .await
            && res.status() == 200
        {
            let v = prometheus
                .query(&client, "count_over_time(up{job=\"confab\"}[1m])")
                .await;
            let up = prometheus.query(&client, "up{job=\"confab\"}").await;
            let scrapes = v["data"]["result"][0]["value"][1]
                .as_str()
                .and_then(|s| s.parse::<f64>().ok())
                .unwrap_or(0.0);
            if scrapes >= 3.0 && up["data"]["result"][0]["value"][1] == "1" {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let expressions = dashboard_expressions();
    assert!(expressions.len() >= 15, "{} expressions", expressions.len());
    let mut failures = Vec::new();
    for (title, expr) in &expressions {
        let answer = prometheus.query(&client, expr).await;
        let results = answer["data"]["result"].as_array().map_or(0, Vec::len);
        if answer["status"] != "success" || results == 0 {
            failures.push(format!("{title}: {expr}\n    -> {answer}"));
        }
    }
    assert!(
        failures.is_empty(),
        "dashboard expressions without data:\n{}",
        failures.join("\n")
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    app.shutdown().await.unwrap();
}

fn promtool(args: &[&str]) -> String {
    assert!(
        Path::new(PROMTOOL).exists(),
        "{PROMTOOL} is missing: run scripts/services.sh (installs Debian's prometheus)"
    );
    let out = std::process::Command::new(PROMTOOL)
        .args(args)
        .current_dir(repo_root().join("deploy/prometheus"))
        .output()
        .expect("run promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let checked = promtool(&["check", "rules", "alerts.yml"]);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(&["test", "rules", "alerts.test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
    // The compose file's Prometheus configuration, with the rules it loads.
    promtool(&["check", "config", "prometheus.yml"]);
    // Every alert has a unit test.
    let rules: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&read("deploy/prometheus/alerts.yml")).unwrap();
    let tests = read("deploy/prometheus/alerts.test.yml");
    for rule in rules["groups"][0]["rules"].as_sequence().unwrap() {
        let name = rule["alert"].as_str().unwrap();
        assert!(
            tests.contains(&format!("alertname: {name}\n")),
            "{name} has no promtool test"
        );
    }
}

// --------------------------------------------------------- container files

#[test]
fn compose_file_has_the_services_and_environment_the_readme_names() {
    let compose: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&read("deploy/compose.yaml")).unwrap();
    let services = compose["services"].as_mapping().expect("services");
    let names: BTreeSet<&str> = services.keys().filter_map(|k| k.as_str()).collect();
    assert_eq!(
        names,
        BTreeSet::from(["confab", "postgres", "redis", "prometheus"])
    );
    let readme = read("README.md");
    let env = compose["services"]["confab"]["environment"]
        .as_mapping()
        .expect("confab environment");
    for (key, _) in env {
        let key = key.as_str().unwrap();
        assert!(
            readme.contains(&format!("`{key}`")),
            "{key} (compose) is not documented in the README"
        );
    }
    let var = |name: &str| env[name].as_str().unwrap_or_default().to_owned();
    let pg = &compose["services"]["postgres"]["environment"];
    let expected_db = format!(
        "postgres://{}:{}@postgres:5432/{}",
        pg["POSTGRES_USER"].as_str().unwrap(),
        pg["POSTGRES_PASSWORD"].as_str().unwrap(),
        pg["POSTGRES_DB"].as_str().unwrap()
    );
    assert_eq!(var("DATABASE_URL"), expected_db);
    assert_eq!(var("REDIS_URL"), "redis://redis:6379");
    assert_eq!(var("APP_ENV"), "production");
    assert_eq!(
        compose["services"]["confab"]["build"]["dockerfile"],
        "Dockerfile"
    );
    // Prometheus loads deploy/prometheus and scrapes the confab service.
    let volumes = compose["services"]["prometheus"]["volumes"]
        .as_sequence()
        .unwrap();
    assert!(
        volumes.iter().any(|v| v
            .as_str()
            .is_some_and(|v| v.starts_with("./prometheus:/etc/prometheus"))),
        "{volumes:?}"
    );
    let prom: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&read("deploy/prometheus/prometheus.yml")).unwrap();
    assert_eq!(
        prom["scrape_configs"][0]["static_configs"][0]["targets"][0],
        "confab:3000"
    );
    assert!(read("Dockerfile").contains("PORT=3000"));
    assert!(readme.contains("deploy/compose.yaml"));
}

#[test]
fn dockerfile_builds_with_the_command_ci_runs_on_the_pinned_toolchain() {
    let dockerfile = read("Dockerfile");
    let ci = read(".ci/run");
    let build: Vec<&str> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("RUN "))
        .filter(|l| l.contains("cargo "))
        .collect();
    assert_eq!(build, ["cargo build --release --locked -p confab-server"]);
    assert!(
        ci.lines().any(|l| l.trim() == build[0]),
        ".ci/run does not run the Dockerfile's build command"
    );
    let toolchain = read("rust-toolchain.toml");
    let channel = toolchain
        .lines()
        .find_map(|l| l.strip_prefix("channel = "))
        .unwrap()
        .trim_matches('"');
    let minor: Vec<&str> = channel.split('.').take(2).collect();
    let froms: Vec<&str> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("FROM "))
        .collect();
    assert_eq!(
        froms,
        [
            format!("rust:{}-slim-bookworm AS build", minor.join(".")).as_str(),
            "debian:bookworm-slim"
        ]
    );
    assert!(dockerfile.contains("\nUSER confab\n"));
    assert!(dockerfile.contains("CMD [\"confab\", \"healthcheck\"]"));
    assert!(dockerfile.contains("ENTRYPOINT [\"confab\"]\nCMD [\"serve\"]"));
    // The healthcheck subcommand exists in the binary the image ships.
    let help = std::process::Command::new(BIN)
        .arg("--help")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("healthcheck"));
}
