//! Prometheus metrics (SPEC §7). Labels are route templates and small fixed
//! sets only — never tenant ids, never raw paths — so cardinality is bounded.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The route label of every request that matched no route.
pub const UNMATCHED_ROUTE: &str = "unmatched";

const HTTP_BUCKETS_MS: [f64; 10] = [
    5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
];
const FAST_BUCKETS_MS: [f64; 12] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 1000.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub method: String,
    pub route: String,
    pub status_code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub method: String,
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabels {
    pub delivery: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RateLimitLabels {
    pub backend: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DependencyLabels {
    pub dependency: &'static str,
}

/// Model names are configuration, a bounded set: fine as labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelOutcomeLabels {
    pub model: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelKindLabels {
    pub model: String,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BudgetLabels {
    pub event: &'static str,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelReasonLabels {
    pub model: String,
    pub reason: &'static str,
}

const TTFT_BUCKETS_MS: [f64; 12] = [
    10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0,
];

fn ttft_histogram() -> Histogram {
    Histogram::new(TTFT_BUCKETS_MS)
}

pub struct Metrics {
    registry: Registry,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_duration: Family<HttpLabels, Histogram, fn() -> Histogram>,
    pub http_in_progress: Family<RouteLabels, Gauge>,
    pub streams_active: Gauge,
    pub stream_ttft: Histogram,
    pub stream_tokens: Counter,
    pub stream_outcomes: Family<OutcomeLabels, Counter>,
    pub stream_disconnect_detection: Histogram,
    pub stream_flush_duration: Histogram,
    pub stream_flush_rows: Counter,
    pub stream_flush_errors: Counter,
    pub streams_recovered: Counter,
    pub stream_resumes: Family<SourceLabels, Counter>,
    pub stream_replayed_events: Counter,
    pub stream_relay_deliveries: Counter,
    pub stream_relay_started: Counter,
    pub stream_detached: Counter,
    pub stream_relay_errors: Family<OpLabels, Counter>,
    pub stream_cancels: Family<DeliveryLabels, Counter>,
    pub ratelimit_decisions: Family<RateLimitLabels, Counter>,
    pub ratelimit_duration: Histogram,
    pub auth_failures: Family<ReasonLabels, Counter>,
    pub lingering_closes: Family<ReasonLabels, Counter>,
    pub auth_cache_hits: Counter,
    pub auth_cache_misses: Counter,
    pub auth_cache_stale: Counter,
    pub auth_cache_refresh_errors: Counter,
    pub idempotent_replays: Counter,
    pub llm_requests: Family<ModelOutcomeLabels, Counter>,
    pub llm_ttft: Family<ModelLabels, Histogram, fn() -> Histogram>,
    pub llm_tokens: Family<ModelKindLabels, Counter>,
    pub llm_retries: Family<ModelReasonLabels, Counter>,
    pub budget_tokens: Family<BudgetLabels, Counter>,
    pub budget_steps: Family<BudgetLabels, Counter>,
    pub dependency_up: Family<DependencyLabels, Gauge>,
    pub turns_in_flight: Gauge,
    pub turns_max_concurrent: Gauge,
    pub turns_refused: Family<ReasonLabels, Counter>,
    pub final_writes_deferred: Family<OutcomeLabels, Counter>,
}

fn http_histogram() -> Histogram {
    Histogram::new(HTTP_BUCKETS_MS)
}

impl Metrics {
    /// Also export `store`'s group-commit counters.
    pub fn watch_store(&mut self, store: std::sync::Arc<dyn confab_core::Store>) {
        self.registry
            .register_collector(Box::new(GroupCommitCollector(store)));
    }

    pub fn new() -> Self {
        let mut registry = Registry::default();
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests served, by method, route template and status",
            http_requests.clone(),
        );
        let http_duration: Family<HttpLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(http_histogram);
        registry.register(
            "http_request_duration_ms",
            "HTTP request duration in milliseconds (until the response head for streams)",
            http_duration.clone(),
        );
        let http_in_progress = Family::<RouteLabels, Gauge>::default();
        registry.register(
            "http_requests_in_progress",
            "HTTP requests being served",
            http_in_progress.clone(),
        );

        let streams_active = Gauge::default();
        registry.register(
            "sse_active_streams",
            "Streaming replies in progress",
            streams_active.clone(),
        );
        let stream_ttft = Histogram::new(HTTP_BUCKETS_MS);
        registry.register(
            "sse_time_to_first_token_ms",
            "Time from request to the first token event, in milliseconds",
            stream_ttft.clone(),
        );
        let stream_tokens = Counter::default();
        registry.register(
            "sse_tokens_streamed",
            "Token events sent to clients",
            stream_tokens.clone(),
        );
        let stream_outcomes = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "sse_streams",
            "Finished streams by outcome: complete, cancelled (client went away), failed, interrupted",
            stream_outcomes.clone(),
        );
        let stream_disconnect_detection = Histogram::new(FAST_BUCKETS_MS);
        registry.register(
            "sse_disconnect_detection_ms",
            "Time from a client's disconnect being noticed to generation stopping, in milliseconds",
            stream_disconnect_detection.clone(),
        );
        let stream_flush_duration = Histogram::new(FAST_BUCKETS_MS);
        registry.register(
            "sse_flush_duration_ms",
            "Time to save the partial replies of one flush (all its batches), in milliseconds",
            stream_flush_duration.clone(),
        );
        let stream_flush_rows = Counter::default();
        registry.register(
            "sse_flush_rows",
            "Partial replies saved by the flusher",
            stream_flush_rows.clone(),
        );
        let stream_flush_errors = Counter::default();
        registry.register(
            "sse_flush_errors",
            "Flushes of partial replies that failed (the rest is saved on the next tick)",
            stream_flush_errors.clone(),
        );
        let streams_recovered = Counter::default();
        registry.register(
            "sse_streams_recovered",
            "Streaming messages of dead processes marked interrupted",
            streams_recovered.clone(),
        );

        let stream_resumes = Family::<SourceLabels, Counter>::default();
        registry.register(
            "sse_resumes",
            "Resumed streams (GET /chat/{chat_id}/messages/{message_id}/stream) by source: stored, local, relay, database",
            stream_resumes.clone(),
        );
        let stream_replayed_events = Counter::default();
        registry.register(
            "sse_replayed_events",
            "Events sent to resumed streams that were generated before the reader came back",
            stream_replayed_events.clone(),
        );
        let stream_relay_deliveries = Counter::default();
        registry.register(
            "sse_relay_deliveries",
            "Events of a generation on another instance delivered through Redis",
            stream_relay_deliveries.clone(),
        );
        let stream_relay_started = Counter::default();
        registry.register(
            "sse_relay_started",
            "Generations of this instance whose events began to go through Redis because a reader on another instance followed",
            stream_relay_started.clone(),
        );
        let stream_detached = Counter::default();
        registry.register(
            "sse_detached",
            "Generations that lost their last reader and went on waiting for one (STREAM_DETACH_SECONDS)",
            stream_detached.clone(),
        );
        let stream_relay_errors = Family::<OpLabels, Counter>::default();
        registry.register(
            "sse_relay_errors",
            "Failed steps of the cross-instance stream relay by op: publish, read, cancel, watch",
            stream_relay_errors.clone(),
        );
        let stream_cancels = Family::<DeliveryLabels, Counter>::default();
        registry.register(
            "sse_cancels",
            "Cancel requests by delivery: local, relay, finished (nothing to stop)",
            stream_cancels.clone(),
        );

        let ratelimit_decisions = Family::<RateLimitLabels, Counter>::default();
        registry.register(
            "ratelimit_decisions",
            "Rate-limit decisions by backend and outcome: allowed, limited, error",
            ratelimit_decisions.clone(),
        );
        let ratelimit_duration = Histogram::new(FAST_BUCKETS_MS);
        registry.register(
            "ratelimit_duration_ms",
            "Time to take a rate-limit decision, in milliseconds",
            ratelimit_duration.clone(),
        );
        let auth_failures = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "auth_failures",
            "Refused authentications by reason",
            auth_failures.clone(),
        );
        let lingering_closes = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "http_lingering_closes",
            "Connections closed after a lingering close, by how it ended: client (the client closed), bytes or time (the bound was reached: the client may see a reset), error",
            lingering_closes.clone(),
        );
        let auth_cache_hits = Counter::default();
        registry.register(
            "auth_cache_hits",
            "Principals served from the auth cache",
            auth_cache_hits.clone(),
        );
        let auth_cache_misses = Counter::default();
        registry.register(
            "auth_cache_misses",
            "Principals looked up in the database",
            auth_cache_misses.clone(),
        );
        let auth_cache_stale = Counter::default();
        registry.register(
            "auth_cache_stale",
            "Principals served past AUTH_CACHE_TTL_SECONDS while their refresh ran or the database could not answer",
            auth_cache_stale.clone(),
        );
        let auth_cache_refresh_errors = Counter::default();
        registry.register(
            "auth_cache_refresh_errors",
            "Background refreshes of cached principals that failed (the stale entry stays until its grace ends)",
            auth_cache_refresh_errors.clone(),
        );
        let idempotent_replays = Counter::default();
        registry.register(
            "idempotent_replays",
            "POST /chat requests answered from a stored Idempotency-Key response",
            idempotent_replays.clone(),
        );
        let llm_requests = Family::<ModelOutcomeLabels, Counter>::default();
        registry.register(
            "llm_requests",
            "Upstream model attempts by model and outcome (ok, cancelled, or the failure kind)",
            llm_requests.clone(),
        );
        let llm_ttft: Family<ModelLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(ttft_histogram);
        registry.register(
            "llm_time_to_first_token_ms",
            "Time from the start of the successful upstream attempt to its first token, in milliseconds",
            llm_ttft.clone(),
        );
        let llm_tokens = Family::<ModelKindLabels, Counter>::default();
        registry.register(
            "llm_tokens",
            "Tokens of finished turns by model and kind (prompt, completion)",
            llm_tokens.clone(),
        );
        let llm_retries = Family::<ModelReasonLabels, Counter>::default();
        registry.register(
            "llm_retries",
            "Upstream attempts retried, by model and the failure that caused it",
            llm_retries.clone(),
        );
        let budget_tokens = Family::<BudgetLabels, Counter>::default();
        registry.register(
            "token_budget_tokens",
            "Tokens of token-budget steps by event (reserved, settled, refused, error) and limit kind",
            budget_tokens.clone(),
        );
        let budget_steps = Family::<BudgetLabels, Counter>::default();
        registry.register(
            "token_budget_steps",
            "Token-budget steps by event (reserved, settled, refused, error) and limit kind",
            budget_steps.clone(),
        );
        let dependency_up = Family::<DependencyLabels, Gauge>::default();
        registry.register(
            "dependency_up",
            "1 when the last readiness probe reached the dependency (database, redis), else 0",
            dependency_up.clone(),
        );
        let turns_in_flight = Gauge::default();
        registry.register(
            "turns_in_flight",
            "Turns running now (streams, POST /chat and /v1 together), bounded by MAX_CONCURRENT_STREAMS",
            turns_in_flight.clone(),
        );
        let turns_max_concurrent = Gauge::default();
        registry.register(
            "turns_max_concurrent",
            "The bound on concurrent turns (MAX_CONCURRENT_STREAMS)",
            turns_max_concurrent.clone(),
        );
        let turns_refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "turns_refused",
            "Turns refused with 503 before they began: capacity (the concurrent-turn bound) or database (no connection within DB_ACQUIRE_TIMEOUT_MS, or down)",
            turns_refused.clone(),
        );
        let final_writes_deferred = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "turn_final_writes_deferred",
            "Final writes of turns (the reply, its usage and ledger row) that failed for a database outage and are written once it is back: deferred, then saved or lost",
            final_writes_deferred.clone(),
        );
        registry.register_collector(Box::new(ProcessCollector));

        Self {
            registry,
            http_requests,
            http_duration,
            http_in_progress,
            streams_active,
            stream_ttft,
            stream_tokens,
            stream_outcomes,
            stream_disconnect_detection,
            stream_flush_duration,
            stream_flush_rows,
            stream_flush_errors,
            streams_recovered,
            stream_resumes,
            stream_replayed_events,
            stream_relay_deliveries,
            stream_relay_started,
            stream_detached,
            stream_relay_errors,
            stream_cancels,
            ratelimit_decisions,
            ratelimit_duration,
            auth_failures,
            lingering_closes,
            auth_cache_hits,
            auth_cache_misses,
            auth_cache_stale,
            auth_cache_refresh_errors,
            idempotent_replays,
            llm_requests,
            llm_ttft,
            llm_tokens,
            llm_retries,
            budget_tokens,
            budget_steps,
            dependency_up,
            turns_in_flight,
            turns_max_concurrent,
            turns_refused,
            final_writes_deferred,
        }
    }

    /// Record a readiness probe's result for `dependency`.
    pub fn set_dependency_up(&self, dependency: &'static str, up: bool) {
        self.dependency_up
            .get_or_create(&DependencyLabels { dependency })
            .set(i64::from(up));
    }

    /// The exposition in the OpenMetrics text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::with_capacity(16 * 1024);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }

    /// The exposition in the classic Prometheus text format (0.0.4), which
    /// the original service served and older scrapers expect.
    pub fn encode_prometheus(&self) -> Result<String, std::fmt::Error> {
        Ok(openmetrics_to_prometheus(&self.encode()?))
    }
}

