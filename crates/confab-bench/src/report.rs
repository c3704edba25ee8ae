//! Merge a run's fragments into one JSON document (`out/bench/<run>.json`
//! and `latest.json`) and print the tables (Markdown, so they paste into
//! BENCHMARKS.md as they are), with the ratios and the targets.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde_json::{Value, json};

use crate::Fragment;

#[derive(Args)]
pub struct ReportArgs {
    /// The run's fragments (*.json, read in file-name order).
    #[arg(long)]
    dir: PathBuf,
    /// Where the merged JSON goes.
    #[arg(long)]
    json_out: PathBuf,
    /// A copy of it (out/bench/latest.json).
    #[arg(long)]
    latest: Option<PathBuf>,
    #[arg(long)]
    run_id: String,
    #[arg(long)]
    quick: bool,
    /// `key=value` facts about the run (versions, commit, settings).
    #[arg(long = "meta", value_parser = parse_key_value)]
    meta: Vec<(String, String)>,
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected key=value, got {s:?}"))
}

/// Share of the machine used by processes outside the benchmark above which
/// a throughput figure is flagged as disturbed.
const DISTURBED_SHARE: f64 = 0.10;

pub fn run(args: ReportArgs) -> anyhow::Result<()> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&args.dir)
        .with_context(|| format!("reading {}", args.dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    let mut fragments = Vec::new();
    for path in &paths {
        let text = std::fs::read_to_string(path)?;
        let fragment: Fragment =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        fragments.push(fragment);
    }
    let find = |name: &str| fragments.iter().find(|f| f.scenario == name);
    let num = |f: Option<&Fragment>, pointer: &str| {
        f.and_then(|f| f.result.pointer(pointer))
            .and_then(Value::as_f64)
    };

    let post = num(find("post-chat"), "/requests_per_s");
    let ceiling = num(find("db-ceiling"), "/tps");
    let ceiling_auto = num(find("db-ceiling-autocommit"), "/tps");
    let embedded = num(find("embedded"), "/requests_per_s");
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let bursts: Vec<Value> = fragments
        .iter()
        .filter(|f| f.scenario == "sse-burst")
        .map(|f| {
            let n = f.result["streams"].as_f64().unwrap_or(0.0);
            json!({
                "streams": n,
                "floor_ms": ceiling_auto.map(|tps| floor_ms(n, tps)),
                "ttft_p50_ms": f.result.pointer("/ttft_from_release_ms/p50"),
                "ttft_p99_ms": f.result.pointer("/ttft_from_release_ms/p99"),
            })
        })
        .collect();
    let ratios = json!({
        "post_chat_over_db_ceiling": ratio(post, ceiling),
        "post_chat_over_db_ceiling_autocommit": ratio(post, ceiling_auto),
        "embedded_over_post_chat": ratio(embedded, post),
        "sse_burst_floor": bursts,
        "gateway": gateway_ratios(&fragments),
    });
    let targets = targets(
        &fragments,
        ratio(post, ceiling),
        ratio(post, ceiling_auto),
        ceiling_auto,
    );

    let mut meta = serde_json::Map::new();
    meta.insert("run_id".into(), json!(args.run_id));
    meta.insert("quick".into(), json!(args.quick));
    meta.insert("machine".into(), machine());
    for (k, v) in &args.meta {
        meta.insert(k.clone(), json!(v));
    }
    let document = json!({
        "run": meta,
        "scenarios": fragments,
        "ratios": ratios,
        "targets": targets,
    });
    let bytes = serde_json::to_vec_pretty(&document)?;
    if let Some(dir) = args.json_out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.json_out, &bytes)
        .with_context(|| format!("writing {}", args.json_out.display()))?;
    if let Some(latest) = &args.latest {
        std::fs::write(latest, &bytes)?;
    }
    print!("{}", render(&document));
    Ok(())
}

/// nproc, CPU model, memory, kernel, load: what the numbers were taken on.
fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kb: Option<u64> = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok());
    json!({
        "nproc": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "cpu_model": model,
        "mem_gib": mem_kb.map(|kb| (kb as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_owned()),
        "loadavg_at_report": std::fs::read_to_string("/proc/loadavg").ok().map(|s| s.trim().to_owned()),
    })
}

