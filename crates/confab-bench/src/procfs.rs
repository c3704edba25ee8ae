//! What the processes involved cost while a scenario runs, read from /proc:
//! CPU time of the server, this client, PostgreSQL (the backends of the
//! benchmark database plus its shared writer processes), the dedicated
//! Redis and pgbench, against the machine's total busy time — whatever is
//! left is "other" load (engineers compiling on the same machine), which is
//! how a disturbed run is recognised. Also the server's resident memory,
//! sampled, because VmHWM only knows the peak since the process started.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use stop_flag::StopFlag;
use tokio::task::JoinHandle;

/// Linux reports process CPU times in clock ticks of 1/100 s (`USER_HZ`,
/// fixed at 100 on every mainstream architecture).
const TICKS_PER_SECOND: f64 = 100.0;
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// Which processes to account to whom.
#[derive(Clone, Debug, Default)]
pub struct Targets {
    pub server_pid: Option<u32>,
    pub redis_pid: Option<u32>,
    /// PostgreSQL backends show the database name in their process title.
    pub db_name: Option<String>,
    /// Count the server's descendants (worker processes) as the server.
    pub server_tree: bool,
    /// The gateway scenario's upstream.
    pub upstream_pid: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Group {
    Server,
    Client,
    Postgres,
    PostgresShared,
    Redis,
    Pgbench,
    Upstream,
    Ignored,
    /// Not known yet: a PostgreSQL child that has not set its process title
    /// (right after the fork it still shows the postmaster's command line).
    /// Classified again on the next sample instead of being remembered.
    Undecided,
}

/// CPU seconds per group over the window, and the window's capacity.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CpuSplit {
    pub elapsed_s: f64,
    /// `nproc × elapsed`: what the machine could have done.
    pub capacity_s: f64,
    pub server_s: f64,
    pub client_s: f64,
    /// Backends connected to the benchmark database.
    pub postgres_s: f64,
    /// WAL writer, checkpointer, background writer: shared with any other
    /// database on the server, but during a run nearly all theirs is ours.
    pub postgres_shared_s: f64,
    pub redis_s: f64,
    pub pgbench_s: f64,
    /// The gateway scenario's upstream (`confab-bench upstream`).
    pub upstream_s: f64,
    /// Process time (user + system) of everything else: other engineers'
    /// builds, kernel threads. What makes a run "disturbed".
    pub other_s: f64,
    /// Interrupt and softirq time: mostly the loopback network and disk
    /// work of the processes above, which the kernel does not charge to them.
    pub interrupts_s: f64,
    /// Time the hypervisor gave to other guests.
    pub steal_s: f64,
    pub machine_busy_s: f64,
}

/// Memory of the server over the window, in MiB.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Memory {
    pub rss_start_mb: f64,
    pub rss_peak_mb: f64,
    pub rss_end_mb: f64,
    /// The kernel's high-water mark since the server started.
    pub hwm_mb: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Usage {
    pub cpu: CpuSplit,
    pub server_memory: Option<Memory>,
}

#[derive(Default)]
struct State {
    /// pid → (group, ticks at the first sample, ticks at the latest sample).
    procs: HashMap<u32, (Group, u64, u64)>,
    rss_peak_kb: u64,
}

/// Samples /proc in the background from `start` until `finish`.
pub struct Monitor {
    targets: Targets,
    started: Instant,
    machine_start: MachineTicks,
    rss_start_kb: Option<u64>,
    state: Arc<Mutex<State>>,
    task: Option<(JoinHandle<()>, StopFlag)>,
}