/// What the turn engine reports. The `sse_*` families count streams only
/// (`POST /chat/stream`); the `llm_*` families count every turn.
impl confab_core::turn::TurnMetrics for Metrics {
    fn turn_started(&self, interactive: bool) {
        if interactive {
            self.streams_active.inc();
        }
    }

    fn turn_finished(&self, interactive: bool, outcome: confab_core::turn::Outcome) {
        if interactive {
            self.streams_active.dec();
            self.stream_outcomes
                .get_or_create(&OutcomeLabels {
                    outcome: outcome.as_str(),
                })
                .inc();
        }
    }

    fn token_forwarded(&self, interactive: bool) {
        if interactive {
            self.stream_tokens.inc();
        }
    }

    fn first_token(&self, interactive: bool, _model: &str, since_request: std::time::Duration) {
        if interactive {
            self.stream_ttft.observe(ms(since_request));
        }
    }

    fn upstream_first_token(&self, model: &str, since_attempt: std::time::Duration) {
        self.llm_ttft
            .get_or_create(&ModelLabels {
                model: model.to_owned(),
            })
            .observe(ms(since_attempt));
    }

    fn generation_detached(&self) {
        self.stream_detached.inc();
    }

    fn relay_error(&self, op: &'static str) {
        self.stream_relay_errors
            .get_or_create(&OpLabels { op })
            .inc();
    }