/// Per upstream pace and concurrency of the gateway scenario: each
/// gateway's TTFT over the upstream's own (same run, same client, same
/// pace), and confab's streams/s over LiteLLM's.
fn gateway_ratios(fragments: &[Fragment]) -> Vec<Value> {
    let gateway: Vec<&Fragment> = fragments
        .iter()
        .filter(|f| f.scenario == "gateway")
        .collect();
    let mut levels: Vec<(Option<u64>, u64)> = gateway
        .iter()
        .filter_map(|f| {
            Some((
                f.params["pace_ms"].as_u64(),
                f.params["concurrency"].as_u64()?,
            ))
        })
        .collect();
    // Slowest pace first (the one a real model's gaps resemble), then by load.
    levels.sort_unstable_by_key(|&(pace, c)| (std::cmp::Reverse(pace), c));
    levels.dedup();
    levels
        .into_iter()
        .map(|(pace, c)| {
            let of = |target: &str| {
                gateway
                    .iter()
                    .find(|f| {
                        f.params["target"] == target
                            && f.params["concurrency"] == c
                            && f.params["pace_ms"].as_u64() == pace
                    })
                    .map(|f| &f.result)
            };
            let (direct, confab, litellm) = (of("direct"), of("confab"), of("litellm"));
            let get = |r: Option<&Value>, p: &str| r.and_then(|r| r.pointer(p)).and_then(Value::as_f64);
            let added = |r: Option<&Value>, p: &str| {
                get(r, p).zip(get(direct, p)).map(|(g, d)| g - d)
            };
            let per_s = |r: Option<&Value>| get(r, "/completed_per_s");
            json!({
                "pace_ms": pace,
                "concurrency": c,
                "confab_added_ttft_p50_ms": added(confab, "/ttft_ms/p50"),
                "confab_added_ttft_p99_ms": added(confab, "/ttft_ms/p99"),
                "litellm_added_ttft_p50_ms": added(litellm, "/ttft_ms/p50"),
                "litellm_added_ttft_p99_ms": added(litellm, "/ttft_ms/p99"),
                "confab_over_direct_streams_per_s": per_s(confab).zip(per_s(direct)).filter(|(_, d)| *d > 0.0).map(|(a, d)| a / d),
                "litellm_over_direct_streams_per_s": per_s(litellm).zip(per_s(direct)).filter(|(_, d)| *d > 0.0).map(|(a, d)| a / d),
                "confab_over_litellm_streams_per_s": per_s(confab).zip(per_s(litellm)).filter(|(_, l)| *l > 0.0).map(|(a, l)| a / l),
            })
        })
        .collect()
}

/// "100" or "100 @ 25 ms/token": a gateway level's name.
fn gateway_level_name(level: &Value) -> String {
    match level["pace_ms"].as_u64() {
        Some(pace) => format!("{} @ {pace} ms/token", level["concurrency"]),
        None => level["concurrency"].to_string(),
    }
}

