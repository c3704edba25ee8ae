//! The command line: one binary, `confab`, with `serve` (the default),
//! `migrate`, `seed-demo`, and admin commands for orgs, users and API keys.
//! Admin commands work against either backend (whatever `DATABASE_URL` says).

#![allow(clippy::print_stdout)] // a CLI's output is its interface

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use confab_core::model::{
    Email, NewApiKey, NewOrg, NewUser, OrgPolicy, RateLimitOverride, Role, Slug, TokenLimits,
    parse_system_prompt,
};
use confab_core::models::valid_model_name;
use confab_core::{ApiKeyId, OrgId, Store, StoreError, UserId};
use confab_llm::catalog::Catalog;
use tokio::net::TcpListener;

use crate::app::{App, open_store, shutdown_signal};
use crate::auth::generate_key;
use crate::config::Config;
use crate::seed;

#[derive(Parser)]
#[command(name = "confab", version, about = "Multi-tenant LLM chat service")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP service (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Create the demo tenants (idempotent).
    SeedDemo,
    /// GET /livez of the instance on HOST/PORT; exit 0 when it answers 200
    /// (the container HEALTHCHECK: the runtime image has no curl).
    Healthcheck,
    /// Manage organisations.
    #[command(subcommand)]
    Org(OrgCommand),
    /// Manage users.
    #[command(subcommand)]
    User(UserCommand),
    /// Manage API keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Print an org's token usage from the ledger (the JSON of `GET /usage`).
    Usage {
        /// Org id or slug.
        #[arg(long)]
        org: String,
        /// RFC 3339 start (default: the start of the current UTC month).
        #[arg(long)]
        from: Option<String>,
        /// RFC 3339 end, exclusive (default: the start of next month).
        #[arg(long)]
        to: Option<String>,
        /// model, user or day.
        #[arg(long)]
        group_by: Option<String>,
    },
}