impl Monitor {
    pub fn start(targets: Targets) -> Monitor {
        let state = Arc::new(Mutex::new(State::default()));
        let self_pid = std::process::id();
        let first = Instant::now();
        sample(&targets, self_pid, &state, true);
        let rss_start_kb = targets.server_pid.and_then(|pid| status_kb(pid, "VmRSS:"));
        let stop = StopFlag::new();
        let task = {
            let targets = targets.clone();
            let state = state.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(SAMPLE_EVERY);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                while !stop.is_cancelled() {
                    tick.tick().await;
                    let (targets, state) = (targets.clone(), state.clone());
                    // /proc reads are blocking file I/O; keep them off the
                    // runtime threads that time the streams.
                    let _ = tokio::task::spawn_blocking(move || {
                        sample(&targets, self_pid, &state, false);
                    })
                    .await;
                }
            })
        };
        Monitor {
            targets,
            started: first,
            machine_start: machine_ticks(),
            rss_start_kb,
            state,
            task: Some((task, stop)),
        }
    }

    pub async fn finish(mut self) -> Usage {
        if let Some((task, stop)) = self.task.take() {
            stop.cancel();
            let _ = task.await;
        }
        let self_pid = std::process::id();
        sample(&self.targets, self_pid, &self.state, false);
        let elapsed = self.started.elapsed().as_secs_f64();
        let machine = machine_ticks().since(&self.machine_start);
        let secs = |ticks: u64| ticks as f64 / TICKS_PER_SECOND;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let mut split = CpuSplit {
            elapsed_s: elapsed,
            capacity_s: cpus * elapsed,
            machine_busy_s: secs(machine.process + machine.interrupts + machine.steal),
            interrupts_s: secs(machine.interrupts),
            steal_s: secs(machine.steal),
            ..CpuSplit::default()
        };
        // /proc/stat counts all CPUs: its total over the window should be
        // ≈ capacity; prefer it when present (it is exact about idle time).
        if machine.total > 0 {
            split.capacity_s = secs(machine.total);
        }
        let rss_peak_kb;
        {
            let Ok(state) = self.state.lock() else {
                return Usage::default();
            };
            rss_peak_kb = state.rss_peak_kb;
            for (group, first, last) in state.procs.values() {
                let secs = last.saturating_sub(*first) as f64 / TICKS_PER_SECOND;
                match group {
                    Group::Server => split.server_s += secs,
                    Group::Client => split.client_s += secs,
                    Group::Postgres => split.postgres_s += secs,
                    Group::PostgresShared => split.postgres_shared_s += secs,
                    Group::Redis => split.redis_s += secs,
                    Group::Pgbench => split.pgbench_s += secs,
                    Group::Upstream => split.upstream_s += secs,
                    Group::Ignored | Group::Undecided => {}
                }
            }
        }
        let ours = split.server_s
            + split.client_s
            + split.postgres_s
            + split.postgres_shared_s
            + split.redis_s
            + split.pgbench_s
            + split.upstream_s;
        split.other_s = (secs(machine.process) - ours).max(0.0);
        let server_memory = self.targets.server_pid.map(|pid| {
            let end = status_kb(pid, "VmRSS:").unwrap_or(0);
            Memory {
                rss_start_mb: kb_to_mb(self.rss_start_kb.unwrap_or(0)),
                rss_peak_mb: kb_to_mb(rss_peak_kb.max(end)),
                rss_end_mb: kb_to_mb(end),
                hwm_mb: kb_to_mb(status_kb(pid, "VmHWM:").unwrap_or(0)),
            }
        });
        Usage {
            cpu: split,
            server_memory,
        }
    }
}

fn kb_to_mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// One pass over /proc. Processes seen for the first time after the start
/// were born during the window (pgbench and its backends), so all their CPU
/// time counts; for the others only the growth since the first sample does.
fn sample(targets: &Targets, self_pid: u32, state: &Mutex<State>, initial: bool) {
    let rss = targets.server_pid.and_then(|pid| status_kb(pid, "VmRSS:"));
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    let pids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let Ok(mut state) = state.lock() else { return };
    if let Some(rss) = rss {
        state.rss_peak_kb = state.rss_peak_kb.max(rss);
    }
    for pid in pids {
        let known = state.procs.get(&pid).map(|(g, _, _)| *g);
        let group = match known {
            Some(g) => g,
            None => classify(pid, targets, self_pid),
        };
        if group == Group::Ignored {
            state.procs.entry(pid).or_insert((Group::Ignored, 0, 0));
            continue;
        }
        if group == Group::Undecided {
            continue;
        }
        let Some(ticks) = cpu_ticks(pid) else {
            continue;
        };
        state
            .procs
            .entry(pid)
            .and_modify(|e| e.2 = ticks)
            .or_insert((group, if initial { ticks } else { 0 }, ticks));
    }
}