    fn relay_started(&self) {
        self.stream_relay_started.inc();
    }

    fn disconnect_detected(&self, elapsed: std::time::Duration) {
        self.stream_disconnect_detection.observe(ms(elapsed));
    }

    fn upstream_request(&self, model: &str, outcome: &'static str) {
        self.llm_requests
            .get_or_create(&ModelOutcomeLabels {
                model: model.to_owned(),
                outcome,
            })
            .inc();
    }

    fn upstream_retry(&self, model: &str, reason: &'static str) {
        self.llm_retries
            .get_or_create(&ModelReasonLabels {
                model: model.to_owned(),
                reason,
            })
            .inc();
    }

    fn usage(&self, model: &str, prompt: u64, completion: u64) {
        for (kind, n) in [("prompt", prompt), ("completion", completion)] {
            self.llm_tokens
                .get_or_create(&ModelKindLabels {
                    model: model.to_owned(),
                    kind,
                })
                .inc_by(n);
        }
    }

    fn budget(&self, event: &'static str, kind: &'static str, tokens: u64) {
        let labels = BudgetLabels { event, kind };
        self.budget_steps.get_or_create(&labels).inc();
        self.budget_tokens.get_or_create(&labels).inc_by(tokens);
    }

    fn flushed(&self, rows: u64, took: std::time::Duration) {
        self.stream_flush_rows.inc_by(rows);
        self.stream_flush_duration.observe(ms(took));
    }

