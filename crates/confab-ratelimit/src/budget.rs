//! Token budgets in this process: the same windows and arithmetic as
//! `lua/token_budget.lua`, under one lock, so a reservation across several
//! windows is as atomic here as the script makes it on Redis. (One mutex, not
//! a sharded map: holding several shard locks at once can deadlock when two
//! windows share a shard; a reservation is a few map lookups, once per turn.)

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use confab_core::ratelimit::{
    BudgetState, Held, RateLimitError, Reservation, ReserveRequest, TokenBudget,
};
use std::sync::{Mutex, PoisonError};

/// One window of one scope. As in the script, nothing scans the live
/// reservations: their sum is kept, and their deadlines in order.
#[derive(Debug, Default)]
struct Window {
    used: u64,
    /// The sum of the live reservations' tokens.
    reserved: u64,
    /// Reservation id → (tokens, deadline).
    live: HashMap<String, (u64, Instant)>,
    /// The live reservations by deadline.
    deadlines: BTreeSet<(Instant, String)>,
    /// When the window is over (plus its reservations' TTL): then forgotten.
    forget_at: Option<Instant>,
}

impl Window {
    /// Give back what `id` holds, if it still holds it.
    fn release(&mut self, id: &str) {
        if let Some((n, deadline)) = self.live.remove(id) {
            self.reserved = self.reserved.saturating_sub(n);
            self.deadlines.remove(&(deadline, id.to_owned()));
        }
    }

    /// Drop the reservations whose deadline has passed (their process died
    /// before settling).
    fn expire(&mut self, now: Instant) {
        while let Some((deadline, _)) = self.deadlines.first() {
            if *deadline >= now {
                break;
            }
            if let Some((_, id)) = self.deadlines.pop_first()
                && let Some((n, _)) = self.live.remove(&id)
            {
                self.reserved = self.reserved.saturating_sub(n);
            }
        }
    }

    fn hold(&mut self, id: &str, need: u64, deadline: Instant) {
        self.release(id);
        self.live.insert(id.to_owned(), (need, deadline));
        self.deadlines.insert((deadline, id.to_owned()));
        self.reserved += need;
    }
}

/// Token budgets held in memory.
#[derive(Debug, Default)]
pub struct MemoryTokenBudget {
    windows: Mutex<HashMap<String, Window>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl MemoryTokenBudget {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Window>> {
        self.windows.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl TokenBudget for MemoryTokenBudget {
    async fn reserve(&self, request: &ReserveRequest) -> Result<Reservation, RateLimitError> {
        let now = now_ms();
        let instant = Instant::now();
        let mut windows = self.lock();
        if windows.len() > 10_000 {
            windows.retain(|_, w| w.forget_at.is_none_or(|at| at > instant));
        }
        let keyed: Vec<(String, u64)> = request
            .windows
            .iter()
            .map(|w| {
                let idx = now / (w.window_secs * 1000).max(1);
                (format!("{}:{idx}", w.key), idx)
            })
            .collect();
        let mut best: Option<BudgetState> = None;
        for (spec, (key, idx)) in request.windows.iter().zip(&keyed) {
            let window = windows.entry(key.clone()).or_default();
            window.expire(instant);
            let room = spec.limit.saturating_sub(window.used + window.reserved);
            let end = (idx + 1) * spec.window_secs * 1000;
            let state = BudgetState {
                limit: spec.limit,
                remaining: room,
                reset_after: Duration::from_millis(end.saturating_sub(now)),
            };
            if room < request.need {
                return Ok(Reservation::Refused {
                    kind: spec.kind,
                    state,
                });
            }
            let after = BudgetState {
                remaining: room - request.need,
                ..state
            };
            if best.is_none_or(|b| after.remaining < b.remaining) {
                best = Some(after);
            }
        }
        for (spec, (key, idx)) in request.windows.iter().zip(&keyed) {
            let end = (idx + 1) * spec.window_secs * 1000;
            let window = windows.entry(key.clone()).or_default();
            window.hold(&request.id, request.need, instant + request.ttl);
            window.forget_at =
                Some(instant + Duration::from_millis(end.saturating_sub(now)) + request.ttl);
        }
        Ok(Reservation::Granted {
            state: best.unwrap_or(BudgetState {
                limit: 0,
                remaining: 0,
                reset_after: Duration::ZERO,
            }),
            windows: keyed.into_iter().map(|(_, idx)| idx).collect(),
        })
    }

    async fn settle(&self, held: &Held, actual: u64) -> Result<(), RateLimitError> {
        let mut windows = self.lock();
        for (key, idx, _) in &held.windows {
            if let Some(window) = windows.get_mut(&format!("{key}:{idx}")) {
                window.release(&held.id);
                window.used += actual;
            }
        }
        Ok(())
    }
}