/// The first wave's targets and issue #15's "Done when" (the commit floor
/// and the two-commit ceiling are db-ceiling-autocommit's, as the issue
/// defines them).
fn targets(
    fragments: &[Fragment],
    post_over_ceiling: Option<f64>,
    post_over_autocommit: Option<f64>,
    autocommit_tps: Option<f64>,
) -> Vec<Value> {
    let find = |name: &str| fragments.iter().find(|f| f.scenario == name);
    let burst = |n: f64| {
        fragments
            .iter()
            .find(|f| f.scenario == "sse-burst" && f.result["streams"].as_f64() == Some(n))
    };
    let burst_get = |n: f64, pointer: &str| {
        burst(n)
            .and_then(|f| f.result.pointer(pointer))
            .and_then(Value::as_f64)
    };
    let docs: Vec<Value> = fragments
        .iter()
        .filter_map(|f| serde_json::to_value(f).ok())
        .collect();
    let docs: Vec<&Value> = docs.iter().collect();
    let get = |name: &str, pointer: &str| {
        find(name)
            .and_then(|f| f.result.pointer(pointer))
            .and_then(Value::as_f64)
    };
    let peak = |name: &str| {
        find(name)
            .and_then(|f| f.usage.as_ref())
            .and_then(|u| u.pointer("/server_memory/rss_peak_mb"))
            .and_then(Value::as_f64)
    };
    let footprint = fragments
        .iter()
        .find(|f| f.scenario == "footprint" && f.label.contains("postgres"))
        .or_else(|| find("footprint"));
    let fp = |pointer: &str| {
        footprint
            .and_then(|f| f.result.pointer(pointer))
            .and_then(Value::as_f64)
    };
    let check = |name: &str, value: Option<f64>, goal: &str, met: fn(f64) -> bool| {
        json!({
            "target": name,
            "goal": goal,
            "value": value,
            "met": value.map(met),
        })
    };
    let mut gateway_checks = Vec::new();
    for level in gateway_ratios(fragments) {
        let name = gateway_level_name(&level);
        if level["concurrency"] == 100 {
            gateway_checks.push(check(
                &format!("gateway {name}: confab added TTFT p99 (ms)"),
                level["confab_added_ttft_p99_ms"].as_f64(),
                "<= 5",
                |v| v <= 5.0,
            ));
        }
        gateway_checks.push(check(
            &format!("gateway {name}: confab / LiteLLM streams/s"),
            level["confab_over_litellm_streams_per_s"].as_f64(),
            ">= 10",
            |v| v >= 10.0,
        ));
    }
    let refused_10k = get("sse-10k", "/refused_ms/count").unwrap_or(0.0);
    let mut all = vec![
        check(
            "post-chat / db-ceiling",
            post_over_ceiling,
            ">= 0.50",
            |v| v >= 0.50,
        ),
        check(
            "sse-1k stretch (overall)",
            get("sse-1k", "/stretch_overall"),
            "<= 1.10",
            |v| v <= 1.10,
        ),
        check(
            "sse-1k TTFT p99 (ms)",
            get("sse-1k", "/ttft_ms/p99"),
            "< 100",
            |v| v < 100.0,
        ),
        // Issue #15: past the admission bound a stream is refused at
        // once (429/503); every other outcome is an error.
        check(
            "sse-10k errors other than refusals",
            get("sse-10k", "/errors").map(|e| e - refused_10k),
            "== 0",
            |v| v == 0.0,
        ),
        check(
            "sse-10k admitted streams completed / admitted",
            get("sse-10k", "/completed")
                .zip(get("sse-10k", "/streams"))
                .map(|(done, all)| {
                    let admitted = all - refused_10k;
                    if admitted > 0.0 { done / admitted } else { 0.0 }
                }),
            "== 1",
            |v| v >= 1.0,
        ),
        check(
            "sse-10k stretch (overall)",
            get("sse-10k", "/stretch_overall"),
            "<= 1.10",
            |v| v <= 1.10,
        ),
        check(
            "sse-10k refusals: time to the 503 p99 (ms)",
            get("sse-10k", "/refused_ms/p99")
                .filter(|_| get("sse-10k", "/refused_ms/count").is_some_and(|n| n > 0.0)),
            "<= 100",
            |v| v <= 100.0,
        ),
        check(
            "sse-10k refusals without Retry-After",
            get("sse-10k", "/refused_without_retry_after"),
            "== 0",
            |v| v == 0.0,
        ),
        check(
            "sse-10k server peak RSS (MiB)",
            peak("sse-10k"),
            "< 1024",
            |v| v < 1024.0,
        ),
        check(
            "footprint idle RSS (MiB)",
            fp("/idle_rss_mb"),
            "< 50",
            |v| v < 50.0,
        ),
        check(
            "footprint exec → /health (ms)",
            fp("/ready_ms"),
            "< 1000",
            |v| v < 1000.0,
        ),
    ];
    all.extend([
        check(
            "post-chat / db-ceiling-autocommit (#15)",
            post_over_autocommit,
            ">= 0.70",
            |v| v >= 0.70,
        ),
        check(
            "sse-burst 1000: TTFT p99 from the release / commit floor (#15)",
            burst_get(1000.0, "/ttft_from_release_ms/p99")
                .zip(autocommit_tps)
                .map(|(p99, tps)| p99 / floor_ms(1000.0, tps)),
            "<= 1.5",
            |v| v <= 1.5,
        ),
        check(
            "sse-burst 5000 errors (#15)",
            burst_get(5000.0, "/errors"),
            "== 0",
            |v| v == 0.0,
        ),
        check(
            "sse-burst 5000: TTFT p99 from the release (ms) (#15)",
            burst_get(5000.0, "/ttft_from_release_ms/p99"),
            "<= 1500",
            |v| v <= 1500.0,
        ),
        check(
            "sse-burst 5000 server peak RSS (MB) (#15)",
            burst(5000.0)
                .and_then(|f| f.usage.as_ref())
                .and_then(|u| u.pointer("/server_memory/rss_peak_mb"))
                .and_then(Value::as_f64)
                .map(|mib| mib * 1.048_576),
            "<= 200",
            |v| v <= 200.0,
        ),
        check(
            "sse-1k CPU per token event, current / baseline pooled (#15)",
            pooled_cpu_ratio(&cpu_runs(&docs)),
            "<= 0.50",
            |v| v <= 0.50,
        ),
    ]);
    if let Some(post) = light_load_modes(&docs)
        .into_iter()
        .find(|m| m.scenario == "light-load")
    {
        all.push(check(
            "light-load POST /chat p50, group commit on − off (ms) (#15)",
            Some(post.on.0 - post.off.0),
            "within ±1",
            |v| v.abs() <= 1.0,
        ));
    }
    all.extend(gateway_checks);
    all
}

fn ms(v: Option<&Value>) -> String {
    v.and_then(Value::as_f64)
        .map_or_else(|| "–".into(), |v| format!("{v:.1}"))
}

fn at<'a>(v: &'a Value, pointer: &str) -> Option<&'a Value> {
    v.pointer(pointer)
}