    fn flush_failed(&self, rows: u64, took: std::time::Duration) {
        self.stream_flush_rows.inc_by(rows);
        self.stream_flush_errors.inc();
        self.stream_flush_duration.observe(ms(took));
    }

    fn final_write_deferred(&self, outcome: &'static str) {
        self.final_writes_deferred
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    fn turn_refused(&self, _interactive: bool, reason: &'static str) {
        self.turns_refused
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    fn admission(&self, admitted: bool) {
        if admitted {
            self.turns_in_flight.inc();
        } else {
            self.turns_in_flight.dec();
        }
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// OpenMetrics → Prometheus 0.0.4 text. prometheus-client only writes
/// OpenMetrics; the two differ, for what it emits, in three ways: counter
/// families are named without `_total` in `# TYPE`/`# HELP` (samples carry
/// it), `# UNIT` lines, and the closing `# EOF`.
pub fn openmetrics_to_prometheus(text: &str) -> String {
    let counters: std::collections::HashSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# TYPE ", "# HELP "]
            .iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (*p, rest)));
        if let Some((prefix, rest)) = meta {
            let name = rest.split(' ').next().unwrap_or("");
            if counters.contains(name) {
                out.push_str(prefix);
                out.push_str(name);
                out.push_str("_total");
                out.push_str(&rest[name.len()..]);
                out.push('\n');
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Process memory and CPU, read from `/proc/self` at scrape time.
///
/// Hand-written because prometheus-client has no process collector and the
/// crates that do pull in far more than two small files' worth of parsing.
/// On systems without `/proc` the metrics are simply absent.
#[derive(Debug)]
struct ProcessCollector;

const CLOCK_TICKS_PER_SECOND: f64 = 100.0;
const PAGE_SIZE_BYTES: u64 = 4096;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
            return Ok(());
        };
        // Fields after the parenthesised command name, which may contain spaces.
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            return Ok(());
        };
        let fields: Vec<&str> = after.split_whitespace().collect();
        // utime and stime are the 14th and 15th fields of the line (index 11, 12 here),
        // rss in pages the 24th (index 21).
        let num = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let cpu_seconds = (num(11) + num(12)) as f64 / CLOCK_TICKS_PER_SECOND;
        let rss_bytes = num(21) * PAGE_SIZE_BYTES;
        let threads = num(17);

        let cpu = ConstCounter::new(cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "User and system CPU time spent, in seconds",
            None,
            cpu.metric_type(),
        )?)?;
        let rss = ConstGauge::new(rss_bytes as i64);
        rss.encode(encoder.encode_descriptor(
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            None,
            rss.metric_type(),
        )?)?;
        let panics = ConstCounter::new(crate::telemetry::panics());
        panics.encode(encoder.encode_descriptor(
            "panics",
            "Panics of this process (each also logged at error, with its location)",
            None,
            panics.metric_type(),
        )?)?;
        let thr = ConstGauge::new(threads as i64);
        thr.encode(encoder.encode_descriptor(
            "process_threads",
            "OS threads",
            None,
            thr.metric_type(),
        )?)?;
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            let fds = ConstGauge::new(dir.count() as i64);
            fds.encode(encoder.encode_descriptor(
                "process_open_fds",
                "Open file descriptors",
                None,
                fds.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

/// The store's group-commit counters, read at scrape time.
struct GroupCommitCollector(std::sync::Arc<dyn confab_core::Store>);

impl std::fmt::Debug for GroupCommitCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GroupCommitCollector")
    }
}

impl Collector for GroupCommitCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // Zeros for a store without one (SQLite): the families exist on
        // every backend, so dashboards and alerts need no variant.
        let stats = self.0.group_commit_stats().unwrap_or_default();
        for (name, help, value) in [
            (
                "db_group_commits",
                "Transactions (or lone statements) that carried turn writes (DB_GROUP_COMMIT)",
                stats.transactions,
            ),
            (
                "db_group_commit_writes",
                "Turn writes (begins, final writes, ledger rows) those transactions carried",
                stats.writes,
            ),
            (
                "db_group_commit_fallbacks",
                "Group commits that failed and were rolled back; their writes then ran one by one",
                stats.fallbacks,
            ),
        ] {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(
                name,
                help,
                None,
                counter.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_format_names_counters_with_total_and_has_no_eof() {
        let m = Metrics::new();
        m.stream_tokens.inc();
        let text = m.encode_prometheus().unwrap();
        assert!(text.contains("# TYPE sse_tokens_streamed_total counter\n"));
        assert!(text.contains("# HELP sse_tokens_streamed_total "));
        assert!(text.contains("\nsse_tokens_streamed_total 1\n"));
        assert!(text.contains("# TYPE sse_time_to_first_token_ms histogram"));
        assert!(!text.contains("# EOF"));
        assert!(m.encode().unwrap().trim_end().ends_with("# EOF"));
    }
}