#[derive(Subcommand)]
enum OrgCommand {
    /// Create an org.
    Create {
        #[arg(long)]
        name: String,
        /// Lower-case letters, digits and '-'.
        #[arg(long)]
        slug: String,
        /// A fixed id (default: random).
        #[arg(long)]
        id: Option<String>,
    },
    /// List orgs.
    List,
    /// Set (or clear) an org's own rate limit.
    SetLimit {
        /// Org id or slug.
        org: String,
        #[arg(long, required_unless_present = "clear")]
        burst: Option<u32>,
        #[arg(long, required_unless_present = "clear")]
        per_second: Option<f64>,
        /// Go back to the server-wide default.
        #[arg(long, conflicts_with_all = ["burst", "per_second"])]
        clear: bool,
    },
    /// Set an org's token limits (0 = unlimited).
    SetTokenLimit {
        /// Org id or slug.
        org: String,
        #[arg(long, default_value_t = 0)]
        per_minute: u64,
        #[arg(long, default_value_t = 0)]
        per_day: u64,
    },
    /// Restrict (or, with --all, stop restricting) the models an org may use.
    Models {
        /// Org id or slug.
        org: String,
        /// Comma-separated model names, e.g. `--allow fast,smart`.
        #[arg(long, value_delimiter = ',', required_unless_present = "all")]
        allow: Vec<String>,
        /// Every configured model.
        #[arg(long, conflicts_with = "allow")]
        all: bool,
        /// Set the list even when it names none of the models this shell's
        /// configuration has (MODELS_FILE, provider keys) — for servers
        /// configured differently.
        #[arg(long, conflicts_with = "all")]
        force: bool,
    },
    /// Set (or clear) the system prompt of chats that have none of their own.
    SystemPrompt {
        /// Org id or slug.
        org: String,
        #[arg(long, required_unless_present = "clear")]
        text: Option<String>,
        #[arg(long, conflicts_with = "text")]
        clear: bool,
    },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create a user in an org.
    Create {
        /// Org id or slug.
        #[arg(long)]
        org: String,
        #[arg(long)]
        email: String,
        #[arg(long)]
        name: String,
        /// owner, admin or member.
        #[arg(long, default_value = "member")]
        role: String,
        #[arg(long)]
        id: Option<String>,
    },
    /// List the users of an org.
    List {
        /// Org id or slug.
        #[arg(long)]
        org: String,
    },
    /// Set a user's own token limits (0 = unlimited).
    SetTokenLimit {
        /// User id.
        user: String,
        #[arg(long, default_value_t = 0)]
        per_minute: u64,
        #[arg(long, default_value_t = 0)]
        per_day: u64,
    },
    /// Soft-delete a user (their keys stop working).
    Delete {
        /// Org id or slug.
        #[arg(long)]
        org: String,
        user: String,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Create an API key for a user; the key is printed once.
    Create(KeyCreate),
    /// List an org's keys (never the secrets).
    List {
        /// Org id or slug.
        #[arg(long)]
        org: String,
    },
    /// Revoke a key by its id.
    Revoke { id: String },
}

#[derive(Args)]
struct KeyCreate {
    /// The user the key acts as.
    #[arg(long)]
    user: String,
    /// A label for the key.
    #[arg(long, default_value = "default")]
    name: String,
}

/// Parse the command line, run it, and turn errors into one line on stderr
/// and a non-zero exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(err) = dotenvy::dotenv()
        && !err.not_found()
    {
        eprintln!("confab: cannot read .env: {err}");
        return ExitCode::from(2);
    }
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(err) => {
            eprintln!(
                "confab: {}",
                crate::config::redact_credentials(&err.to_string())
            );
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("confab: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli.command.unwrap_or(Command::Serve), config));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // Driver errors may quote the database or Redis URL.
            eprintln!(
                "confab: {}",
                crate::config::redact_credentials(&format!("{err:#}"))
            );
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Serve => serve(config).await,
        Command::Healthcheck => healthcheck(&config).await,
        Command::Migrate => {
            let store = open_store(&config).await?;
            println!("migrations applied ({})", store.backend());
            store.close().await;
            Ok(())
        }
        Command::SeedDemo => {
            let store = open_store(&config).await?;
            let n = seed::seed_demo(store.as_ref()).await?;
            println!("demo tenants ready ({n} rows created)");
            store.close().await;
            Ok(())
        }
        Command::Org(cmd) => with_store(&config, |s| org(s, cmd, &config.catalog)).await,
        Command::User(cmd) => with_store(&config, |s| user(s, cmd)).await,
        Command::Key(cmd) => with_store(&config, |s| key(s, cmd)).await,
        Command::Usage {
            org,
            from,
            to,
            group_by,
        } => with_store(&config, |s| usage(s, org, from, to, group_by)).await,
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let _log_guard = crate::telemetry::init(&config.log_level, config.log_format);
    crate::telemetry::install_panic_hook();
    let addr = std::net::SocketAddr::new(config.host, config.port);
    let app = App::build(config).await?;
    let listener =
        listen(addr).with_context(|| format!("cannot listen on {addr} (set PORT or HOST)"))?;
    let local = listener.local_addr()?;
    announce(&app, local);
    app.serve(listener, shutdown_signal()).await
}

/// Connections the kernel queues for confab before it accepts them.
/// `TcpListener::bind` asks for 1,024: when thousands of clients connect at
/// once the rest overflow the queue, their handshake is dropped and each
/// waits for its SYN retry (1 s, then 3 s) — seen as a 2 s TTFT p99 in a
/// burst of 5,000 (`TcpExtListenOverflows` counts them). The kernel caps
/// this at `net.core.somaxconn` (4,096 on most machines now).
const LISTEN_BACKLOG: u32 = 65_535;

fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As `TcpListener::bind` does: a restart may bind while the old
    // process's connections linger in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// One HTTP/1.1 request by hand: the binary has no HTTP client of its own,
/// and pulling one in for a health check is not worth it.
async fn healthcheck(config: &Config) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = if config.host.is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        config.host
    };
    let addr = std::net::SocketAddr::new(host, config.port);
    let exchange = async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.write_all(b"GET /livez HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await?;
        let mut head = vec![0u8; 64];
        let n = tcp.read(&mut head).await?;
        head.truncate(n);
        Ok::<_, std::io::Error>(head)
    };
    let head = tokio::time::timeout(std::time::Duration::from_secs(3), exchange)
        .await
        .map_err(|_| anyhow!("{addr}: no answer within 3 s"))?
        .with_context(|| format!("GET http://{addr}/livez"))?;
    let status_line = String::from_utf8_lossy(&head);
    let status_line = status_line.lines().next().unwrap_or("");
    if status_line.starts_with("HTTP/1.1 200") {
        println!("ok");
        Ok(())
    } else {
        bail!("GET http://{addr}/livez: {status_line:?}")
    }
}