/// "srv 45% · cli 20% · pg 25% · redis 3% · irq 4% · other 2%" of the machine
/// (irq: interrupt/softirq time, mostly our loopback traffic; other: other
/// processes' time).
fn cpu_split(usage: Option<&Value>) -> String {
    let Some(cpu) = usage.and_then(|u| u.get("cpu")) else {
        return "–".into();
    };
    let cap = cpu["capacity_s"].as_f64().unwrap_or(0.0);
    if cap <= 0.0 {
        return "–".into();
    }
    let pct = |k: &str| cpu[k].as_f64().unwrap_or(0.0) / cap * 100.0;
    let mut parts = Vec::new();
    for (label, keys) in [
        ("srv", &["server_s"][..]),
        ("cli", &["client_s"][..]),
        ("pg", &["postgres_s", "postgres_shared_s"][..]),
        ("pgbench", &["pgbench_s"][..]),
        ("redis", &["redis_s"][..]),
        ("upstream", &["upstream_s"][..]),
        ("irq", &["interrupts_s"][..]),
        ("other", &["other_s"][..]),
    ] {
        let p: f64 = keys.iter().map(|k| pct(k)).sum();
        if p >= 0.5 || label == "other" {
            parts.push(format!("{label} {p:.0}%"));
        }
    }
    parts.join(" · ")
}

fn disturbed(usage: Option<&Value>) -> Option<f64> {
    let cpu = usage?.get("cpu")?;
    let share = cpu["other_s"].as_f64()? / cpu["capacity_s"].as_f64()?;
    (share > DISTURBED_SHARE).then_some(share)
}