fn classify(pid: u32, targets: &Targets, self_pid: u32) -> Group {
    if pid == self_pid {
        return Group::Client;
    }
    if Some(pid) == targets.server_pid {
        return Group::Server;
    }
    if Some(pid) == targets.redis_pid {
        return Group::Redis;
    }
    if Some(pid) == targets.upstream_pid {
        return Group::Upstream;
    }
    if let Some(server) = targets.server_pid.filter(|_| targets.server_tree)
        && descends_from(pid, server)
    {
        return Group::Server;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return Group::Ignored;
    };
    let cmdline = String::from_utf8_lossy(&cmdline);
    if cmdline.starts_with("pgbench") || cmdline.contains("/pgbench\0") {
        return Group::Pgbench;
    }
    // Backends retitle themselves: "postgres: 15/main: user db host(port) state".
    if let Some(title) = cmdline.strip_prefix("postgres: ") {
        if let Some(db) = &targets.db_name
            && title.split_whitespace().any(|word| word == db)
        {
            return Group::Postgres;
        }
        if [
            "walwriter",
            "checkpointer",
            "background writer",
            "wal writer",
        ]
        .iter()
        .any(|aux| title.contains(aux))
        {
            return Group::PostgresShared;
        }
    }
    // A backend forked a moment ago still carries the postmaster's command
    // line until it retitles itself (after its startup packet, which can take
    // a while on a saturated machine). Remembering it as ignored would
    // charge all its later work to "other".
    let argv0 = cmdline.split('\0').next().unwrap_or("");
    if argv0 == "postgres" || argv0.ends_with("/postgres") {
        return Group::Undecided;
    }
    Group::Ignored
}

/// Whether `root` is among `pid`'s ancestors (a few generations up).
fn descends_from(pid: u32, root: u32) -> bool {
    let mut current = pid;
    for _ in 0..8 {
        let Some(parent) = parent_pid(current) else {
            return false;
        };
        if parent == root {
            return true;
        }
        if parent <= 1 {
            return false;
        }
        current = parent;
    }
    false
}

fn parent_pid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    // After the name: state, then ppid.
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// utime + stime of a process (all its threads), in ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime 14, stime 15 (1-based).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// A `kB` line of /proc/<pid>/status.
pub fn status_kb(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Ticks of all CPUs since boot, by kind.
#[derive(Clone, Copy, Debug, Default)]
struct MachineTicks {
    /// user + nice + system: time charged to processes.
    process: u64,
    /// irq + softirq.
    interrupts: u64,
    steal: u64,
    /// Everything, idle included.
    total: u64,
}

impl MachineTicks {
    fn since(&self, start: &MachineTicks) -> MachineTicks {
        MachineTicks {
            process: self.process.saturating_sub(start.process),
            interrupts: self.interrupts.saturating_sub(start.interrupts),
            steal: self.steal.saturating_sub(start.steal),
            total: self.total.saturating_sub(start.total),
        }
    }
}

fn machine_ticks() -> MachineTicks {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return MachineTicks::default();
    };
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return MachineTicks::default();
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is inside user).
    let get = |i: usize| v.get(i).copied().unwrap_or(0);
    let process = get(0) + get(1) + get(2);
    let interrupts = get(5) + get(6);
    let steal = get(7);
    MachineTicks {
        process,
        interrupts,
        steal,
        total: process + interrupts + steal + get(3) + get(4),
    }
}

/// A cancellation flag without pulling tokio-util into the bench crate.
mod stop_flag {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[derive(Clone, Default)]
    pub struct StopFlag(Arc<AtomicBool>);

    impl StopFlag {
        pub fn new() -> Self {
            Self::default()
        }
        pub fn cancel(&self) {
            self.0.store(true, Ordering::Release);
        }
        pub fn is_cancelled(&self) -> bool {
            self.0.load(Ordering::Acquire)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_readable() {
        let pid = std::process::id();
        assert!(cpu_ticks(pid).is_some());
        assert!(status_kb(pid, "VmRSS:").unwrap() > 0);
        let m = machine_ticks();
        assert!(m.total >= m.process + m.interrupts && m.total > 0);
    }
}