/// The start-up banner: where to click and what to paste.
fn announce(app: &App, addr: std::net::SocketAddr) {
    let cfg = &app.state.config;
    let host = if addr.ip().is_unspecified() {
        "localhost".to_owned()
    } else {
        addr.ip().to_string()
    };
    let base = format!("http://{host}:{}", addr.port());
    let curl = format!(
        "curl -s {base}/chat -H 'content-type: application/json' -H 'x-org-id: {}' -H 'x-user-id: {}' -d '{{\"message\":\"Hello!\"}}'",
        seed::ACME,
        seed::ALICE
    );
    tracing::info!(
        url = %base,
        playground = %format!("{base}/playground"),
        database = app.state.store.backend(),
        rateLimiter = app.state.limiter.backend(),
        authMode = %cfg.auth_mode,
        env = %cfg.app_env,
        maxConcurrentStreams = cfg.engine.max_concurrent_turns,
        dbPoolMax = cfg.db_pool_max,
        dbAcquireTimeoutMs = u64::try_from(cfg.db_acquire_timeout.as_millis()).unwrap_or(u64::MAX),
        dbGroupCommit = cfg.db_group_commit,
        "confab listening"
    );
    eprintln!("\nconfab is listening on {base}");
    eprintln!("  playground: {base}/playground");
    eprintln!(
        "  database:   {} ({}), rate limiter: {}",
        app.state.store.backend(),
        cfg.database_url.redacted(),
        app.state.limiter.backend()
    );
    if cfg.auth_mode.headers {
        eprintln!("  try:        {curl}\n");
    } else {
        eprintln!(
            "  header auth is off: create a key with `confab key create --user <id>` and send Authorization: Bearer <key>\n"
        );
    }
}

async fn with_store<F, Fut>(config: &Config, f: F) -> anyhow::Result<()>
where
    F: FnOnce(Arc<dyn Store>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let store = open_store(config).await?;
    let result = f(store.clone()).await;
    store.close().await;
    result
}

fn parse_id<T: std::str::FromStr>(what: &str, s: &str) -> anyhow::Result<T> {
    s.trim()
        .parse()
        .map_err(|_| anyhow!("{what} {s:?} is not a UUID"))
}

fn conflict_message(err: StoreError, what: &str) -> anyhow::Error {
    match err {
        StoreError::Conflict { constraint } => anyhow!("{what} already exists ({constraint})"),
        StoreError::NotFound => anyhow!("{what}: the org or user it refers to does not exist"),
        other => anyhow!(other),
    }
}