fn scenarios(doc: &Value) -> Vec<&Value> {
    doc["scenarios"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default()
}

pub fn render(doc: &Value) -> String {
    let mut out = String::new();
    let run = &doc["run"];
    let _ = writeln!(
        out,
        "\n## confab benchmark {}{}\n",
        run["run_id"].as_str().unwrap_or(""),
        if run["quick"].as_bool() == Some(true) {
            " (--quick: smoke run, numbers not comparable)"
        } else {
            ""
        }
    );
    let all = scenarios(doc);
    let is = |f: &&Value, names: &[&str]| names.contains(&f["scenario"].as_str().unwrap_or(""));

    let http: Vec<&Value> = all
        .iter()
        .copied()
        .filter(|f| {
            is(
                f,
                &[
                    "post-chat",
                    "db-ceiling",
                    "db-ceiling-autocommit",
                    "list-chats",
                    "get-chat",
                    "embedded",
                    "light-load",
                ],
            )
        })
        .collect();
    if !http.is_empty() {
        let _ = writeln!(
            out,
            "| scenario | throughput | p50 ms | p95 ms | p99 ms | errors | CPU (share of the machine) |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---|");
        for f in http {
            let name = f["scenario"].as_str().unwrap_or("");
            let r = &f["result"];
            let usage = f.get("usage");
            let flag = disturbed(usage)
                .map(|s| format!(" ⚠ other load {:.0}%", s * 100.0))
                .unwrap_or_default();
            if name.starts_with("db-ceiling") {
                let _ = writeln!(
                    out,
                    "| {name} (pgbench, {} clients) | {:.0} tps | avg {} | | | {} failed | {}{flag} |",
                    r["clients"],
                    r["tps"].as_f64().unwrap_or(0.0),
                    ms(at(r, "/latency_avg_ms")),
                    r["failed"],
                    cpu_split(usage),
                );
            } else {
                let label = if name == "light-load" {
                    format!(", {}", f["label"].as_str().unwrap_or(""))
                } else {
                    String::new()
                };
                let clients = match r["concurrency"].as_u64() {
                    Some(1) => "1 client".to_owned(),
                    Some(n) => format!("{n} clients"),
                    None => format!("{} clients", r["concurrency"]),
                };
                let _ = writeln!(
                    out,
                    "| {name} ({clients}{label}) | {:.0} req/s | {} | {} | {} | {} | {}{flag} |",
                    r["requests_per_s"].as_f64().unwrap_or(0.0),
                    ms(at(r, "/latency_ms/p50")),
                    ms(at(r, "/latency_ms/p95")),
                    ms(at(r, "/latency_ms/p99")),
                    r["errors"],
                    cpu_split(usage),
                );
            }
        }
        let ratios = &doc["ratios"];
        let pct = |v: &Value| {
            v.as_f64()
                .map_or_else(|| "–".into(), |v| format!("{:.0}%", v * 100.0))
        };
        let _ = write!(out, "{}", light_load(&all));
        let _ = writeln!(
            out,
            "\npost-chat / db-ceiling = {} (target ≥ 50%); post-chat / db-ceiling-autocommit = {}; embedded / post-chat = {}\n",
            pct(&ratios["post_chat_over_db_ceiling"]),
            pct(&ratios["post_chat_over_db_ceiling_autocommit"]),
            pct(&ratios["embedded_over_post_chat"]),
        );
    }

    let streams: Vec<&Value> = all
        .iter()
        .copied()
        .filter(|f| {
            is(
                f,
                &[
                    "sse-1k",
                    "sse-1k-current",
                    "sse-1k-baseline",
                    "sse-burst",
                    "sse-10k",
                    "light-load-stream",
                ],
            )
        })
        .collect();
    if !streams.is_empty() {
        let _ = writeln!(
            out,
            "| scenario | done / streams | max open | TTFT p50 ms | TTFT p99 ms | floor ms | TTFT − model's 1st delay p50 · p99 | stretch (all · p50 · p99) | gap p99 ms (planned mean) | errors | server peak RSS MiB | CPU |"
        );
        let _ = writeln!(
            out,
            "|---|---:|---:|---:|---:|---:|---|---|---|---:|---:|---|"
        );
        // The commit floor: the two-commit ceiling (issue #15).
        let ceiling = all
            .iter()
            .find(|f| f["scenario"] == "db-ceiling-autocommit")
            .and_then(|f| f["result"]["tps"].as_f64());
        for f in streams.iter().copied() {
            let r = &f["result"];
            let burst = f["scenario"] == "sse-burst";
            let ttft = if burst {
                "/ttft_from_release_ms"
            } else {
                "/ttft_ms"
            };
            let floor = if burst {
                ceiling
                    .zip(r["streams"].as_f64())
                    .map_or_else(|| "–".into(), |(tps, n)| format!("{:.0}", floor_ms(n, tps)))
            } else {
                String::new()
            };
            let errors = r["error_kinds"]
                .as_object()
                .filter(|k| !k.is_empty())
                .map(|k| {
                    let kinds: Vec<String> = k.iter().map(|(k, v)| format!("{k}: {v}")).collect();
                    format!(" ({})", kinds.join(", "))
                })
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "| {} {} | {} / {} | {} | {} | {} | {} | {} · {} | {:.3} · {:.3} · {:.3} | {} ({:.0}) | {}{} | {} | {} |",
                f["scenario"].as_str().unwrap_or(""),
                f["label"].as_str().unwrap_or(""),
                r["completed"],
                r["streams"],
                r["max_concurrent"],
                ms(at(r, &format!("{ttft}/p50"))),
                ms(at(r, &format!("{ttft}/p99"))),
                floor,
                ms(at(r, "/ttft_over_model_ms/p50")),
                ms(at(r, "/ttft_over_model_ms/p99")),
                r["stretch_overall"].as_f64().unwrap_or(0.0),
                r["stretch"]["p50"].as_f64().unwrap_or(0.0),
                r["stretch"]["p99"].as_f64().unwrap_or(0.0),
                ms(at(r, "/gap_ms/p99")),
                r["planned_gap_ms"].as_f64().unwrap_or(0.0),
                r["errors"],
                errors,
                ms(f.pointer("/usage/server_memory/rss_peak_mb")),
                cpu_split(f.get("usage")),
            );
        }
        for f in streams.iter().copied() {
            let r = &f["result"];
            let n = r
                .pointer("/refused_ms/count")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            if n == 0 {
                continue;
            }
            let _ = writeln!(
                out,
                "{} {}: {n} refused (429/503), send → refusal p50 {} · p99 {} · max {} ms, {} without Retry-After",
                f["scenario"].as_str().unwrap_or(""),
                f["label"].as_str().unwrap_or(""),
                ms(at(r, "/refused_ms/p50")),
                ms(at(r, "/refused_ms/p99")),
                ms(at(r, "/refused_ms/max")),
                r["refused_without_retry_after"],
            );
        }
        let _ = writeln!(out);
    }

    if !streams.is_empty() {
        let _ = writeln!(
            out,
            "| scenario | token events | streams | server CPU s | server CPU per token event µs | per stream ms |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|");
        for f in &streams {
            let Some((cpu, tokens, n)) = cpu_of(f) else {
                continue;
            };
            let name = f["scenario"].as_str().unwrap_or("");
            let _ = writeln!(
                out,
                "| {name} {} | {tokens:.0} | {n:.0} | {cpu:.2} | {:.1} | {:.2} |",
                f["label"].as_str().unwrap_or(""),
                cpu / tokens * 1e6,
                cpu / n * 1e3,
            );
        }
        let _ = write!(out, "{}", baseline_ratios(&cpu_runs(&streams)));
        let _ = writeln!(out);
    }

    let gateway: Vec<&Value> = all
        .iter()
        .copied()
        .filter(|f| is(f, &["gateway"]))
        .collect();
    if !gateway.is_empty() {
        let _ = writeln!(
            out,
            "| gateway (same client, same upstream) | done / streams | streams/s | TTFT p50 ms | TTFT p99 ms | added TTFT p50 · p99 ms | errors | server peak RSS MiB | CPU |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---|---:|---:|---|");
        let ratios = doc["ratios"]["gateway"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for f in gateway {
            let r = &f["result"];
            let target = f["params"]["target"].as_str().unwrap_or("");
            let c = &f["params"]["concurrency"];
            let pace = f["params"]["pace_ms"].as_u64();
            let level = ratios
                .iter()
                .find(|l| &l["concurrency"] == c && l["pace_ms"].as_u64() == pace);
            let added = match (target, level) {
                ("direct", _) => "(baseline)".to_owned(),
                (t, Some(l)) => format!(
                    "{} · {}",
                    ms(l.get(format!("{t}_added_ttft_p50_ms").as_str())),
                    ms(l.get(format!("{t}_added_ttft_p99_ms").as_str()))
                ),
                _ => "–".into(),
            };
            let errors = r["error_kinds"]
                .as_object()
                .filter(|k| !k.is_empty())
                .map(|k| {
                    let kinds: Vec<String> = k.iter().map(|(k, v)| format!("{k}: {v}")).collect();
                    format!(" ({})", kinds.join(", "))
                })
                .unwrap_or_default();
            let flag = disturbed(f.get("usage"))
                .map(|s| format!(" ⚠ other load {:.0}%", s * 100.0))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "| {} | {} / {} | {:.0} | {} | {} | {added} | {}{errors} | {} | {}{flag} |",
                f["label"].as_str().unwrap_or(""),
                r["completed"],
                r["streams"],
                r["completed_per_s"].as_f64().unwrap_or(0.0),
                ms(at(r, "/ttft_ms/p50")),
                ms(at(r, "/ttft_ms/p99")),
                r["errors"],
                ms(f.pointer("/usage/server_memory/rss_peak_mb")),
                cpu_split(f.get("usage")),
            );
        }
        for l in &ratios {
            let x = |k: &str| {
                l[k].as_f64()
                    .map_or_else(|| "–".into(), |v| format!("{v:.2}×"))
            };
            let _ = writeln!(
                out,
                "\n{} concurrent: confab / LiteLLM streams/s = {}; confab / direct = {}; LiteLLM / direct = {}",
                gateway_level_name(l),
                x("confab_over_litellm_streams_per_s"),
                x("confab_over_direct_streams_per_s"),
                x("litellm_over_direct_streams_per_s"),
            );
        }
        let _ = writeln!(out);
    }

    let starts: Vec<&Value> = all
        .iter()
        .copied()
        .filter(|f| is(f, &["footprint"]))
        .collect();
    if !starts.is_empty() {
        let _ = writeln!(
            out,
            "| footprint | exec → first /health 200 (ms) | RSS at ready MiB | idle RSS (1 s later) MiB | threads |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|");
        for f in starts {
            let r = &f["result"];
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} |",
                f["label"].as_str().unwrap_or(""),
                ms(r.get("ready_ms")),
                ms(r.get("rss_at_ready_mb")),
                ms(r.get("idle_rss_mb")),
                r["threads"],
            );
        }
        let _ = writeln!(out);
    }

    if let Some(targets) = doc["targets"].as_array() {
        let _ = writeln!(out, "| target | goal | value | met |");
        let _ = writeln!(out, "|---|---|---:|---|");
        for t in targets {
            let value = t["value"]
                .as_f64()
                .map_or_else(|| "–".into(), |v| format!("{v:.3}"));
            let met = match t["met"].as_bool() {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "–",
            };
            let _ = writeln!(
                out,
                "| {} | {} | {value} | {met} |",
                t["target"].as_str().unwrap_or(""),
                t["goal"].as_str().unwrap_or(""),
            );
        }
    }
    out
}

