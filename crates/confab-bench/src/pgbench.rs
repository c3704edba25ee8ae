//! The database ceiling: pgbench running a script with the writes of one
//! `POST /chat` (bench/sql/*.sql mirror the statements of
//! confab-store-postgres' `begin_turn` and `finish_message`), at the same
//! concurrency and for the same time as the HTTP scenario, against the same
//! database. Its transactions per second bound what confab can reach.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::process::Command;

#[derive(Clone, Debug, Default, Serialize)]
pub struct PgbenchResult {
    pub script: String,
    pub clients: usize,
    pub duration_s: f64,
    pub transactions: u64,
    pub failed: u64,
    pub tps: f64,
    pub latency_avg_ms: f64,
}

pub struct Spec<'a> {
    pub db_url: &'a str,
    pub script: &'a Path,
    pub clients: usize,
    pub duration: Duration,
    /// `-D name=value` variables for the script.
    pub vars: Vec<(String, String)>,
}

pub async fn run(spec: Spec<'_>) -> anyhow::Result<PgbenchResult> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut cmd = Command::new("pgbench");
    cmd.arg("--no-vacuum")
        // sqlx uses the extended protocol with cached prepared statements.
        .args(["--protocol", "prepared"])
        .args(["--client", &spec.clients.to_string()])
        .args(["--jobs", &threads.min(spec.clients).to_string()])
        .args(["--time", &spec.duration.as_secs().max(1).to_string()])
        .arg("--file")
        .arg(spec.script);
    for (k, v) in &spec.vars {
        cmd.arg("--define").arg(format!("{k}={v}"));
    }
    cmd.arg(spec.db_url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let output = cmd
        .output()
        .await
        .context("running pgbench (is /usr/bin/pgbench installed?)")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "pgbench failed ({}):\n{}\n{}",
            output.status,
            stdout,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let mut result =
        parse(&stdout).with_context(|| format!("unexpected pgbench output:\n{stdout}"))?;
    result.script = spec
        .script
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    result.clients = spec.clients;
    result.duration_s = spec.duration.as_secs_f64();
    Ok(result)
}

/// The summary lines of pgbench's report.
fn parse(stdout: &str) -> Option<PgbenchResult> {
    let mut r = PgbenchResult::default();
    let number = |line: &str, prefix: &str| -> Option<f64> {
        line.strip_prefix(prefix)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let mut tps = None;
    for line in stdout.lines().map(str::trim) {
        if let Some(v) = number(line, "number of transactions actually processed:") {
            r.transactions = v as u64;
        } else if let Some(v) = number(line, "number of failed transactions:") {
            r.failed = v as u64;
        } else if let Some(v) = number(line, "latency average =") {
            r.latency_avg_ms = v;
        } else if let Some(v) = number(line, "tps =") {
            tps = Some(v);
        }
    }
    r.tps = tps?;
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_report_of_pgbench_15() {
        let out = "transaction type: bench/sql/db-ceiling.sql
scaling factor: 1
query mode: prepared
number of clients: 64
number of threads: 2
maximum number of tries: 1
duration: 20 s
number of transactions actually processed: 41234
number of failed transactions: 0 (0.000%)
latency average = 31.056 ms
initial connection time = 120.432 ms
tps = 2060.823184 (without initial connection time)
";
        let r = parse(out).unwrap();
        assert_eq!(r.transactions, 41234);
        assert_eq!(r.failed, 0);
        assert!((r.latency_avg_ms - 31.056).abs() < 1e-9);
        assert!((r.tps - 2060.823184).abs() < 1e-9);
        assert!(parse("nothing").is_none());
    }
}