/// An allowlist naming none of the configured models leaves the org no
/// model at all (every turn and `GET /models` would answer `Unknown model`):
/// refused, a typo most likely, unless `force` (the check can only use this
/// shell's configuration, which may not be the servers'). Names this
/// configuration lacks among ones it has only get a warning.
fn check_configured(names: &[String], catalog: &Catalog, force: bool) -> anyhow::Result<()> {
    let configured = |name: &String| catalog.models.iter().any(|m| &m.name == name);
    let known = || {
        catalog
            .models
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let unknown: Vec<&str> = names
        .iter()
        .filter(|n| !configured(n))
        .map(String::as_str)
        .collect();
    if unknown.len() == names.len() && !force {
        bail!(
            "none of {} is a configured model (this configuration has: {}); the org could use no model. \
             If the servers are configured differently (MODELS_FILE, provider keys), add --force",
            names.join(","),
            known()
        );
    }
    if !unknown.is_empty() {
        eprintln!(
            "warning: {} not among this configuration's models ({}); requests naming them get 400 where they are not configured",
            unknown.join(","),
            known()
        );
    }
    Ok(())
}

async fn find_org(store: &dyn Store, id_or_slug: &str) -> anyhow::Result<confab_core::Org> {
    match store.find_org(id_or_slug.trim()).await {
        Ok(org) => Ok(org),
        Err(StoreError::NotFound) => bail!("no org {id_or_slug:?}"),
        Err(e) => Err(e.into()),
    }
}

async fn org(store: Arc<dyn Store>, cmd: OrgCommand, catalog: &Catalog) -> anyhow::Result<()> {
    match cmd {
        OrgCommand::Create { name, slug, id } => {
            let slug = Slug::parse(&slug).map_err(|e| anyhow!(e.0))?;
            if name.trim().is_empty() {
                bail!("--name must not be empty");
            }
            let id = id.map(|s| parse_id::<OrgId>("--id", &s)).transpose()?;
            let org = store
                .create_org(&NewOrg {
                    id: id.unwrap_or_default(),
                    name: name.trim().to_owned(),
                    slug,
                    metadata: serde_json::json!({}),
                })
                .await
                .map_err(|e| conflict_message(e, "an org with that slug or id"))?;
            println!("{}\t{}\t{}", org.id, org.slug, org.name);
        }
        OrgCommand::List => {
            for org in store.list_orgs().await? {
                let limit = org
                    .rate_limit
                    .map(|l| format!("{}/{} per s", l.burst, l.per_second))
                    .unwrap_or_else(|| "default".into());
                println!(
                    "{}\t{}\t{}\trate limit: {limit}",
                    org.id, org.slug, org.name
                );
            }
        }
        OrgCommand::SetLimit {
            org,
            burst,
            per_second,
            clear,
        } => {
            let org = find_org(store.as_ref(), &org).await?;
            let limit = if clear {
                None
            } else {
                let (Some(burst), Some(per_second)) = (burst, per_second) else {
                    bail!("give --burst and --per-second, or --clear");
                };
                Some(RateLimitOverride::new(burst, per_second).map_err(|e| anyhow!(e.0))?)
            };
            store.set_org_rate_limit(org.id, limit).await?;
            match limit {
                Some(l) => println!(
                    "{}: burst {} refill {}/s (takes effect within the auth cache TTL)",
                    org.slug, l.burst, l.per_second
                ),
                None => println!("{}: server default rate limit", org.slug),
            }
        }
        OrgCommand::SetTokenLimit {
            org,
            per_minute,
            per_day,
        } => {
            let org = find_org(store.as_ref(), &org).await?;
            let limits = TokenLimits {
                per_minute,
                per_day,
            };
            store.set_org_token_limits(org.id, limits).await?;
            println!(
                "{}: {} tokens per minute, {} per day (takes effect within the auth cache TTL)",
                org.slug,
                limit_text(per_minute),
                limit_text(per_day)
            );
        }
        OrgCommand::Models {
            org,
            allow,
            all,
            force,
        } => {
            let org = find_org(store.as_ref(), &org).await?;
            let allowed_models = if all {
                None
            } else {
                let names: Vec<String> = allow
                    .iter()
                    .map(|n| n.trim().to_owned())
                    .filter(|n| !n.is_empty())
                    .collect();
                if names.is_empty() {
                    bail!("--allow needs at least one model name (or use --all)");
                }
                if let Some(bad) = names.iter().find(|n| !valid_model_name(n)) {
                    bail!("{bad:?} is not a model name (1-64 of A-Z a-z 0-9 . _ : -)");
                }
                check_configured(&names, catalog, force)?;
                Some(names)
            };
            let policy = OrgPolicy {
                allowed_models,
                ..org.policy.clone()
            };
            store.set_org_policy(org.id, &policy).await?;
            match &policy.allowed_models {
                Some(names) => println!(
                    "{}: models {} (takes effect within the auth cache TTL)",
                    org.slug,
                    names.join(",")
                ),
                None => println!("{}: every configured model", org.slug),
            }
        }
        OrgCommand::SystemPrompt { org, text, clear } => {
            let org = find_org(store.as_ref(), &org).await?;
            let system_prompt = if clear {
                None
            } else {
                let text = text.unwrap_or_default();
                parse_system_prompt(&text).map_err(|e| anyhow!("--text: {}", e.0))?
            };
            let policy = OrgPolicy {
                system_prompt,
                ..org.policy.clone()
            };
            store.set_org_policy(org.id, &policy).await?;
            match &policy.system_prompt {
                Some(text) => println!(
                    "{}: default system prompt set ({} characters)",
                    org.slug,
                    text.chars().count()
                ),
                None => println!("{}: no default system prompt", org.slug),
            }
        }
    }
    Ok(())
}

async fn user(store: Arc<dyn Store>, cmd: UserCommand) -> anyhow::Result<()> {
    match cmd {
        UserCommand::Create {
            org,
            email,
            name,
            role,
            id,
        } => {
            let org = find_org(store.as_ref(), &org).await?;
            let email = Email::parse(&email).map_err(|e| anyhow!(e.0))?;
            let role: Role = role
                .trim()
                .parse()
                .map_err(|e: confab_core::model::Invalid| anyhow!(e.0))?;
            if name.trim().is_empty() {
                bail!("--name must not be empty");
            }
            let id = id.map(|s| parse_id::<UserId>("--id", &s)).transpose()?;
            let user = store
                .create_user(&NewUser {
                    id: id.unwrap_or_default(),
                    org_id: org.id,
                    email,
                    name: name.trim().to_owned(),
                    role,
                })
                .await
                .map_err(|e| {
                    conflict_message(e, "a user with that email in this org (or that id)")
                })?;
            println!("{}\t{}\t{}\t{}", user.id, user.email, user.role, org.slug);
        }
        UserCommand::List { org } => {
            let org = find_org(store.as_ref(), &org).await?;
            for u in store.list_users(org.id).await? {
                println!("{}\t{}\t{}\t{}", u.id, u.email, u.role, u.name);
            }
        }
        UserCommand::SetTokenLimit {
            user,
            per_minute,
            per_day,
        } => {
            let user = parse_id::<UserId>("user", &user)?;
            let limits = TokenLimits {
                per_minute,
                per_day,
            };
            match store.set_user_token_limits(user, limits).await {
                Ok(()) => println!(
                    "{user}: {} tokens per minute, {} per day (takes effect within the auth cache TTL)",
                    limit_text(per_minute),
                    limit_text(per_day)
                ),
                Err(StoreError::NotFound) => bail!("no user {user}"),
                Err(e) => return Err(e.into()),
            }
        }
        UserCommand::Delete { org, user } => {
            let org = find_org(store.as_ref(), &org).await?;
            let user = parse_id::<UserId>("user", &user)?;
            match store.delete_user(org.id, user).await {
                Ok(()) => println!("deleted {user}"),
                Err(StoreError::NotFound) => bail!("no user {user} in {}", org.slug),
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

fn limit_text(n: u64) -> String {
    if n == 0 {
        "unlimited".into()
    } else {
        n.to_string()
    }
}

async fn usage(
    store: Arc<dyn Store>,
    org: String,
    from: Option<String>,
    to: Option<String>,
    group_by: Option<String>,
) -> anyhow::Result<()> {
    let org = find_org(store.as_ref(), &org).await?;
    let (from, to, group) =
        crate::wire::usage_query(from.as_deref(), to.as_deref(), group_by.as_deref())
            .map_err(|e| anyhow!("--{e}"))?;
    let report = store.usage_report(org.id, None, from, to, group).await?;
    println!(
        "{}",
        serde_json::to_string_pretty(&crate::wire::UsageReportJson::new(from, to, &report))?
    );
    Ok(())
}

async fn key(store: Arc<dyn Store>, cmd: KeyCommand) -> anyhow::Result<()> {
    match cmd {
        KeyCommand::Create(KeyCreate { user, name }) => {
            let user = parse_id::<UserId>("--user", &user)?;
            let Some(principal) = store.find_principal(user).await? else {
                bail!("no user {user}");
            };
            let generated = generate_key();
            let key = store
                .create_api_key(&NewApiKey {
                    id: ApiKeyId::new(),
                    org_id: principal.org_id,
                    user_id: user,
                    hash: generated.hash,
                    prefix: generated.prefix,
                    name: name.trim().to_owned(),
                })
                .await
                .map_err(|e| conflict_message(e, "API key"))?;
            println!("id:     {}", key.id);
            println!("org:    {}", key.org_id);
            println!("user:   {}", key.user_id);
            println!("key:    {}", generated.secret);
            eprintln!("Store the key now: it is shown only once (confab keeps only its hash).");
        }
        KeyCommand::List { org } => {
            let org = find_org(store.as_ref(), &org).await?;
            for k in store.list_api_keys(org.id).await? {
                let state = match k.revoked_at {
                    Some(t) => format!("revoked {}", t.to_rfc3339()),
                    None => "active".into(),
                };
                let used = k
                    .last_used_at
                    .map(|t| t.to_rfc3339())
                    .unwrap_or_else(|| "never".into());
                println!(
                    "{}\t{}…\t{}\tuser {}\t{state}\tlast used {used}",
                    k.id, k.prefix, k.name, k.user_id
                );
            }
        }
        KeyCommand::Revoke { id } => {
            let id = parse_id::<ApiKeyId>("key id", &id)?;
            match store.revoke_api_key(id).await {
                Ok(()) => println!("revoked {id}"),
                Err(StoreError::NotFound) => bail!("no API key {id}"),
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}