/// One client at a time, group commit on against off: each mode's p50 and
/// p99 averaged over its rounds (see [`light_load_modes`]).
struct LightLoad {
    scenario: &'static str,
    what: &'static str,
    on: (f64, f64),
    off: (f64, f64),
}

/// `light-load` (POST /chat latency) and `light-load-stream` (what the
/// service adds to the time to first token), where both modes ran.
fn light_load_modes(all: &[&Value]) -> Vec<LightLoad> {
    let mut modes = Vec::new();
    for (scenario, pointer, what) in [
        ("light-load", "/latency_ms", "POST /chat latency"),
        (
            "light-load-stream",
            "/ttft_over_model_ms",
            "stream TTFT − the model's first delay",
        ),
    ] {
        let mean = |mode: &str, q: &str| {
            let values: Vec<f64> = all
                .iter()
                .filter(|f| f["scenario"] == scenario)
                .filter(|f| {
                    f["label"]
                        .as_str()
                        .is_some_and(|l| l.starts_with(&format!("group commit {mode} ")))
                })
                .filter_map(|f| f["result"].pointer(&format!("{pointer}/{q}"))?.as_f64())
                .collect();
            (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
        };
        if let (Some(on50), Some(on99), Some(off50), Some(off99)) = (
            mean("on", "p50"),
            mean("on", "p99"),
            mean("off", "p50"),
            mean("off", "p99"),
        ) {
            modes.push(LightLoad {
                scenario,
                what,
                on: (on50, on99),
                off: (off50, off99),
            });
        }
    }
    modes
}

fn light_load(all: &[&Value]) -> String {
    let mut out = String::new();
    for m in light_load_modes(all) {
        let _ = writeln!(
            out,
            "\n{}, one client ({}, mean over the rounds): group commit on p50 {:.2} · p99 {:.2} ms, off p50 {:.2} · p99 {:.2} ms; on − off: p50 {:+.2} ms, p99 {:+.2} ms (issue #15: ±1 ms)",
            m.scenario,
            m.what,
            m.on.0,
            m.on.1,
            m.off.0,
            m.off.1,
            m.on.0 - m.off.0,
            m.on.1 - m.off.1,
        );
    }
    out
}

/// A streaming fragment's server CPU (s), token events and streams.
fn cpu_of(f: &Value) -> Option<(f64, f64, f64)> {
    let r = &f["result"];
    let num = |p: &str| r.pointer(p).and_then(Value::as_f64);
    let tokens = num("/tokens_per_s")
        .zip(num("/wall_s"))
        .map(|(t, w)| t * w)?;
    let cpu = f.pointer("/usage/cpu/server_s").and_then(Value::as_f64)?;
    let n = r["streams"].as_f64()?;
    (tokens > 0.0 && n > 0.0).then_some((cpu, tokens, n))
}

/// Σ CPU ÷ Σ token events and ÷ Σ streams over some runs.
fn pooled(runs: &[(f64, f64, f64)]) -> (f64, f64) {
    let (cpu, tokens, n) = runs
        .iter()
        .fold((0.0, 0.0, 0.0), |a, r| (a.0 + r.0, a.1 + r.1, a.2 + r.2));
    (cpu / tokens, cpu / n)
}

/// Server CPU, token events and streams of each streaming scenario's runs,
/// in the order they ran.
fn cpu_runs(all: &[&Value]) -> BTreeMap<String, Vec<(f64, f64, f64)>> {
    let mut runs: BTreeMap<String, Vec<(f64, f64, f64)>> = BTreeMap::new();
    for f in all {
        if let (Some(name), Some(run)) = (f["scenario"].as_str(), cpu_of(f)) {
            runs.entry(name.to_owned()).or_default().push(run);
        }
    }
    runs
}

/// The current binary's CPU per token event over the baseline's, pooled
/// over the rounds on fresh databases (`sse-1k-current` ÷ `sse-1k-baseline`).
fn pooled_cpu_ratio(runs: &BTreeMap<String, Vec<(f64, f64, f64)>>) -> Option<f64> {
    let now = runs.get("sse-1k-current").filter(|r| !r.is_empty())?;
    let base = runs.get("sse-1k-baseline").filter(|r| !r.is_empty())?;
    Some(pooled(now).0 / pooled(base).0)
}

/// The commit floor of `streams` new turns: their commits alone at the
/// two-commit ceiling's rate (issue #15), in ms.
fn floor_ms(streams: f64, tps: f64) -> f64 {
    streams / tps * 1000.0
}

/// CPU per token event and per stream of the current binary over the
/// baseline's (`sse-1k-current` ÷ `sse-1k-baseline`, fresh databases): each
/// round's, then pooled over the rounds (Σ CPU ÷ Σ tokens on each side), then
/// the sse-1k that ran after the other scenarios over the pooled baseline.
fn baseline_ratios(runs: &BTreeMap<String, Vec<(f64, f64, f64)>>) -> String {
    let mut out = String::new();
    let Some(base) = runs.get("sse-1k-baseline").filter(|b| !b.is_empty()) else {
        return out;
    };
    let goal = "(issue #15 goal ≤ 0.50)";
    let current = runs.get("sse-1k-current").map_or(&[][..], Vec::as_slice);
    for (i, (now, then)) in current.iter().zip(base).enumerate() {
        let _ = writeln!(
            out,
            "\nsse-1k-current / sse-1k-baseline, round {} (same run, both on fresh databases): CPU per token event {:.2}, per stream {:.2} {goal}",
            i + 1,
            (now.0 / now.1) / (then.0 / then.1),
            (now.0 / now.2) / (then.0 / then.2),
        );
    }
    let base_pooled = pooled(base);
    if !current.is_empty() {
        let now = pooled(current);
        let _ = writeln!(
            out,
            "\nsse-1k-current / sse-1k-baseline, pooled ({} and {} runs): CPU per token event {:.2}, per stream {:.2} {goal}",
            current.len(),
            base.len(),
            now.0 / base_pooled.0,
            now.1 / base_pooled.1,
        );
    }
    if let Some(first) = runs.get("sse-1k").and_then(|r| r.first()) {
        let _ = writeln!(
            out,
            "\nsse-1k / sse-1k-baseline pooled (the current binary's first sse-1k, after any scenario before it): CPU per token event {:.2}, per stream {:.2} {goal}",
            (first.0 / first.1) / base_pooled.0,
            (first.0 / first.2) / base_pooled.1,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn baseline_ratios_pair_rounds_and_pool_them() {
        let mut runs = BTreeMap::new();
        // (CPU s, token events, streams)
        runs.insert(
            "sse-1k-current".to_owned(),
            vec![(10.0, 1_000_000.0, 20_000.0), (12.0, 1_000_000.0, 20_000.0)],
        );
        runs.insert(
            "sse-1k-baseline".to_owned(),
            vec![(20.0, 1_000_000.0, 20_000.0), (24.0, 800_000.0, 16_000.0)],
        );
        let text = baseline_ratios(&runs);
        assert!(text.contains("round 1 (same run, both on fresh databases): CPU per token event 0.50, per stream 0.50"), "{text}");
        assert!(text.contains("round 2 (same run, both on fresh databases): CPU per token event 0.40, per stream 0.40"), "{text}");
        // Pooled: 22 / 2,000,000 over 44 / 1,800,000.
        assert!(
            text.contains("pooled (2 and 2 runs): CPU per token event 0.45, per stream 0.45"),
            "{text}"
        );
        assert!(baseline_ratios(&BTreeMap::new()).is_empty());
    }

    #[test]
    fn http_rows_name_their_clients_in_the_right_number() {
        let row = |scenario: &str, label: &str, concurrency: u64| {
            json!({ "scenario": scenario, "label": label,
                    "result": { "concurrency": concurrency, "requests_per_s": 100.0, "errors": 0 } })
        };
        let doc = json!({ "run": { "run_id": "r" }, "scenarios": [
            row("post-chat", "", 64),
            row("light-load", "group commit on (round 1)", 1),
        ] });
        let text = render(&doc);
        assert!(text.contains("| post-chat (64 clients) |"), "{text}");
        assert!(
            text.contains("| light-load (1 client, group commit on (round 1)) |"),
            "{text}"
        );
    }

    #[test]
    fn light_load_compares_the_modes_over_their_rounds() {
        let frag = |scenario: &str, label: &str, p50: f64, p99: f64| {
            let key = if scenario == "light-load" {
                "latency_ms"
            } else {
                "ttft_over_model_ms"
            };
            json!({ "scenario": scenario, "label": label, "result": { key: { "p50": p50, "p99": p99 } } })
        };
        let frags = [
            frag("light-load", "group commit on (round 1)", 3.0, 5.0),
            frag("light-load", "group commit off (round 1)", 2.5, 4.0),
            frag("light-load", "group commit off (round 2)", 2.5, 6.0),
            frag("light-load", "group commit on (round 2)", 4.0, 7.0),
            frag("light-load-stream", "group commit on (round 1)", 1.0, 2.0),
        ];
        let all: Vec<&Value> = frags.iter().collect();
        let text = light_load(&all);
        assert!(
            text.contains("group commit on p50 3.50 · p99 6.00 ms, off p50 2.50 · p99 5.00 ms; on − off: p50 +1.00 ms, p99 +1.00 ms"),
            "{text}"
        );
        // A scenario with one mode only gives no comparison.
        assert!(!text.contains("light-load-stream"), "{text}");
    }

    #[test]
    fn targets_count_refusals_apart_from_errors_and_use_the_two_commit_floor() {
        let fragment = |scenario: &str, result: Value| Fragment {
            scenario: scenario.to_owned(),
            label: String::new(),
            finished_at: String::new(),
            params: json!({}),
            result,
            usage: None,
            server_metrics: None,
        };
        let fragments = [
            fragment(
                "sse-10k",
                json!({ "errors": 5000, "completed": 5000, "streams": 10000,
                        "refused_ms": { "count": 5000, "p99": 3.0 } }),
            ),
            fragment(
                "sse-burst",
                json!({ "streams": 1000, "errors": 0, "ttft_from_release_ms": { "p99": 450.0 } }),
            ),
        ];
        let targets = targets(&fragments, None, None, Some(2000.0));
        let value = |name: &str| {
            targets
                .iter()
                .find(|t| t["target"] == name)
                .map(|t| (t["value"].as_f64(), t["met"].as_bool()))
        };
        assert_eq!(
            value("sse-10k errors other than refusals"),
            Some((Some(0.0), Some(true)))
        );
        assert_eq!(
            value("sse-10k admitted streams completed / admitted"),
            Some((Some(1.0), Some(true)))
        );
        // Floor: 1,000 ÷ 2,000 tps = 500 ms; 450 ms is 0.9 of it.
        assert_eq!(
            value("sse-burst 1000: TTFT p99 from the release / commit floor (#15)"),
            Some((Some(0.9), Some(true)))
        );
        // Not measured: no verdict.
        assert_eq!(value("sse-burst 5000 errors (#15)"), Some((None, None)));
    }
}
